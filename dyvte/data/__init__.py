"""dyvte.data."""
