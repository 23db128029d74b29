"""Atomic writes: a crash or a bad argument never leaves half a file (or half an output folder) where a good one stood.

Files are written to a temporary file beside their target and renamed over it (:func:`atomic_path`,
:func:`write_text_atomic`); a launcher's output folder is written as a whole into a temporary sibling folder and
swapped in at the end (:func:`staged_dir`), so that no file of an earlier run survives beside the new ones. What dyvte
writes gets the permissions the umask gives a newly created file or folder (``0o644`` / ``0o755`` under the usual
``022``), as ``open`` would, never the private ``0o600`` / ``0o700`` of the temporary files it starts from.
:func:`check_writable` tries a folder before any expensive work.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "atomic_path",
    "check_writable",
    "new_file_mode",
    "replace_dir",
    "staged_dir",
    "staged_files",
    "write_text_atomic",
]

logger = logging.getLogger(__name__)


def _umask() -> int:
    """The process's umask (read from ``/proc`` where it can be, so that nothing is changed even for an instant)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode(directory: bool = False) -> int:
    """The mode ``open`` (``0o666``) or ``mkdir`` (``0o777``) gives a new file or folder under the current umask."""
    return (0o777 if directory else 0o666) & ~_umask()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` in one rename, else it is removed.

    The file gets the mode a newly created file gets under the umask (:func:`new_file_mode`) before the rename, not
    the owner-only mode of the temporary file it was written as.

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
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, target)  # atomic on POSIX within one file system
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``target`` atomically; returns the target path."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)
    return Path(target)


def check_writable(path: str | os.PathLike, option: str) -> None:
    """Refuse, before any work, an output folder that cannot be written: its parent folders are created and a
    temporary file is tried in the folder itself when it exists and in its parent (where a staged folder is swapped
    in, :func:`staged_dir`).

    Args:
        path: the output folder.
        option: the option that named it, for the message (e.g. ``"--output_dir"``).

    Raises:
        ValueError: the folder or its parent cannot be written (read-only, another user's), or a parent cannot be
            created (a file stands in its path); the message names ``option``, the folder and the cause.
    """
    folder = Path(path).absolute()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        for place in (folder, folder.parent) if folder.is_dir() else (folder.parent,):
            with tempfile.NamedTemporaryFile(prefix=".dyvte-write-test.", dir=place):
                pass
    except OSError as error:
        raise ValueError(
            f"{option} {path}: cannot write there ({type(error).__name__}: {error}); nothing was run: choose a "
            "folder you can write to"
        ) from error


def replace_dir(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Put the folder ``source`` in the place of ``target`` (a sibling of it), removing the folder that stood there.

    The old folder is first renamed aside, then ``source`` renamed to ``target`` (each one rename on one file
    system); if the second rename fails, the old folder is put back. Returns ``target``.
    """
    source, target = Path(source), Path(target)
    aside = None
    if target.exists():
        aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, aside)
    try:
        os.rename(source, target)
    except BaseException:
        if aside is not None:
            os.rename(aside, target)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
        if aside.exists():
            logger.warning("could not remove the replaced folder %s; remove it yourself", aside)
    return target


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty temporary folder beside ``target``; on success it replaces ``target`` as a whole
    (:func:`replace_dir`), else it is removed and ``target`` is left as it was.

    The folder gets the mode ``mkdir`` would give it under the umask (:func:`new_file_mode`).

    Example::

        with staged_dir(out) as folder:
            heads.save_pretrained(folder)
            write_text_atomic(folder / "training.json", text)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(folder, new_file_mode(directory=True))
        yield folder
        replace_dir(folder, target)
    finally:
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def staged_files(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty temporary folder inside ``folder``; on success every file written into it is moved into
    ``folder`` (each replacing the file of its name, other files of ``folder`` untouched), else it is removed.

    For outputs written into a folder that also holds other things (``report.py --output_dir docs``): no file is
    replaced before every one of them is complete. The files keep their names (and suffixes) while they are written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".dyvte-staged-", dir=folder))
    try:
        yield staging
        for file in sorted(staging.iterdir()):
            if file.is_file():
                os.chmod(file, new_file_mode())
                os.replace(file, folder / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
