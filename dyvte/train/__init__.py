"""dyvte.train."""
