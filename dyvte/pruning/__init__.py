"""dyvte.pruning."""
