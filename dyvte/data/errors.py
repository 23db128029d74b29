"""The error every data-path refusal raises: a dataset or record that cannot be used, named with the reason."""

__all__ = ["DataError"]


class DataError(ValueError):
    """A dataset or record cannot be used (the message says which and why)."""
