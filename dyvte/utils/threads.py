"""Per-thread attributes: the per-call state of a handle shared by threads (docs/design.md §4, "Threads").

A withdrawal handle is one object hooked into one model, but each thread that calls the model runs its own calls: its
prefill, its decode steps, its exits and its cache layouts. :class:`PerThread` declares such an attribute on a class:
each thread reads and writes its own value, starting from the default (or a fresh one from ``factory``), so two
threads calling ``generate`` under one handle never see each other's state.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

__all__ = ["PerThread"]

_LOCAL = "_dyvte_thread_local"  # the instance attribute holding its threading.local


def _local(obj: Any) -> threading.local:
    """``obj``'s ``threading.local`` (made once; ``dict.setdefault`` is atomic, so two threads get the same one)."""
    store = vars(obj)
    local = store.get(_LOCAL)
    if local is None:
        local = store.setdefault(_LOCAL, threading.local())
    return local


class PerThread:
    """A data descriptor: an instance attribute whose value is kept per thread.

    Args:
        default: the value a thread reads before it writes one (shared: use ``factory`` for mutable values).
        factory: ``factory(obj)`` builds a thread's first value (e.g. an empty layout), instead of ``default``.
    """

    def __init__(self, default: Any = None, factory: Callable[[Any], Any] | None = None) -> None:
        self.default, self.factory = default, factory
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        local = _local(obj)
        try:
            return getattr(local, self.name)
        except AttributeError:
            value = self.factory(obj) if self.factory is not None else self.default
            setattr(local, self.name, value)
            return value

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(_local(obj), self.name, value)
