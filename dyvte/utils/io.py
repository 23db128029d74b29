"""Atomic file writes: a crash or a bad argument never leaves half a file where a good one stood."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "write_text_atomic"]


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` in one rename, else it is removed.

    Example::

        with atomic_path(directory / "weights.safetensors") as tmp:
            save_file(state, str(tmp))
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)  # atomic on POSIX within one file system
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``target`` atomically; returns the target path."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)
    return Path(target)
