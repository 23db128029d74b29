"""Training exit heads with Lightning on the frozen MLLM.

``ExitLabelData`` builds (once, every rank labelling its own shards, :mod:`dyvte.exits.shards`) the label cache of
:func:`dyvte.exits.labels.build_label_cache` for a train and a validation split and serves its tensors (or, with
``on_the_fly``, training records labelled afresh at each step, :mod:`dyvte.exits.onthefly`); ``ExitHeadsModule`` holds
only the heads, so Lightning checkpoints never contain the MLLM. Class imbalance: each head's BCE weighs its
positive ("exit") examples by ``n_neg / n_pos`` of that layer in the training labels (``balance=True``), since
early layers are rarely safe and late layers nearly always are.

Label caches live under ``<repo>/runs/label-cache`` by default (ignored by git), one folder per (model weights,
data and its files' sizes / times, split, samples or held-out indices, agree, loss_ratio); a later run with the same
key reuses the folder and says so in the log.

Validation never reuses training records: when it would come from the same records as training (no ``val_data`` and
a single records file or a split-less ``save_to_disk`` directory, or ``val_split == train_split``), a seeded
held-out split is carved from them instead (:func:`held_out_split`), logged and recorded in ``training.json``.
:func:`check_training_budget` and :func:`require_trained` keep the launchers from saving weights that never trained.
:func:`head_validation` and :func:`format_head_table` give the per-head validation summary that ``train/fit.py``
logs and writes to ``training.json``; :func:`quiet_lightning` silences Lightning's known harmless console noise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from datasets import load_from_disk
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MultilabelPrecision, MultilabelRecall

from dyvte.data.formats import parse_columns
from dyvte.data.prompts import attach_prompt_template, check_prompt_template
from dyvte.demo import demo_checkpoint_dir
from dyvte.engine.registry import resolve
from dyvte.exits.labels import LABEL_FORMAT
from dyvte.exits.rules import check_rule, head_targets
from dyvte.policies.exit_heads import ExitHeads, ExitHeadsConfig
from dyvte.utils.checks import check_positive_int
from dyvte.utils.io import write_text_atomic

__all__ = [
    "ExitLabelData",
    "ExitHeadsModule",
    "HeadTensorData",
    "positive_weight",
    "runs_dir",
    "check_output_dir",
    "check_training_budget",
    "default_label_cache_dir",
    "format_head_table",
    "head_validation",
    "held_out_split",
    "quiet_lightning",
    "require_trained",
]

logger = logging.getLogger(__name__)


def default_label_cache_dir() -> Path:
    """Where label caches live unless ``cache_dir`` says otherwise: ``runs/label-cache`` under the working
    directory (the repository's, when a launcher runs as the README says; ``runs/`` is ignored by git)."""
    return runs_dir("label-cache")


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


def _has_splits(data: str) -> bool:
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


def _files_stamp(data: str) -> list[str]:
    """Sizes and modification times of a records file or directory (an edited file must not reuse old labels)."""
    if data == "demo":
        return []
    path = Path(data)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [f"{p.relative_to(path) if p != path else p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]


@dataclass
class _Split:
    """One split to label: records ``split`` of ``data`` (the first ``samples``, or exactly ``indices``)."""

    name: str
    data: str
    split: str
    samples: int | None
    indices: list[int] | None = None  # held-out carving: these records of the source, in this order
    total: int | None = None  # records in the source the split was carved from
    start: int = 0  # first record of ``split`` (calibration follows the validation records)


class ExitLabelData(L.LightningDataModule):
    """Cached exit labels and head inputs of a model on a dataset.

    Args:
        model: ``"demo"`` or a local model directory.
        data: ``"demo"``, a ``save_to_disk`` directory or a ``.json``/``.jsonl``/``.parquet`` records file.
        train_split: split used for training.
        val_split: split used for validation.
        val_data: records for validation when they are not a split of ``data`` (default: ``data``).
        train_samples: records of ``train_split`` to label (``None``: all).
        val_samples: records to label for validation; they are also the reference the calibration Platt-scales
            each head on (:func:`dyvte.exits.rules.certify_thresholds`), so the default, 2,000, gives the late heads,
            whose
            unsafe samples are rare, enough of them. When validation would come from the training records
            themselves (no ``val_data`` and ``data`` a single file or a split-less directory, or ``val_split ==
            train_split``), this many records are held out of them at random (seeded by ``split_seed``) and training
            takes the first ``train_samples`` of the rest; ``None`` holds out ``val_fraction`` of them.
        val_fraction: share of the records held out for validation in that case when ``val_samples`` is ``None``.
        split_seed: seed of the held-out validation sample.
        label_rule: what head j learns (:mod:`dyvte.exits.rules`): ``"agreement"`` (default: withdrawal at j + 1 and at
            every later exit layer gives the full model's answer), ``"kl"`` (answer KL <= ``kl_eta`` there),
            ``"dyvte"`` (the paper's rule, made monotone the same way) or ``"dyvte-layer"`` (the paper's rule at
            j + 1 only). 0.1's ``"layer"`` / ``"monotone"`` still mean ``"dyvte-layer"`` / ``"dyvte"``.
        kl_eta: the ``kl`` rule's bound, in nats.
        calib_samples: records for threshold calibration (:func:`dyvte.exits.rules.certify_thresholds`), disjoint from
            training and validation: the validation split's records right after the first ``val_samples`` (``None``:
            all of them; none left: no calibration, with a warning), or, when validation is held out of the training
            records, that many more records held out with it (``None``: ``calib_fraction`` of them). 0: no
            calibration (the heads keep their single ``threshold``).
        calib_fraction: share of the records held out for calibration in the held-out case when ``calib_samples``
            is ``None``.
        agree: DyVTE agreement threshold (the ``dyvte`` rule).
        loss_ratio: DyVTE loss-ratio threshold (the ``dyvte`` rule).
        batch_size: head-training batch size.
        label_batch_size: rows per MLLM forward while labelling.
        cache_dir: where label caches live (default ``<repo>/runs/label-cache``, see
            :func:`default_label_cache_dir`); one folder per model weights, data, split, samples, agree and loss_ratio.
        relabel: label again even where a cache for the same key exists (it is replaced); without it an existing
            cache is reused, and the log says so with its path.
        image_folder: the folder relative image paths of ``data`` and ``val_data`` are resolved against (default:
            each records file's own folder).
        columns: which source column holds each field (``"image=img,question=q,answer=a"`` or a mapping).
        skip_bad_rows: skip bad records, counted by reason in the log, instead of failing on the first.
        prompt_template: a format string with ``{question}`` for models without a chat template (or to override
            it), e.g. ``"USER: <image>\\n{question} ASSISTANT:"`` (:mod:`dyvte.data.prompts`).
        shard_size: records per label-cache shard. Every rank (``--trainer.devices``) labels its own shards, written
            as they complete; a killed run keeps its finished shards and labels only the rest
            (:mod:`dyvte.exits.shards`).
        on_the_fly: train with fresh labels at every step, the paper's way (:mod:`dyvte.exits.onthefly`): each training
            sample draws one exit layer, full and withdrawn copies run in one forward, and only that layer's head
            learns from it (label rule ``dyvte-layer``; no training label cache, no class balancing). Validation and
            calibration still use label caches.
    """

    def __init__(
        self,
        model: str = "demo",
        data: str = "demo",
        train_split: str = "train",
        val_split: str = "validation",
        val_data: str | None = None,
        train_samples: int | None = 24000,
        val_samples: int | None = 2000,
        label_rule: str = "agreement",
        kl_eta: float = 0.05,
        calib_samples: int | None = None,
        calib_fraction: float = 0.2,
        agree: float = 0.99,
        loss_ratio: float = 1.03,
        batch_size: int = 256,
        label_batch_size: int = 64,
        cache_dir: str | None = None,
        relabel: bool = False,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        image_folder: str | None = None,
        columns: str | dict[str, str] | None = None,
        skip_bad_rows: bool = False,
        prompt_template: str | None = None,
        shard_size: int = 1024,
        on_the_fly: bool = False,
    ) -> None:
        super().__init__()
        try:
            check_rule(label_rule)
        except ValueError as err:
            raise ValueError(f"--data.label_rule: {err}") from None
        if not kl_eta > 0:
            raise ValueError(f"kl_eta (--data.kl_eta) must be > 0, got {kl_eta!r}")
        if calib_samples is not None and (
            isinstance(calib_samples, bool) or not isinstance(calib_samples, int) or calib_samples < 0
        ):
            raise ValueError(f"calib_samples (--data.calib_samples) must be null or an int >= 0, got {calib_samples!r}")
        if not 0.0 < calib_fraction < 1.0:
            raise ValueError(f"calib_fraction (--data.calib_fraction) must be in (0, 1), got {calib_fraction!r}")
        check_positive_int("train_samples (--data.train_samples)", train_samples, optional=True)
        check_positive_int("val_samples (--data.val_samples)", val_samples, optional=True)
        check_positive_int("batch_size (--data.batch_size)", batch_size)
        check_positive_int("label_batch_size (--data.label_batch_size)", label_batch_size)
        check_positive_int("shard_size (--data.shard_size)", shard_size)
        if prompt_template is not None:
            check_prompt_template(prompt_template)
        if on_the_fly and check_rule(label_rule) != "dyvte-layer":
            raise ValueError(
                f"--data.on_the_fly labels one exit layer per sample with the paper's rule at that layer only; pass "
                f"--data.label_rule dyvte-layer (got {label_rule!r})"
            )
        parse_columns(columns)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction (--data.val_fraction) must be in (0, 1), got {val_fraction!r}")
        if not 0.0 <= agree < 1.0:
            raise ValueError(f"agree (--data.agree) must be in [0, 1) (agreement must exceed it), got {agree!r}")
        if not loss_ratio >= 1.0:
            raise ValueError(
                f"loss_ratio (--data.loss_ratio) must be >= 1 (below 1 even a prediction identical to the full "
                f"model's is labelled unsafe), got {loss_ratio!r}"
            )
        self.save_hyperparameters()
        self.tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.columns: dict[str, dict[str, np.ndarray]] = {}  # each split's label-cache columns
        self.meta: dict | None = None
        self._plan: dict[str, _Split] | None = None
        self._source = None  # the records validation is held out of, once loaded
        self._fresh = None  # on_the_fly: (model, processor, generator), loaded on first use on each rank
        self.train_records = None  # on_the_fly: the training records

    # ------------------------------------------------------------------------------------------------ caching
    def _cache_path(self, part: _Split) -> Path:
        hp = self.hparams
        model_dir = demo_checkpoint_dir("demo-mllm") if hp.model == "demo" else Path(hp.model)
        weights = sorted(model_dir.glob("*.safetensors"))
        stamp = [f"{w.name}:{w.stat().st_size}:{int(w.stat().st_mtime)}" for w in weights]
        key = [str(model_dir.resolve()), stamp, part.data, _files_stamp(part.data), part.split, part.samples]
        key += [hp.agree, hp.loss_ratio, LABEL_FORMAT, part.start]
        options = {
            "image_folder": str(Path(hp.image_folder).resolve()) if hp.image_folder else None,
            "columns": parse_columns(hp.columns) or None,
            "skip_bad_rows": hp.skip_bad_rows,
            "prompt_template": hp.prompt_template,
        }
        options = {k: v for k, v in options.items() if v not in (None, False)}
        if options:  # only when given, so that existing caches keep their keys
            key.append(options)
        if part.indices is not None:
            key.append(part.indices)
        digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:12]
        if part.indices is None:
            return self.cache_root / f"{part.split}-{part.start}+{part.samples}-{digest}"
        return self.cache_root / f"{part.name}-{len(part.indices)}-of-{part.total}-seed{hp.split_seed}-{digest}"

    @property
    def cache_root(self) -> Path:
        """The folder that holds this datamodule's label caches."""
        return Path(self.hparams.cache_dir) if self.hparams.cache_dir else default_label_cache_dir()

    def cache_paths(self) -> dict[str, Path]:
        """The label-cache folder of each split: ``{"train": ..., "val": ...}`` (no ``train`` with ``on_the_fly``)."""
        parts = self._splits().items()
        return {
            name: self._cache_path(part) for name, part in parts if not (name == "train" and self.hparams.on_the_fly)
        }

    def held_out(self) -> bool:
        """Whether validation would come from the training records, so that it is held out of them."""
        hp = self.hparams
        if _source_key(hp.val_data or hp.data) != _source_key(hp.data):
            return False
        return hp.train_split == hp.val_split or not _has_splits(hp.data)

    def split_indices(self) -> dict[str, list[int] | None]:
        """The source records of each split when validation is held out of the training records, else ``None``s."""
        return {name: part.indices for name, part in self._splits().items()}

    def split_summary(self) -> dict[str, Any]:
        """Where the training and validation records come from (for ``training.json``)."""
        parts, hp = self._splits(), self.hparams
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
            "seed": hp.split_seed,
            "train_samples": len(train.indices or []),
            "val_samples": len(val.indices),
            "calib_samples": len(calib.indices or []) if calib is not None else 0,
        }

    def _splits(self) -> dict[str, _Split]:
        if self._plan is not None:
            return self._plan
        hp = self.hparams
        train = _Split("train", hp.data, hp.train_split, hp.train_samples)
        val = _Split("val", hp.val_data or hp.data, hp.val_split, hp.val_samples)
        calib = _Split("calib", val.data, val.split, hp.calib_samples, start=hp.val_samples or 0)
        if not self.held_out() and hp.calib_samples != 0:
            options = self.record_options()
            left = None if hp.val_samples is None else _count_records(val.data, val.split, **options) - hp.val_samples
            if hp.calib_samples is None:
                calib.samples = max(left or 0, 0)
                if not calib.samples:
                    logger.warning(
                        "no calibration: no record of %s [%s] is left after the %s validation records (set "
                        "--data.val_samples below the split's size); the heads keep --model.threshold",
                        val.data,
                        val.split,
                        hp.val_samples if hp.val_samples is not None else "(all)",
                    )
            elif left is None or left <= 0:
                raise ValueError(
                    f"--data.calib_samples={hp.calib_samples}: calibration takes the records of {val.data} "
                    f"[{val.split}] after the first --data.val_samples={hp.val_samples}, and none is left; lower "
                    "--data.val_samples, pass --data.calib_samples 0 or null"
                )
            elif left < hp.calib_samples:
                logger.warning(
                    "calibration: only %d records of %s [%s] left after the %d validation records (%d asked for)",
                    left,
                    val.data,
                    val.split,
                    hp.val_samples,
                    hp.calib_samples,
                )
                calib.samples = left
        if self.held_out():
            self._source = self._load(hp.data, hp.train_split)  # every record: the count fixes the split
            total = len(self._source)
            val_count = hp.val_samples or max(1, round(hp.val_fraction * total))
            calib_count = round(hp.calib_fraction * total) if hp.calib_samples is None else hp.calib_samples
            try:
                train.indices, held = held_out_split(
                    total, val_count + calib_count, hp.train_samples, hp.split_seed, hp.val_fraction
                )
            except ValueError as err:
                raise ValueError(
                    f"--data.val_samples={hp.val_samples} (--data.val_fraction={hp.val_fraction}) and "
                    f"--data.calib_samples={hp.calib_samples}: validation and calibration are held out of the {total} "
                    f"records of {hp.data} (no --data.val_data given): {err}; lower them or pass --data.val_data"
                ) from None
            order = np.random.default_rng(hp.split_seed + 1).permutation(len(held))  # val / calib: a random cut
            val.indices = sorted(held[i] for i in order[:val_count])
            calib.indices = sorted(held[i] for i in order[val_count:])
            train.total = val.total = calib.total = total
            logger.info(
                "validation: %d records and calibration: %d records held out at random (seed %d) from the %d records "
                "of %s, disjoint from the %d training records (pass --data.val_data for a separate validation set)",
                len(val.indices),
                len(calib.indices),
                hp.split_seed,
                total,
                hp.data,
                len(train.indices),
            )
        self._plan = {"train": train, "val": val}
        if calib.indices if calib.indices is not None else calib.samples:
            self._plan["calib"] = calib
        return self._plan

    def record_options(self) -> dict[str, Any]:
        """The records options (``image_folder``, ``columns``, ``skip_bad_rows``) for ``load_records``."""
        hp = self.hparams
        return {"image_folder": hp.image_folder, "columns": hp.columns, "skip_bad_rows": hp.skip_bad_rows}

    def _load(self, data: str, split: str, limit: int | None = None):
        from dyvte.data.sources import load_records

        return load_records(data, split, limit, **self.record_options())

    def _records(self, part: _Split):
        if part.indices is None and part.start:
            records = self._load(part.data, part.split, part.start + part.samples)
            return records.select(range(part.start, len(records)))
        if part.indices is None:
            return self._load(part.data, part.split, part.samples)
        source = self._source if self._source is not None else self._load(part.data, part.split)
        return source.select(part.indices)

    def prepare_data(self) -> None:
        """Build the missing label caches (all of them with ``relabel``) and log which ones are reused (rank 0).

        Under a multi-process strategy (``--trainer.devices 2`` ...) labelling waits for :meth:`setup`, where every
        rank labels its own shards.
        """
        if self._world()[1] > 1:
            return
        self._label(*self._world())

    def _world(self) -> tuple[int, int]:
        """``(global rank, world size)`` of the attached trainer (``(0, 1)`` without one)."""
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _barrier(self) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            trainer.strategy.barrier()

    def _todo(self) -> dict[Path, _Split]:
        """The label caches to build; logs the ones reused."""
        todo: dict[Path, _Split] = {}
        for name, part in self._splits().items():
            if name == "train" and self.hparams.on_the_fly:
                continue
            path = self._cache_path(part)
            if (path / "meta.json").is_file() and not self.hparams.relabel:
                labelled = json.loads((path / "meta.json").read_text()).get("samples")
                logger.info(
                    "reusing the cached labels of %s %s samples of %s in %s (to label again, delete that folder "
                    "or pass relabel=True, i.e. --data.relabel true)",
                    labelled,
                    part.split,
                    part.data,
                    path,
                )
            else:
                todo[path] = part
        return todo

    def _label(self, rank: int, world: int) -> None:
        """Label the missing caches: this rank's shards of each (:func:`dyvte.exits.shards.label_shards`), then rank 0
        merges them and writes ``meta.json``, which marks a cache complete."""
        from dyvte.data.sources import load_model
        from dyvte.exits.shards import label_shards, merge_shards, shard_dir

        todo = self._todo()
        if not todo:
            return
        hp = self.hparams
        if rank == 0:
            for path in todo:
                if path.exists():  # relabel, or a merge cut short: replace it, never write over it
                    logger.info("removing the old label cache %s before labelling again", path)
                    shutil.rmtree(path)
                if hp.relabel and shard_dir(path, hp.shard_size).exists():
                    shutil.rmtree(shard_dir(path, hp.shard_size))
        self._barrier()
        model, processor = load_model(hp.model)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:  # each rank labels on its own device (a GPU under DDP on GPUs)
            model = model.to(trainer.strategy.root_device)
        attach_prompt_template(processor, hp.prompt_template)
        spec = resolve(model)
        for path, part in todo.items():
            if part.indices is None:
                count, kind = part.samples or "all", part.split
            else:
                kind = {"val": "held-out validation", "calib": "held-out calibration"}.get(part.name, "training")
                count = len(part.indices)
            records = self._records(part)
            shards = shard_dir(path, hp.shard_size)
            logger.info(
                "labelling %s %s samples of %s (rank %d of %d, shards of %d in %s) into the label cache %s",
                count,
                kind,
                part.data,
                rank,
                world,
                hp.shard_size,
                shards,
                path,
            )
            start = time.perf_counter()
            label_shards(
                model,
                processor,
                records,
                shards,
                shard_size=hp.shard_size,
                rank=rank,
                world_size=world,
                batch_size=hp.label_batch_size,
                agree=hp.agree,
                loss_ratio=hp.loss_ratio,
            )
            seconds = time.perf_counter() - start
            self._barrier()
            if rank == 0:
                cache = merge_shards(shards, path, len(records), hp.shard_size)
                meta = {
                    "model_type": spec.model_type,
                    "hidden_size": spec.text_config.hidden_size,
                    "num_layers": spec.num_layers,
                    "samples": len(cache),
                    "seconds": seconds,
                    "ms_per_sample": 1e3 * seconds * world / len(cache),
                    "ranks": world,
                    "source_indices": part.indices,
                }
                write_text_atomic(path / "meta.json", json.dumps(meta, indent=2) + "\n")  # marks it complete
                logger.info(
                    "labelled %d %s samples in %.1f s on %d rank(s); label cache written to %s",
                    len(cache),
                    part.split,
                    seconds,
                    world,
                    path,
                )
            self._barrier()

    def setup(self, stage: str | None = None) -> None:
        """Load the caches into tensors: features ``(N, L-1, 2d)`` and targets ``(N, L-1)`` (under a multi-process
        strategy, every rank first labels its shards of the missing caches)."""
        if self.tensors:
            return
        if self._world()[1] > 1:
            self._label(*self._world())
        for name, part in self._splits().items():
            if name == "train" and self.hparams.on_the_fly:
                self.train_records = self._records(part)
                continue
            path = self._cache_path(part)
            if not (path / "meta.json").is_file():
                raise FileNotFoundError(f"label cache {path} is missing: prepare_data() did not run")
            columns = load_from_disk(str(path)).with_format("numpy")[:]
            self.meta = json.loads((path / "meta.json").read_text())
            self.columns[name] = columns
            self.tensors[name] = (torch.tensor(columns["features"], dtype=torch.float32), self.targets(columns))

    def targets(self, columns: Mapping[str, np.ndarray]) -> torch.Tensor:
        """Head targets ``(N, L-1)`` of a label cache's columns under ``label_rule``
        (``dyvte.exits.rules.head_targets``)."""
        return head_targets(columns, self.hparams.label_rule, self.hparams.kl_eta)

    def heads_config(self, head_size: int | None, threshold: float) -> ExitHeadsConfig:
        """The heads' config for the labelled model."""
        self.setup()
        meta = self.meta
        return ExitHeadsConfig(meta["model_type"], meta["hidden_size"], meta["num_layers"], head_size, threshold)

    def positive_weight(self) -> torch.Tensor:
        """``(L-1,)`` n_neg / n_pos per head in the training targets (1 where a head has no positives; all 1 with
        ``on_the_fly``, whose labels are not known in advance)."""
        if self.hparams.on_the_fly:
            logger.info("on-the-fly labels: no class balancing (the labels are not known before training)")
            return torch.ones(self.meta["num_layers"] - 1)
        return positive_weight(self.tensors["train"][1])

    def train_dataloader(self) -> DataLoader:
        if self.hparams.on_the_fly:  # batches of records (each rank its own under DDP), labelled in training_step
            return DataLoader(self.train_records, batch_size=self.hparams.batch_size, shuffle=True, collate_fn=list)
        return DataLoader(TensorDataset(*self.tensors["train"]), batch_size=self.hparams.batch_size, shuffle=True)

    def fresh_batch(self, records: list[dict], step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """On-the-fly ``(features, targets, mask)`` of a batch of training records (``onthefly.fresh_labels``);
        exit layers drawn from a generator seeded by ``split_seed``, the rank and ``step``."""
        from dyvte.data.sources import load_model
        from dyvte.exits.onthefly import draw_layers, fresh_labels

        if self._fresh is None:  # on this rank's device (the labelling model never enters the checkpoint)
            model, processor = load_model(self.hparams.model, prompt_template=self.hparams.prompt_template)
            trainer = getattr(self, "trainer", None)
            self._fresh = (model.to(trainer.strategy.root_device) if trainer is not None else model), processor
        model, processor = self._fresh
        rank = self._world()[0]
        generator = torch.Generator().manual_seed(self.hparams.split_seed * 1_000_003 + rank * 7919 + step)
        layers = draw_layers(resolve(model).num_layers, len(records), generator)
        hp = self.hparams
        return fresh_labels(model, processor, records, layers, agree=hp.agree, loss_ratio=hp.loss_ratio)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.tensors["val"]), batch_size=self.hparams.batch_size)


