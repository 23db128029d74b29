"""dyvte.utils."""
