"""The label caches of ``ExitLabelData``: where each split's cache lives, which are reused, and labelling the rest.

A label cache is the output of :func:`dyvte.exits.labels.build_label_cache` for one split, written in shards by every
rank (:mod:`dyvte.exits.shards`) and merged by rank 0, whose ``meta.json`` marks it complete (and records the
labelling model's fingerprint, :func:`dyvte.engine.fingerprint.model_fingerprint`, which the heads trained on it
carry). Caches live under ``<repo>/runs/label-cache`` by default (ignored by git), one folder per (model files'
contents, and for an adapter its base's too; data and its files' sizes / times, split, samples or held-out indices,
the records' digests, agree, loss_ratio) (:func:`cache_path`); a later run with the same key reuses the folder and
says so in the log (:func:`missing_caches`). A cache labelled by other weights is never reused: the key reads the
model files (a sample of the large ones), without loading the model. The records' digests
(:mod:`dyvte.data.fingerprints`) hold their images' bytes, so images changed under their old names give a new cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import lightning as L

from dyvte.data.formats import parse_columns
from dyvte.data.prompts import attach_prompt_template
from dyvte.demo import demo_checkpoint_dir
from dyvte.engine.fingerprint import files_digest, model_fingerprint
from dyvte.engine.registry import resolve
from dyvte.exits.labels import LABEL_FORMAT
from dyvte.train.options import DataSource, LabelOptions
from dyvte.train.splits import Split, SplitPlan
from dyvte.utils.io import write_text_atomic

__all__ = ["LabelProgress", "cache_path", "format_duration", "label_missing", "missing_caches", "model_files_digest"]

logger = logging.getLogger(__name__)


def _files_stamp(data: str) -> list[str]:
    """Sizes and modification times of a records file or directory (an edited file must not reuse old labels)."""
    if data == "demo":
        return []
    path = Path(data)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [f"{p.relative_to(path) if p != path else p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]


def model_files_digest(model: str, depth: int = 0) -> str:
    """The content digest of what :func:`dyvte.data.sources.load_model` loads for ``model`` (``"demo"`` or a
    directory): its files (:func:`dyvte.engine.fingerprint.files_digest`) and, for a peft adapter, its base's, named
    by ``adapter_config.json`` (an adapter on other base weights labels differently)."""
    directory = demo_checkpoint_dir("demo-mllm") if model == "demo" else Path(model)
    digest = files_digest(directory)
    adapter = directory / "adapter_config.json"
    if not adapter.is_file():
        return digest
    base = json.loads(adapter.read_text()).get("base_model_name_or_path")
    if not base or depth > 8:
        return digest
    return f"{digest}+{model_files_digest(base, depth + 1)}"


def cache_path(
    root: Path, source: DataSource, labels: LabelOptions, part: Split, split_seed: int, records: str | None = None
) -> Path:
    """The folder of ``part``'s label cache under ``root``, named by a digest of everything the labels depend on.

    The model enters the key by its files' contents (:func:`model_files_digest`; an adapter's base too), beside its
    path and weight files' sizes and times.

    Args:
        root: the folder of all label caches.
        source: the model and the records options.
        labels: the labelling options (``agree``, ``loss_ratio`` and ``visual_inputs`` enter the key).
        part: the split.
        split_seed: the held-out split's seed (in the folder name of a held-out split).
        records: one digest of the split's records (:func:`dyvte.data.fingerprints.combined_digest` of their
            question, answer, context and image bytes), when known.

    Returns:
        ``<root>/<split>-<start>+<samples>-<digest>``, or ``<root>/<name>-<n>-of-<total>-seed<seed>-<digest>`` for a
        split held out of the training records.
    """
    model_dir = demo_checkpoint_dir("demo-mllm") if source.model == "demo" else Path(source.model)
    weights = sorted(model_dir.glob("*.safetensors"))
    stamp = [f"{w.name}:{w.stat().st_size}:{int(w.stat().st_mtime)}" for w in weights]
    key = [str(model_dir.resolve()), stamp, part.data, _files_stamp(part.data), part.split, part.samples]
    key += [labels.agree, labels.loss_ratio, LABEL_FORMAT, part.start, model_files_digest(source.model)]
    options = {
        "image_folder": str(Path(source.image_folder).resolve()) if source.image_folder else None,
        "columns": parse_columns(source.columns) or None,
        "skip_bad_rows": source.skip_bad_rows,
        "prompt_template": source.prompt_template,
        "visual_inputs": labels.visual_inputs,  # caches with the visual tokens' pooled states too
    }
    options = {k: v for k, v in options.items() if v not in (None, False)}
    if options:  # only when given, so that existing caches keep their keys
        key.append(options)
    if part.indices is not None:
        key.append(part.indices)
    if records is not None:
        key.append(records)
    digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:12]
    if part.indices is None:
        return root / f"{part.split}-{part.start}+{part.samples}-{digest}"
    return root / f"{part.name}-{len(part.indices)}-of-{part.total}-seed{split_seed}-{digest}"


def missing_caches(caches: Mapping[Path, Split], relabel: bool) -> dict[Path, Split]:
    """The label caches of ``caches`` to build (all of them with ``relabel``); logs the ones reused."""
    todo: dict[Path, Split] = {}
    for path, part in caches.items():
        if (path / "meta.json").is_file() and not relabel:
            labelled = json.loads((path / "meta.json").read_text()).get("samples")
            logger.info(
                "reusing the cached labels of %s %s records (%s [%s]) in %s (to label again, delete that folder or "
                "pass relabel=True, i.e. --data.labels.relabel true)",
                f"{labelled:,}" if isinstance(labelled, int) else labelled,
                SPLIT_NAMES.get(part.name, part.name),
                part.data,
                part.split,
                path,
            )
        else:
            todo[path] = part
    return todo


def _barrier(trainer: L.Trainer | None) -> None:
    if trainer is not None and trainer.world_size > 1:
        trainer.strategy.barrier()


def label_missing(
    todo: Mapping[Path, Split],
    plan: SplitPlan,
    labels: LabelOptions,
    rank: int,
    world: int,
    trainer: L.Trainer | None = None,
) -> None:
    """Label the caches of ``todo``: this rank's shards of each (:func:`dyvte.exits.shards.label_shards`), then rank 0
    merges them and writes ``meta.json``, which marks a cache complete.

    Args:
        todo: the caches to build (:func:`missing_caches`), by folder.
        plan: the splits, which read their records.
        labels: the labelling options.
        rank: this process's global rank.
        world: the number of ranks, each labelling its own shards.
        trainer: the attached trainer (its device and barrier), if any.
    """
    from dyvte.data.sources import load_model
    from dyvte.exits.shards import label_shards, merge_shards, missing_shards, shard_dir, shard_ranges

    source = plan.source
    if rank == 0:
        for path in todo:
            if path.exists():  # relabel, or a merge cut short: replace it, never write over it
                logger.info("removing the old label cache %s before labelling again", path)
                shutil.rmtree(path)
            if labels.relabel and shard_dir(path, labels.shard_size).exists():
                shutil.rmtree(shard_dir(path, labels.shard_size))
    _barrier(trainer)
    model, processor = load_model(source.model)
    if trainer is not None:  # each rank labels on its own device (a GPU under DDP on GPUs)
        model = model.to(trainer.strategy.root_device)
    attach_prompt_template(processor, source.prompt_template)
    spec = resolve(model)
    fingerprint = model_fingerprint(model, processor)  # with the prompt template: the heads trained here carry it
    jobs = [(path, part, plan.records(part)) for path, part in todo.items()]
    mine = {  # the records this rank still labels, per cache (finished shards of a killed run are kept)
        path: sum(
            len(shard_ranges(len(records), labels.shard_size)[i])
            for i in missing_shards(shard_dir(path, labels.shard_size), len(records), labels.shard_size)
            if i % world == rank
        )
        for path, part, records in jobs
    }
    progress = LabelProgress(
        sum(mine.values()),
        ", ".join(f"{mine[path]:,} {SPLIT_NAMES.get(part.name, part.name)}" for path, part, _ in jobs),
        enabled=rank == 0,
    )
    for path, part, records in jobs:
        shards = shard_dir(path, labels.shard_size)
        logger.info(
            "labelling %s %s records (%s [%s]%s; rank %d of %d, shards of %d in %s) into the label cache %s",
            f"{mine[path]:,}",
            SPLIT_NAMES.get(part.name, part.name),
            part.data,
            part.split,
            "" if part.indices is None else f", held out of its {part.total:,} records",
            rank,
            world,
            labels.shard_size,
            shards,
            path,
        )
        start = time.perf_counter()
        try:
            label_shards(
                model,
                processor,
                records,
                shards,
                shard_size=labels.shard_size,
                rank=rank,
                world_size=world,
                batch_size=labels.batch_size,
                agree=labels.agree,
                loss_ratio=labels.loss_ratio,
                on_batch=progress.update,
                visual_inputs=labels.visual_inputs,
            )
        except BaseException:
            progress.close()
            raise
        seconds = time.perf_counter() - start
        _barrier(trainer)
        if rank == 0:
            cache = merge_shards(shards, path, len(records), labels.shard_size)
            meta = {
                "model_type": spec.model_type,
                "hidden_size": spec.text_config.hidden_size,
                "num_layers": spec.num_layers,
                "model_fingerprint": fingerprint,
                "samples": len(cache),
                "seconds": seconds,
                "ms_per_sample": 1e3 * seconds * world / len(cache),
                "ranks": world,
                "source_indices": part.indices,
            }
            write_text_atomic(path / "meta.json", json.dumps(meta, indent=2) + "\n")  # marks it complete
            logger.info(
                "labelled %s %s records in %.1f s on %d rank(s); label cache written to %s",
                f"{len(cache):,}",
                SPLIT_NAMES.get(part.name, part.name),
                seconds,
                world,
                path,
            )
        _barrier(trainer)
    progress.close()


#: what each split is for, in the log
SPLIT_NAMES = {"train": "training", "val": "validation", "calib": "calibration"}


class LabelProgress:
    """One progress bar (with its ETA) over every record a run labels, and, after the second batch, the estimate of the
    whole labelling measured on it: "labelling 9,000 records (...) ≈ 1.2 min here".

    Args:
        total: the records to label.
        what: the records by split, for the estimate's line.
        enabled: show the bar and log the estimate (rank 0).
    """

    def __init__(self, total: int, what: str, enabled: bool = True) -> None:
        from tqdm.auto import tqdm

        self.total, self.what, self.done, self.seconds = total, what, 0, 0.0
        self.batches, self.estimated = 0, False
        self.enabled = enabled and total > 0
        self._bar = tqdm(total=total, desc="labels", unit="record", disable=not self.enabled, smoothing=0.1)

    def update(self, records: int, seconds: float) -> None:
        """Count a labelled batch of ``records`` that took ``seconds``; the estimate is logged after the second batch
        (the first pays one-off costs: it measured 5-7x slower on the demo) or after the first when it is all."""
        self.done += records
        self.seconds += seconds
        self.batches += 1
        if self.enabled and not self.estimated and (self.batches == 2 or self.done >= self.total):
            self.estimated = True
            per_record = seconds / max(records, 1)
            logger.info(
                "labelling %s records (%s) ≈ %s here (measured on batch %d, %d records: %.1f ms per record)",
                f"{self.total:,}",
                self.what,
                format_duration(self.seconds + (self.total - self.done) * per_record),
                self.batches,
                records,
                1e3 * per_record,
            )
        self._bar.update(records)

    def close(self) -> None:
        """Close the bar (idempotent)."""
        self._bar.close()


def format_duration(seconds: float) -> str:
    """``"42 s"``, ``"3.5 min"`` or ``"2.1 h"``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
