"""dyvte.exits."""