class HeadTensorData(L.LightningDataModule):
    """Head inputs and targets already in memory (offline studies such as ``train/ablate_heads.py``).

    Args:
        train: ``(features (N, L-1, w), targets (N, L-1))`` for training.
        val: the same for validation.
        config: the heads' config (its ``head_size`` / ``threshold`` are replaced by the module's).
        batch_size: head-training batch size.
    """

    def __init__(
        self,
        train: tuple[torch.Tensor, torch.Tensor],
        val: tuple[torch.Tensor, torch.Tensor],
        config: ExitHeadsConfig,
        batch_size: int = 256,
    ) -> None:
        super().__init__()
        self.tensors = {"train": train, "val": val}
        self.config = config
        self.batch_size = batch_size

    def heads_config(self, head_size: int | None, threshold: float) -> ExitHeadsConfig:
        """The heads' config with the module's head size and threshold."""
        return dataclasses.replace(self.config, head_size=head_size, threshold=threshold)

    def positive_weight(self) -> torch.Tensor:
        """``(L-1,)`` n_neg / n_pos per head in the training targets."""
        return positive_weight(self.tensors["train"][1])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.tensors["train"]), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.tensors["val"]), batch_size=self.batch_size)


def positive_weight(targets: torch.Tensor) -> torch.Tensor:
    """``(L-1,)`` n_neg / n_pos per head of ``(N, L-1)`` 0/1 targets (1 where a head has no positives)."""
    positives = targets.sum(0)
    return torch.where(positives > 0, (len(targets) - positives) / positives.clamp(min=1), torch.ones_like(positives))


