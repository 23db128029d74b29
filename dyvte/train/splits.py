"""Which records train, validate and calibrate exit heads: the split plan of ``ExitLabelData``.

Validation never reuses training records: when it would come from the same records as training (no ``val_data`` and
a single records file or a split-less ``save_to_disk`` directory, or ``val_split == train_split``), a seeded
held-out split is carved from them instead (:func:`held_out_split`), logged and recorded in ``training.json``
(:meth:`SplitPlan.summary`). Calibration records follow the validation records of the validation split, or are held
out with them.

Held out is not the same as apart: a records file with duplicated records, or ``val_data`` that is a copy of the
training file, gives validation and calibration records that are copies of training records. Each record's digest
(:mod:`dyvte.data.fingerprints`: question, answer, earlier turns and image bytes) finds them:
:meth:`SplitPlan.overlaps` counts the copies (``train/fit.py`` warns, and refuses above 5% unless
``--allow_overlap true``), and :meth:`SplitPlan.digests` also keys the label caches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import load_from_disk

from dyvte.data.fingerprints import Overlap, count_in, fingerprint_records, source_stamp
from dyvte.train.options import DataSource, SplitSizes
from dyvte.utils.io import write_text_atomic

__all__ = ["DEMO_SPLIT_SIZES", "Split", "SplitPlan", "has_named_splits", "held_out_split", "with_demo_sizes"]

logger = logging.getLogger(__name__)


def held_out_split(
    num_records: int, val_count: int | None, train_count: int | None = None, seed: int = 0, val_fraction: float = 0.1
) -> tuple[list[int], list[int]]:
    """Disjoint ``(train, val)`` record indices carved from one set of ``num_records`` records.

    ``val`` is a seeded random sample of ``val_count`` indices (sorted; ``None``: ``val_fraction`` of the records,
    at least 1); ``train`` is the first ``train_count`` of the remaining indices in order (all of them when
    ``None``). The same arguments always give the same split.

    Raises:
        ValueError: ``val_count`` leaves no record for training, or is < 1.
    """
    if val_count is None:
        val_count = max(1, round(val_fraction * num_records))
    if not 1 <= val_count < num_records:
        raise ValueError(
            f"cannot hold out {val_count} validation records from {num_records}: at least 1 must stay for training "
            "and at least 1 is needed for validation"
        )
    val = sorted(int(i) for i in np.random.default_rng(seed).permutation(num_records)[:val_count])
    held = set(val)
    rest = [i for i in range(num_records) if i not in held]
    return (rest if train_count is None else rest[:train_count]), val


def has_named_splits(data: str) -> bool:
    """Whether ``data`` has named splits (the demo, a ``DatasetDict`` directory); single files have one set."""
    return data == "demo" or (Path(data) / "dataset_dict.json").is_file()


def _count_records(data: str, split: str, **options: Any) -> int:
    """Records in ``split`` of ``data`` (Arrow metadata for the demo and ``save_to_disk`` directories)."""
    if data == "demo":
        from dyvte.demo import load_demo_dataset

        return len(load_demo_dataset(split))
    if (Path(data) / "dataset_dict.json").is_file():
        return load_from_disk(data)[split].num_rows
    from dyvte.data.sources import load_records

    return len(load_records(data, split, **options))


def _source_key(data: str) -> str:
    return data if data == "demo" else str(Path(data).resolve())


@dataclass
class Split:
    """One split to label: records ``split`` of ``data`` (the first ``samples``, or exactly ``indices``)."""

    name: str
    data: str
    split: str
    samples: int | None
    indices: list[int] | None = None  # held-out carving: these records of the source, in this order
    total: int | None = None  # records in the source the split was carved from
    start: int = 0  # first record of ``split`` (calibration follows the validation records)


#: the demo's split sizes, where the demo data is labelled and a size is not given: chosen by what they buy
#: (``benchmarks/fit_sizes.py`` on validation records; checkpoints/README.md, "demo-exit-heads") so that
#: ``python train/fit.py`` finishes in minutes; every other source is sized from its records (:class:`SplitSizes`)
DEMO_SPLIT_SIZES = {"train_samples": 6000, "val_samples": 1000, "calib_samples": 2000}


def with_demo_sizes(source: DataSource, sizes: SplitSizes) -> SplitSizes:
    """``sizes`` with :data:`DEMO_SPLIT_SIZES` in the sizes left ``None`` when ``source`` reads the demo data."""
    if source.data != "demo" or source.val_data is not None:
        return sizes
    given = {name: value for name, value in DEMO_SPLIT_SIZES.items() if getattr(sizes, name) is None}
    return dataclasses.replace(sizes, **given)


class SplitPlan:
    """The ``train``, ``val`` and (unless there is none) ``calib`` splits of a source, worked out once.

    Args:
        source: the records and how to read them.
        sizes: the split sizes and the held-out split's seed (on the demo data, :data:`DEMO_SPLIT_SIZES` fills the
            sizes left ``None``).
        digest_dir: where the record digests of splits whose images are stored in their source files (the demo,
            ``save_to_disk`` folders, parquet with image bytes) are kept between runs, keyed by the files' sizes and
            times, so that a run whose label caches exist reads no record (``None``: not kept).
    """

    def __init__(self, source: DataSource, sizes: SplitSizes, digest_dir: Path | None = None) -> None:
        self.source = source
        self.sizes = with_demo_sizes(source, sizes)
        self.digest_dir = digest_dir
        self._parts: dict[str, Split] | None = None
        self._records = None  # the records validation is held out of, once loaded
        self._loaded: dict[str, Any] = {}  # each split's records, once read
        self._digests: dict[str, list[str]] = {}  # each split's record digests, once computed

    def held_out(self) -> bool:
        """Whether validation would come from the training records, so that it is held out of them."""
        src = self.source
        if _source_key(src.val_data or src.data) != _source_key(src.data):
            return False
        return src.train_split == src.val_split or not has_named_splits(src.data)

    def indices(self) -> dict[str, list[int] | None]:
        """The source records of each split when validation is held out of the training records, else ``None``s."""
        return {name: part.indices for name, part in self.parts().items()}

    def summary(self) -> dict[str, Any]:
        """Where the training and validation records come from (for ``training.json``)."""
        parts = self.parts()
        train, val = parts["train"], parts["val"]
        calib = parts.get("calib")
        if val.indices is None:
            summary = {"held_out": False, "train": f"{train.data} [{train.split}]", "val": f"{val.data} [{val.split}]"}
            if calib is not None:
                summary["calib"] = (
                    f"{calib.data} [{calib.split}] records {calib.start}..{calib.start + calib.samples - 1}"
                )
            return summary
        return {
            "held_out": True,
            "source": f"{train.data} [{train.split}]",
            "source_records": train.total,
            "seed": self.sizes.split_seed,
            "train_samples": len(train.indices or []),
            "val_samples": len(val.indices),
            "calib_samples": len(calib.indices or []) if calib is not None else 0,
        }

    def parts(self) -> dict[str, Split]:
        """``{"train": ..., "val": ...}`` and ``"calib"`` when calibration has records (worked out on first call).

        Raises:
            ValueError: the sizes ask for more records than there are (naming the options to change).
        """
        if self._parts is not None:
            return self._parts
        src, sizes = self.source, self.sizes
        train = Split("train", src.data, src.train_split, sizes.train_samples)
        val = Split("val", src.val_data or src.data, src.val_split, sizes.val_samples)
        calib = Split("calib", val.data, val.split, sizes.calib_samples)
        if self.held_out():
            self._hold_out(train, val, calib)
        else:
            self._size_validation(val, calib)
        self._parts = {"train": train, "val": val}
        if calib.indices if calib.indices is not None else calib.samples:
            self._parts["calib"] = calib
        return self._parts

    def _size_validation(self, val: Split, calib: Split) -> None:
        """Validation: the first ``val_samples`` records of the validation split (``None``:
        :meth:`SplitSizes.platt_size` of it); calibration: the records after them (``calib_samples`` of them, or
        all that are left)."""
        sizes = self.sizes
        if sizes.calib_samples == 0:  # no calibration: validation takes its records (all of them when None)
            return
        total = _count_records(val.data, val.split, **self.source.record_options())
        if val.samples is None:
            val.samples = SplitSizes.platt_size(total)
            logger.info(
                "validation: the first %d of the %d records of %s [%s] (--data.splits.val_samples; the rest "
                "calibrates)",
                val.samples,
                total,
                val.data,
                val.split,
            )
        elif val.samples > total:
            raise ValueError(
                f"--data.splits.val_samples={val.samples}: {val.data} [{val.split}] has only {total} records"
            )
        calib.start = val.samples
        left = total - val.samples
        if sizes.calib_samples is None:
            calib.samples = left
        elif left <= 0:
            raise ValueError(
                f"--data.splits.calib_samples={sizes.calib_samples}: calibration takes the records of {val.data} "
                f"[{val.split}] after the first --data.splits.val_samples={val.samples}, and none is left; lower "
                "--data.splits.val_samples, pass --data.splits.calib_samples 0 or null"
            )
        elif left < sizes.calib_samples:
            logger.warning(
                "calibration: only %d records of %s [%s] left after the %d validation records (%d asked for)",
                left,
                val.data,
                val.split,
                val.samples,
                sizes.calib_samples,
            )
            calib.samples = left

    def counts(self) -> dict[str, int]:
        """The number of records of each split (``train``, ``val``, ``calib``: 0 without calibration)."""
        parts = self.parts()
        counts = {}
        for name in ("train", "val", "calib"):
            part = parts.get(name)
            if part is None:
                counts[name] = 0
            elif part.indices is not None:
                counts[name] = len(part.indices)
            else:
                available = _count_records(part.data, part.split, **self.source.record_options()) - part.start
                counts[name] = available if part.samples is None else min(part.samples, available)
        return counts

    def _hold_out(self, train: Split, val: Split, calib: Split) -> None:
        """Carve validation and calibration at random out of the training records; training keeps the rest."""
        src, sizes = self.source, self.sizes
        self._records = self.load(src.data, src.train_split)  # every record: the count fixes the split
        total = len(self._records)
        val_count = sizes.val_samples or max(1, round(sizes.val_fraction * total))
        calib_count = round(sizes.calib_fraction * total) if sizes.calib_samples is None else sizes.calib_samples
        try:
            train.indices, held = held_out_split(
                total, val_count + calib_count, sizes.train_samples, sizes.split_seed, sizes.val_fraction
            )
        except ValueError as err:
            raise ValueError(
                f"--data.splits.val_samples={sizes.val_samples} (--data.splits.val_fraction={sizes.val_fraction}) and "
                f"--data.splits.calib_samples={sizes.calib_samples}: validation and calibration are held out of the "
                f"{total} records of {src.data} (no --data.source.val_data given): {err}; lower them or pass "
                "--data.source.val_data"
            ) from None
        order = np.random.default_rng(sizes.split_seed + 1).permutation(len(held))  # val / calib: a random cut
        val.indices = sorted(held[i] for i in order[:val_count])
        calib.indices = sorted(held[i] for i in order[val_count:])
        train.total = val.total = calib.total = total
        logger.info(
            "validation: %d records and calibration: %d records held out at random (seed %d) from the %d records "
            "of %s; training takes %d of the others (pass --data.source.val_data for a separate validation set)",
            len(val.indices),
            len(calib.indices),
            sizes.split_seed,
            total,
            src.data,
            len(train.indices),
        )

    def load(self, data: str, split: str, limit: int | None = None):
        """The first ``limit`` records of ``split`` of ``data`` (all when ``None``), read with the source's options."""
        from dyvte.data.sources import load_records

        return load_records(data, split, limit, **self.source.record_options())

    def records(self, part: Split):
        """The records of ``part``, in order (read once)."""
        if part.name in self._loaded:
            return self._loaded[part.name]
        if part.indices is None and part.start:
            records = self.load(part.data, part.split, part.start + part.samples)
            records = records.select(range(part.start, len(records)))
        elif part.indices is None:
            records = self.load(part.data, part.split, part.samples)
        else:
            if self._records is None:
                self._records = self.load(part.data, part.split)
            records = self._records.select(part.indices)
        self._loaded[part.name] = records
        return records

    def digests(self, name: str) -> list[str]:
        """The digest of every record of split ``name`` (``train``, ``val`` or ``calib``), in order
        (:func:`dyvte.data.fingerprints.record_digest`).

        A split held out of the training records is hashed from them (already read); another split is read and
        hashed once, and, when its images are stored in its source files, its digests are kept under ``digest_dir``
        against the files' sizes and times.
        """
        if name in self._digests:
            return self._digests[name]
        part = self.parts()[name]
        if part.indices is not None:
            if "all" not in self._digests:
                if self._records is None:
                    self._records = self.load(part.data, part.split)
                self._digests["all"] = fingerprint_records(self._records).digests
            digests = [self._digests["all"][i] for i in part.indices]
        else:
            digests = self._stored_digests(part)
        self._digests[name] = digests
        return digests

    def _stored_digests(self, part: Split) -> list[str]:
        """:meth:`digests` of a split that is not held out: read from ``digest_dir`` when kept there, else
        computed (and kept when its images are stored in its source files)."""
        file = None
        if self.digest_dir is not None:
            options = {**self.source.record_options()}
            if options["image_folder"]:
                options["image_folder"] = str(Path(options["image_folder"]).resolve())
            key = [1, _source_key(part.data), part.split, part.start, part.samples, options, source_stamp(part.data)]
            file = self.digest_dir / f"{part.split}-{hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]}.json"
            if file.is_file():
                try:
                    return json.loads(file.read_text())["digests"]
                except (OSError, ValueError, KeyError):
                    logger.info("record digests %s unreadable: computing them again", file)
        prints = fingerprint_records(self.records(part))
        if file is not None and prints.embedded:
            write_text_atomic(file, json.dumps({"source": f"{part.data} [{part.split}]", "digests": prints.digests}))
        return prints.digests

    def overlaps(self) -> list[Overlap]:
        """How many validation and calibration records are copies of training records, and calibration records of
        validation records (by record digest, :meth:`digests`)."""
        parts = self.parts()
        train = set(self.digests("train"))
        val = self.digests("val")
        found = [Overlap("validation records", "training records", count_in(val, train), len(val))]
        if "calib" in parts:
            calib = self.digests("calib")
            found.append(Overlap("calibration records", "training records", count_in(calib, train), len(calib)))
            found.append(Overlap("calibration records", "validation records", count_in(calib, set(val)), len(calib)))
        return found
