"""Fingerprints of records: one digest per (question, answer, earlier turns, image), to find the same record under
other names, in other files or in other splits.

A record's digest (:func:`record_digest`) is the SHA-1 of its question, its gold answer (as
:func:`dyvte.data.answers.gold_text` writes it), its earlier turns and its image: the image's encoded bytes (a
file's bytes for a path, whatever its name; the bytes ``datasets`` stores), or for an in-memory PIL image its mode,
size and pixels. Two records with one digest are the same task on the same picture; an image changed under its old
name gives a new digest. Used by the label-cache key (:mod:`dyvte.train.label_cache`), ``fit``'s check that
validation and calibration records are not copies of training records, and ``evaluate``'s check that calibrated
thresholds are not evaluated on their own calibration records (:func:`check_overlaps`).

Hashing reads the images' stored bytes without decoding them: the 24,000 demo training records take about a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from dyvte.data.answers import gold_text
from dyvte.data.errors import DataError

__all__ = [
    "MAX_OVERLAP",
    "SHORT_DIGEST",
    "Overlap",
    "RecordPrints",
    "check_overlaps",
    "combined_digest",
    "count_in",
    "fingerprint_records",
    "image_digest",
    "record_digest",
    "short_digests",
    "source_stamp",
    "split_digests",
]

logger = logging.getLogger(__name__)

#: hex characters of the compact form saved with calibrated thresholds (8 bytes: a chance collision among 10^5
#: records is about 3 in 10^10)
SHORT_DIGEST = 16

#: the share of held-out (or evaluated) records that may be copies of the records they must be apart from before a
#: launcher refuses to run without ``--allow_overlap true`` (any copy is warned about)
MAX_OVERLAP = 0.05


def _file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha1").hexdigest()


def image_digest(image: Any) -> tuple[str, bool]:
    """``(digest, embedded)`` of a record's image: ``embedded`` is whether the image is held in the record itself
    (bytes or pixels) rather than read from a file it names.

    * image bytes, or ``{"bytes": ...}`` as ``datasets`` stores an image: the SHA-1 of the bytes;
    * a path, or ``{"bytes": None, "path": ...}``: the SHA-1 of the file's bytes (its name plays no part); a path that
      is not a readable file hashes as its text;
    * a PIL image: the SHA-1 of its mode, size and pixels;
    * no image: ``"none"``.
    """
    if isinstance(image, Mapping) and ("bytes" in image or "path" in image):
        image = image.get("bytes") if image.get("bytes") is not None else image.get("path")
    if image is None:
        return "none", True
    if isinstance(image, bytes | bytearray | memoryview):
        return hashlib.sha1(image).hexdigest(), True
    if isinstance(image, Image.Image):
        head = f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode()
        return hashlib.sha1(head + image.tobytes()).hexdigest(), True
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        try:
            return _file_digest(path), False
        except OSError:
            return hashlib.sha1(f"path:{image}".encode()).hexdigest(), False
    raise DataError(f"cannot fingerprint an image of type {type(image).__name__}")


def _answer(answer: Any) -> str | None:
    if answer is None:
        return None
    try:
        return gold_text(answer, "a record")
    except DataError:
        return str(answer)


def _context(context: Any) -> list[list[Any]]:
    turns = []
    for turn in context or ():
        if isinstance(turn, Mapping):
            turns.append([turn.get("question"), turn.get("answer")])
        else:
            turns.append(list(turn))
    return turns


def _digest(record: Mapping[str, Any]) -> tuple[str, bool]:
    image, embedded = image_digest(record.get("image"))
    key = [record.get("question"), _answer(record.get("answer")), _context(record.get("context")), image]
    return hashlib.sha1(json.dumps(key, ensure_ascii=False, default=str).encode()).hexdigest(), embedded


def record_digest(record: Mapping[str, Any]) -> str:
    """The SHA-1 (40 hex characters) of a record's ``question``, ``answer``, ``context`` and ``image``
    (:func:`image_digest`); ``qtype`` and other fields play no part."""
    return _digest(record)[0]


@dataclass(frozen=True)
class RecordPrints:
    """The digests of a sequence of records, in order, and whether every image was held in the records themselves
    (then the digests depend only on the records' source files, and may be cached against their sizes and times).
    """

    digests: list[str]
    embedded: bool


#: the fields a digest reads
FIELDS = ("question", "answer", "context", "image")


def fingerprint_records(records: Any) -> RecordPrints:
    """:class:`RecordPrints` of a ``datasets.Dataset`` (its images read as stored, never decoded) or a sequence of
    record mappings."""
    digests, embedded = [], True
    if hasattr(records, "cast_column") and hasattr(records, "column_names"):
        import datasets

        if "image" in records.column_names and isinstance(records.features["image"], datasets.Image):
            records = records.cast_column("image", datasets.Image(decode=False))
        columns = [name for name in FIELDS if name in records.column_names]
        rows: Iterable[Mapping[str, Any]] = (
            dict(zip(batch, values, strict=True))
            for batch in records.select_columns(columns).iter(batch_size=1024)
            for values in zip(*batch.values(), strict=True)
        )
    else:
        rows = records
    for record in rows:
        digest, inside = _digest(record)
        digests.append(digest)
        embedded = embedded and inside
    return RecordPrints(digests, embedded)


def split_digests(records: Any) -> list[str]:
    """The digest of every record (:func:`record_digest`), in order (:func:`fingerprint_records`)."""
    return fingerprint_records(records).digests


def source_stamp(data: str) -> list[str]:
    """Names, sizes and modification times of the files of a records source (``"demo"``: the stored demo data), for
    keys of what was computed from them: a rewritten file gives a new stamp. Images a source only names by path are
    not among them (their bytes are read into the digests instead)."""
    if data == "demo":
        from dyvte.demo import demo_checkpoint_dir

        path = demo_checkpoint_dir("demo-data")
    else:
        path = Path(data)
    if not path.exists():
        return []
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [f"{p.relative_to(path) if p != path else p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]


def combined_digest(digests: Sequence[str]) -> str:
    """One SHA-1 of a sequence of record digests, in order: the fingerprint of a whole split."""
    return hashlib.sha1("\n".join(digests).encode()).hexdigest()


def short_digests(digests: Iterable[str]) -> list[str]:
    """The distinct :data:`SHORT_DIGEST`-character prefixes of ``digests``, sorted: the compact form saved in a
    heads config or a calibration file (about 19 bytes of JSON per record)."""
    return sorted({digest[:SHORT_DIGEST] for digest in digests})


def count_in(digests: Iterable[str], others: Collection[str]) -> int:
    """How many of ``digests`` are among ``others`` (full digests or their :func:`short_digests` form)."""
    width = min((len(digest) for digest in others), default=SHORT_DIGEST)
    prefixes = {digest[:width] for digest in others}
    return sum(digest[:width] in prefixes for digest in digests)


@dataclass(frozen=True)
class Overlap:
    """``count`` of the ``total`` records of ``records`` are copies of records of ``among``."""

    records: str
    among: str
    count: int
    total: int

    @property
    def share(self) -> float:
        """``count / total`` (0 without records)."""
        return self.count / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"{self.count:,} of the {self.total:,} {self.records} ({self.share:.1%}) are copies of {self.among}"


def check_overlaps(
    overlaps: Sequence[Overlap],
    allow: bool,
    why: str,
    done: str = "Nothing was run.",
    limit: float = MAX_OVERLAP,
    log: logging.Logger = logger,
) -> None:
    """Warn about every overlap with a copy in it; refuse when one exceeds ``limit`` unless ``allow``.

    Args:
        overlaps: the overlaps found (those with a count of 0 are not reported).
        allow: ``--allow_overlap true``: only warn.
        why: what the copies make wrong, for the messages.
        done: what the refusal left undone, for its message.
        limit: the largest share of copies run without ``allow``.
        log: where the warning goes.

    Raises:
        ValueError: a share above ``limit`` without ``allow``; the message names every count and ``--allow_overlap``.
    """
    found = [overlap for overlap in overlaps if overlap.count]
    if not found:
        return
    counts = "; ".join(str(overlap) for overlap in found)
    compared = "records compared by question, answer, earlier turns and image bytes"
    if not allow and any(overlap.share > limit for overlap in found):
        raise ValueError(
            f"{counts} ({compared}): {why}. More than {limit:.0%} is refused: remove the copies, or pass "
            f"--allow_overlap true to run anyway. {done}"
        )
    log.warning(
        "%s (%s): %s%s",
        counts,
        compared,
        why,
        " (--allow_overlap true)" if allow else f"; more than {limit:.0%} would be refused",
    )
