"""The package's version, here at the bottom of the layers so that every layer can record it (model fingerprints)."""

__all__ = ["__version__"]

__version__ = "0.2.0"
