"""dyvte.eval."""
