"""The data modules that feed exit-head training: cached exit labels of a model on a dataset, or tensors in memory.

``ExitLabelData`` builds (once, every rank labelling its own shards, :mod:`dyvte.train.label_cache`) the label cache
of :func:`dyvte.exits.labels.build_label_cache` for a train, a validation and a calibration split
(:mod:`dyvte.train.splits`) and serves its tensors (or, with ``on_the_fly``, training records labelled afresh at each
step, :mod:`dyvte.exits.onthefly`). Its options come in three groups (:mod:`dyvte.train.options`): ``source``,
``splits`` and ``labels``; on ``train/fit.py`` they read ``--data.source.model DIR``, ``--data.splits.val_samples
2000``, ``--data.labels.rule agreement``, beside ``--data.batch_size``. ``HeadTensorData`` serves head inputs
already in memory (offline studies).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from datasets import load_from_disk
from torch.utils.data import DataLoader, TensorDataset

from dyvte.data.fingerprints import combined_digest
from dyvte.engine.registry import resolve
from dyvte.exits.rules import head_targets
from dyvte.policies.exit_heads import ExitHeadsConfig, head_inputs
from dyvte.train.label_cache import cache_path, label_missing, missing_caches
from dyvte.train.module import positive_weight
from dyvte.train.options import DataSource, LabelOptions, SplitSizes
from dyvte.train.runs import default_label_cache_dir
from dyvte.train.splits import SplitPlan
from dyvte.utils.checks import check_positive_int

__all__ = ["ExitLabelData", "HeadTensorData"]

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = DataSource()
DEFAULT_SPLITS = SplitSizes()
DEFAULT_LABELS = LabelOptions()


class ExitLabelData(L.LightningDataModule):
    """Cached exit labels and head inputs of a model on a dataset.

    Args:
        source: the model that labels and the records (``--data.source.*``; :class:`DataSource`).
        splits: how many records train, validate and calibrate, and the held-out split's seed
            (``--data.splits.*``; :class:`SplitSizes`).
        labels: the label rule and how the label caches are built (``--data.labels.*``; :class:`LabelOptions`).
        batch_size: head-training batch size.

    Raises:
        ValueError: ``batch_size`` < 1 (each option group checks its own values when it is built).
    """

    def __init__(
        self,
        source: DataSource = DEFAULT_SOURCE,
        splits: SplitSizes = DEFAULT_SPLITS,
        labels: LabelOptions = DEFAULT_LABELS,
        batch_size: int = 256,
    ) -> None:
        super().__init__()
        check_positive_int("batch_size (--data.batch_size)", batch_size)
        self.save_hyperparameters()
        self.source, self.splits, self.labels, self.batch_size = source, splits, labels, batch_size
        self.plan = SplitPlan(source, splits, digest_dir=self.cache_root / "record-digests")
        self.tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.columns: dict[str, dict[str, np.ndarray]] = {}  # each split's label-cache columns
        self.meta: dict | None = None
        self._fresh = None  # on_the_fly: (model, processor), loaded on first use on each rank
        self.train_records = None  # on_the_fly: the training records

    # ------------------------------------------------------------------------------------------------ splits
    def held_out(self) -> bool:
        """Whether validation would come from the training records, so that it is held out of them."""
        return self.plan.held_out()

    def split_indices(self) -> dict[str, list[int] | None]:
        """The source records of each split when validation is held out of the training records, else ``None``s."""
        return self.plan.indices()

    def split_summary(self) -> dict[str, Any]:
        """Where the training and validation records come from (for ``training.json``)."""
        return self.plan.summary()

    # ------------------------------------------------------------------------------------------------ caching
    @property
    def cache_root(self) -> Path:
        """The folder that holds this datamodule's label caches."""
        return Path(self.labels.cache_dir) if self.labels.cache_dir else default_label_cache_dir()

    def cache_paths(self) -> dict[str, Path]:
        """The label-cache folder of each split: ``{"train": ..., "val": ...}`` (no ``train`` with ``on_the_fly``)."""
        return {
            name: cache_path(
                self.cache_root,
                self.source,
                self.labels,
                part,
                self.splits.split_seed,
                records=combined_digest(self.plan.digests(name)),  # an image changed under its old name: new cache
            )
            for name, part in self.plan.parts().items()
            if not (name == "train" and self.labels.on_the_fly)
        }

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

    def _label(self, rank: int, world: int) -> None:
        """Label the missing caches (:func:`dyvte.train.label_cache.label_missing`)."""
        parts = self.plan.parts()
        todo = missing_caches({path: parts[name] for name, path in self.cache_paths().items()}, self.labels.relabel)
        if todo:
            label_missing(todo, self.plan, self.labels, rank, world, getattr(self, "trainer", None))

    # ------------------------------------------------------------------------------------------------ serving
    def setup(self, stage: str | None = None) -> None:
        """Load the caches into tensors: head inputs ``(N, L-1, 2d)`` (``4d`` with ``visual_inputs``) and targets
        ``(N, L-1)`` (under a multi-process strategy, every rank first labels its shards of the missing caches)."""
        if self.tensors:
            return
        if self._world()[1] > 1:
            self._label(*self._world())
        paths = self.cache_paths()
        for name, part in self.plan.parts().items():
            if name == "train" and self.labels.on_the_fly:
                self.train_records = self.plan.records(part)
                continue
            path = paths[name]
            if not (path / "meta.json").is_file():
                raise FileNotFoundError(f"label cache {path} is missing: prepare_data() did not run")
            columns = load_from_disk(str(path)).with_format("numpy")[:]
            self.meta = json.loads((path / "meta.json").read_text())
            self.columns[name] = columns
            self.tensors[name] = (head_inputs(columns, visual_inputs=self.labels.visual_inputs), self.targets(columns))

    def targets(self, columns: Mapping[str, np.ndarray]) -> torch.Tensor:
        """Head targets ``(N, L-1)`` of a label cache's columns under the label rule
        (``dyvte.exits.rules.head_targets``)."""
        return head_targets(columns, self.labels.rule, self.labels.kl_eta)

    def heads_config(self, head_size: int | None, threshold: float) -> ExitHeadsConfig:
        """The heads' config for the labelled model (with its fingerprint, from the label cache)."""
        self.setup()
        meta = self.meta
        config = ExitHeadsConfig(meta["model_type"], meta["hidden_size"], meta["num_layers"], head_size, threshold)
        config.visual_inputs = self.labels.visual_inputs
        config.model_fingerprint = meta.get("model_fingerprint")
        return config

    def positive_weight(self) -> torch.Tensor:
        """``(L-1,)`` n_neg / n_pos per head in the training targets (1 where a head has no positives; all 1 with
        ``on_the_fly``, whose labels are not known in advance)."""
        if self.labels.on_the_fly:
            logger.info("on-the-fly labels: no class balancing (the labels are not known before training)")
            return torch.ones(self.meta["num_layers"] - 1)
        return positive_weight(self.tensors["train"][1])

    def train_dataloader(self) -> DataLoader:
        if self.labels.on_the_fly:  # batches of records (each rank its own under DDP), labelled in training_step
            return DataLoader(self.train_records, batch_size=self.batch_size, shuffle=True, collate_fn=list)
        return DataLoader(TensorDataset(*self.tensors["train"]), batch_size=self.batch_size, shuffle=True)

    def fresh_batch(self, records: list[dict], step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """On-the-fly ``(features, targets, mask)`` of a batch of training records (``onthefly.fresh_labels``);
        exit layers drawn from a generator seeded by ``split_seed``, the rank and ``step``."""
        from dyvte.data.sources import load_model
        from dyvte.exits.onthefly import draw_layers, fresh_labels

        if self._fresh is None:  # on this rank's device (the labelling model never enters the checkpoint)
            model, processor = load_model(self.source.model, prompt_template=self.source.prompt_template)
            trainer = getattr(self, "trainer", None)
            self._fresh = (model.to(trainer.strategy.root_device) if trainer is not None else model), processor
        model, processor = self._fresh
        rank = self._world()[0]
        generator = torch.Generator().manual_seed(self.splits.split_seed * 1_000_003 + rank * 7919 + step)
        layers = draw_layers(resolve(model).num_layers, len(records), generator)
        labels = self.labels
        return fresh_labels(model, processor, records, layers, agree=labels.agree, loss_ratio=labels.loss_ratio)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.tensors["val"]), batch_size=self.batch_size)


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