class ExitHeadsModule(L.LightningModule):
    """Trains :class:`ExitHeads` on cached labels; the module holds the heads and nothing else.

    Args:
        head_size: hidden width of each head (``None``: ``max(128, d // 32)``).
        threshold: P(exit) threshold saved with the heads and used for the validation metrics.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        balance: weigh each head's positives by its n_neg / n_pos.
    """

    def __init__(
        self,
        head_size: int | None = None,
        threshold: float = 0.5,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        balance: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("head_size (--model.head_size)", head_size, optional=True)
        if not 0.0 <= threshold <= 1.0:  # checked here, not after labelling when the heads are shaped
            raise ValueError(f"threshold (--model.threshold) must be a P(exit) in [0, 1], got {threshold!r}")
        if not lr > 0:
            raise ValueError(f"lr (--model.lr) must be > 0, got {lr!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay (--model.weight_decay) must be >= 0, got {weight_decay!r}")
        self.save_hyperparameters()
        self.heads: ExitHeads | None = None

    def setup(self, stage: str) -> None:
        """Shape the heads from the datamodule's model (before a checkpoint is restored)."""
        if self.heads is not None:
            return
        data: ExitLabelData = self.trainer.datamodule
        self.heads = ExitHeads(data.heads_config(self.hparams.head_size, self.hparams.threshold))
        weight = data.positive_weight() if self.hparams.balance else torch.ones(self.heads.num_heads)
        self.register_buffer("pos_weight", weight, persistent=False)
        n = self.heads.num_heads
        self.precision_metric = MultilabelPrecision(n, threshold=self.hparams.threshold, average=None)
        self.recall_metric = MultilabelRecall(n, threshold=self.hparams.threshold, average=None)

    def _loss(self, features: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.heads(features)  # (B, L-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.pos_weight)
        return loss, logits

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor] | list[dict], batch_idx: int) -> torch.Tensor:
        if isinstance(batch, list) and isinstance(batch[0], Mapping):  # records (--data.on_the_fly): fresh labels
            features, targets, mask = (
                t.to(self.device) for t in self.trainer.datamodule.fresh_batch(batch, self.global_step)
            )
            logits = self.heads(features)  # (B, L-1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, targets, pos_weight=self.pos_weight, reduction="none"
            )
            loss = (loss * mask).sum() / mask.sum()
            self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
            return loss
        loss, _ = self._loss(*batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, logits = self._loss(*batch)
        probs = torch.sigmoid(logits)
        self.precision_metric.update(probs, batch[1].long())
        self.recall_metric.update(probs, batch[1].long())
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        precision, recall = self.precision_metric.compute(), self.recall_metric.compute()
        for j in range(self.heads.num_heads):  # head j decides exit layer j + 1
            self.log(f"val/precision_exit{j + 1}", precision[j], sync_dist=True)
            self.log(f"val/recall_exit{j + 1}", recall[j], sync_dist=True)
        self.precision_metric.reset()
        self.recall_metric.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.heads.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


# --------------------------------------------------------------------------------------------- training budget
#: trainer options whose value 0 means "no optimizer step": refused before any work
NO_STEP_OPTIONS = ("max_epochs", "max_steps", "limit_train_batches")


def runs_dir(job: str) -> Path:
    """``runs/<job>`` under the working directory: where a launcher writes by default (the launchers run from the
    repository root, where ``runs/`` is ignored by git; never a tracked file)."""
    return Path.cwd() / "runs" / job


def check_training_budget(trainer: Mapping[str, Any], what: str) -> None:
    """Refuse, before anything is loaded or labelled, a trainer configuration that runs no optimizer step.

    Args:
        trainer: the trainer's options (``LightningCLI``'s ``config["trainer"]``).
        what: what would be saved untrained, for the message (e.g. ``"exit heads"``).

    Raises:
        ValueError: naming each of ``--trainer.max_epochs`` / ``max_steps`` / ``limit_train_batches`` that is 0.
    """
    zero = [
        f"--trainer.{name}={trainer.get(name):g}"  # 0 and 0.0 (jsonargparse may give either) read the same
        for name in NO_STEP_OPTIONS
        if not isinstance(trainer.get(name), (bool, type(None))) and trainer.get(name) == 0
    ]
    if zero:
        raise ValueError(
            f"{', '.join(zero)}: training would run no optimizer step, and untrained {what} would be saved as if "
            "trained; give a positive value"
        )


def check_output_dir(option: str, path: str | None) -> None:
    """Raise ``ValueError`` when ``path`` (the value of ``option``) is an existing file, not a directory."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"{option} {path} is an existing file, not a directory")


def require_trained(trainer: L.Trainer, what: str, output: Path) -> None:
    """Raise unless ``trainer`` ran at least one optimizer step (call it after ``fit``, before saving).

    Raises:
        RuntimeError: ``trainer.global_step == 0``; the message names the options that bound training.
    """
    if trainer.global_step > 0:
        return
    raise RuntimeError(
        f"training ran no optimizer step (global_step 0 with --trainer.max_epochs={trainer.max_epochs}, "
        f"--trainer.max_steps={trainer.max_steps}, --trainer.limit_train_batches={trainer.limit_train_batches}, "
        f"{trainer.num_training_batches} training batches per epoch; check those and --trainer.max_time): untrained "
        f"{what} are not written to {output}"
    )


# --------------------------------------------------------------------------------------------- validation summary
def head_validation(
    heads: ExitHeads, features: torch.Tensor, targets: torch.Tensor, threshold: float | None = None
) -> list[dict[str, float | int | None]]:
    """How each head's "exit" decision compares with the labels, at the heads' threshold.

    A head fires for a sample when its logit is ``>=`` its logit threshold (the rule used at inference).

    Args:
        heads: the trained heads.
        features: ``(N, L-1, 2d)`` head inputs (the validation label cache's ``features``).
        targets: ``(N, L-1)`` 0/1 targets of the heads (:meth:`ExitLabelData.targets`).
        threshold: P(exit) threshold of every head (default: the heads' own, calibrated per head when they are,
            :meth:`ExitHeads.exit_thresholds`).

    Returns:
        One dict per head ``j``: ``head`` (j), ``exit_layer`` (j + 1), ``labelled_safe`` (fraction of samples whose
        target is 1), ``exit_rate`` (fraction of samples for which the head fires), ``precision`` (of the firings,
        the fraction labelled safe; ``None`` when the head never fires) and ``recall`` (of the samples labelled safe,
        the fraction it fires for; ``None`` when none is labelled safe).
    """
    thresholds = heads.exit_logits(threshold)  # (L-1,) logit thresholds
    with torch.no_grad():
        fires = heads(features).float() >= thresholds[None]  # (N, L-1)
    safe = targets.bool()
    rows: list[dict[str, float | int | None]] = []
    for j in range(heads.num_heads):
        fired, positive = int(fires[:, j].sum()), int(safe[:, j].sum())
        hits = int((fires[:, j] & safe[:, j]).sum())
        rows.append(
            {
                "head": j,
                "exit_layer": j + 1,
                "labelled_safe": positive / len(safe),
                "exit_rate": fired / len(safe),
                "precision": hits / fired if fired else None,
                "recall": hits / positive if positive else None,
            }
        )
    return rows


def format_head_table(rows: list[dict[str, float | int | None]]) -> str:
    """A Markdown table of :func:`head_validation`'s rows (``-`` where a value is undefined)."""

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [
        "| head | exit layer | labelled safe | exit rate | precision | recall |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        values = " | ".join(cell(r[k]) for k in ("labelled_safe", "exit_rate", "precision", "recall"))
        lines.append(f"| {r['head']} | {r['exit_layer']} | {values} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ console noise
#: Lightning's advertisements, logged at INFO through ``rank_zero_info`` whenever no LitLogger is configured
#: (``trainer/connectors/logger_connector/logger_connector.py``) or Lightning adds its default ModelCheckpoint
#: (``trainer/connectors/callback_connector.py``).
LIGHTNING_TIPS = re.compile(r"💡 Tip: For seamless cloud (logging and experiment tracking|uploads and versioning)")
#: torch >= 2.10 deprecates ``LeafSpec``; Lightning's ``utilities/_pytree.py`` still builds one for each
#: ``CombinedLoader`` (every fit), which torch reports as this FutureWarning attributed to that Lightning module.
PYTREE_LEAFSPEC = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
PYTREE_MODULE = r"lightning\.pytorch\.utilities\._pytree\Z"
#: the loggers that ``rank_zero_info`` writes through (lightning_utilities' ``log``, set by each package on import)
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropLightningTips(logging.Filter):
    """Drops the records whose message is one of :data:`LIGHTNING_TIPS` and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and LIGHTNING_TIPS.match(record.msg))


def quiet_lightning() -> None:
    """Silence Lightning's known harmless console messages at their source (idempotent).

    * the "💡 Tip: ... litlogger / litmodels" advertisements: a filter on the logger ``rank_zero_info`` writes
      through, matching only those two messages;
    * the ``LeafSpec`` deprecation FutureWarning: ignored only when raised from ``lightning.pytorch.utilities._pytree``
      with that exact message (the call is in Lightning, not in dyvte).

    Lightning's "No seed found, seed set to 0" warning (printed next to "Seed set to 0") is not silenced here: the
    launchers pass an explicit seed (``seed_everything_default=0``), so ``seed_everything`` has nothing to warn about.
    """
    for name in RANK_ZERO_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningTips) for f in log.filters):
            log.addFilter(_DropLightningTips())
    warnings.filterwarnings("ignore", message=PYTREE_LEAFSPEC, category=FutureWarning, module=PYTREE_MODULE)
