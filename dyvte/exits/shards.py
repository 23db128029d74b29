"""Sharded, resumable, streaming label caches: every rank labels its own shards, written as they complete.

The records of a split (a memory-mapped ``datasets.Dataset``) are cut into shards of ``shard_size`` consecutive records;
shard ``i`` belongs to rank ``i % world_size``. Each shard is labelled with :func:`dyvte.exits.labels.build_label_cache`
(batches of ``batch_size`` records from the shard's start, so a shard's batches, and therefore its numbers, do not
depend on how many ranks there are), its ``index`` column set to the records' positions in the split, and saved under
``<cache>.shards-<shard_size>/shard-NNNNN`` through a temporary folder and one ``rename``: a shard folder either is
complete or does not exist. A killed run leaves finished shards in place and the next run labels only the missing ones.
:func:`merge_shards` concatenates them in order into the cache folder (memory-mapped, written in chunks) and removes the
shard folder.

Only one shard's columns are in memory at a time, and records are read from disk batch by batch, so memory does
not grow with the number of records (docs/design.md §2, "DyVTE labels").
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from torch import nn

from dyvte.data.errors import DataError
from dyvte.utils.checks import check_positive_int

__all__ = ["label_shards", "merge_shards", "missing_shards", "shard_dir", "shard_ranges"]

logger = logging.getLogger(__name__)

SHARD_PREFIX = "shard-"


def shard_dir(cache: Path, shard_size: int) -> Path:
    """Where the shards of the label cache ``cache`` are kept while it is being built: ``<cache>.shards-<size>``
    (the size in the name: shards of another size cover other records and are never mixed in)."""
    return cache.with_name(f"{cache.name}.shards-{shard_size}")


def shard_ranges(num_records: int, shard_size: int) -> list[range]:
    """The record ranges of the shards of ``num_records`` records (the last one may be shorter)."""
    check_positive_int("shard_size", shard_size)
    return [range(s, min(s + shard_size, num_records)) for s in range(0, num_records, shard_size)]


def _shard_path(folder: Path, index: int) -> Path:
    return folder / f"{SHARD_PREFIX}{index:05d}"


def missing_shards(folder: Path, num_records: int, shard_size: int) -> list[int]:
    """Indices of the shards not yet on disk under ``folder``."""
    return [i for i in range(len(shard_ranges(num_records, shard_size))) if not _shard_path(folder, i).is_dir()]


def label_shards(
    model: nn.Module,
    processor,
    records,
    folder: Path,
    *,
    shard_size: int = 1024,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 32,
    agree: float = 0.99,
    loss_ratio: float = 1.03,
    progress: bool = False,
    on_batch: Callable[[int, float], None] | None = None,
    visual_inputs: bool = False,
) -> list[int]:
    """Label this rank's shards of ``records`` that are not on disk yet, writing each as soon as it is done.

    Args:
        model: the frozen MLLM.
        processor: its processor.
        records: the split's records (``datasets.Dataset``; read one shard at a time).
        folder: the shard folder (:func:`shard_dir` of the cache).
        shard_size: records per shard.
        rank: this process's rank; it labels shards ``rank, rank + world_size, ...``.
        world_size: number of labelling processes.
        batch_size: records per MLLM forward.
        agree: see :func:`dyvte.exits.labels.exit_safe`.
        loss_ratio: see :func:`dyvte.exits.labels.exit_safe`.
        progress: show a progress bar per shard.
        on_batch: called after each labelled batch with its number of records and seconds (one progress bar over
            every shard, :func:`dyvte.train.label_cache.label_missing`).
        visual_inputs: also keep the visual tokens' pooled states (:func:`dyvte.exits.labels.build_label_cache`).

    Returns:
        The indices of the shards this call labelled (finished shards already on disk are skipped).

    Raises:
        DataError: a bad record; the message names the shard and the record's position in the split.
    """
    from dyvte.exits.labels import build_label_cache

    check_positive_int("world_size", world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    folder.mkdir(parents=True, exist_ok=True)
    ranges = shard_ranges(len(records), shard_size)
    done: list[int] = []
    for index in range(rank, len(ranges), world_size):
        path = _shard_path(folder, index)
        if path.is_dir():
            continue
        part = ranges[index]
        start = time.perf_counter()
        try:
            cache = build_label_cache(
                model,
                processor,
                records.select(part),
                batch_size=batch_size,
                agree=agree,
                loss_ratio=loss_ratio,
                progress=progress,
                on_batch=on_batch,
                visual_inputs=visual_inputs,
            )
        except DataError as error:
            raise DataError(
                f"shard {index} (records {part.start}..{part.stop - 1} of the split; a 'record k' below is record "
                f"{part.start} + k): {error}"
            ) from error
        order = list(cache.column_names)
        feature = cache.features["index"]
        cache = cache.remove_columns("index").add_column("index", list(part), feature=feature).select_columns(order)
        temporary = folder / f".{path.name}.tmp-{os.getpid()}"
        shutil.rmtree(temporary, ignore_errors=True)
        cache.save_to_disk(str(temporary))
        os.replace(temporary, path)  # the shard appears complete, or not at all
        done.append(index)
        seconds = time.perf_counter() - start
        logger.info(
            "rank %d: shard %d/%d (records %d..%d) labelled in %.1f s (%.1f ms/sample) -> %s",
            rank,
            index + 1,
            len(ranges),
            part.start,
            part.stop - 1,
            seconds,
            1e3 * seconds / len(part),
            path,
        )
    return done


def merge_shards(folder: Path, cache: Path, num_records: int, shard_size: int):
    """Concatenate every shard in order into the label cache folder ``cache`` and remove ``folder``.

    Returns:
        The merged ``datasets.Dataset`` (read back from ``cache``).

    Raises:
        FileNotFoundError: a shard is missing (naming it).
    """
    from datasets import concatenate_datasets, load_from_disk

    missing = missing_shards(folder, num_records, shard_size)
    if missing:
        raise FileNotFoundError(f"{folder}: shards {missing} are missing; label them before merging")
    count = math.ceil(num_records / shard_size)
    merged = concatenate_datasets([load_from_disk(str(_shard_path(folder, i))) for i in range(count)])
    if cache.exists():
        shutil.rmtree(cache)
    merged.save_to_disk(str(cache))
    del merged
    shutil.rmtree(folder)
    return load_from_disk(str(cache))
