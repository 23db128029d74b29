"""Argument checks shared by the library and the launchers: one message shape, naming the argument."""

from __future__ import annotations

from typing import Any

__all__ = ["check_positive_int"]


def check_positive_int(name: str, value: Any, optional: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int >= 1 (or ``None`` when ``optional``).

    A bool is refused although it is an int subclass: ``batch_size=True`` is a mistake, not 1.
    """
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1{' or null' if optional else ''}, got {value!r}")
