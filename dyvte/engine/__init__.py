"""dyvte.engine."""
