"""Training exit heads with Lightning on the frozen MLLM.

``ExitLabelData`` builds (once, on rank 0) the label cache of :func:`dyvte.labels.build_label_cache` for a train and
a validation split and serves its tensors; ``ExitHeadsModule`` holds only the heads, so Lightning checkpoints never
contain the MLLM. Class imbalance: each head's BCE weighs its positive ("exit") examples by ``n_neg / n_pos`` of
that layer in the training labels (``balance=True``), since early layers are rarely safe and late layers nearly
always are.

Label caches live under ``<repo>/runs/label-cache`` by default (ignored by git), one folder per (model weights,
data, split, samples, agree, loss_ratio); a later run with the same key reuses the folder and says so in the log.
:func:`head_validation` and :func:`format_head_table` give the per-head validation summary that ``train/fit.py``
logs and writes to ``training.json``; :func:`quiet_lightning` silences Lightning's known harmless console noise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from datasets import load_from_disk
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MultilabelPrecision, MultilabelRecall

from .heads import ExitHeads, ExitHeadsConfig
from .labels import build_label_cache
from .registry import resolve

__all__ = [
    "ExitLabelData",
    "ExitHeadsModule",
    "REPO_ROOT",
    "default_label_cache_dir",
    "format_head_table",
    "head_validation",
    "quiet_lightning",
]

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]


def default_label_cache_dir() -> Path:
    """Where label caches live unless ``cache_dir`` says otherwise: ``<repo>/runs/label-cache`` (ignored by git)."""
    return REPO_ROOT / "runs" / "label-cache"


class ExitLabelData(L.LightningDataModule):
    """Cached exit labels and head inputs of a model on a dataset.

    Args:
        model: ``"demo"`` or a local model directory.
        data: ``"demo"``, a ``save_to_disk`` directory or a ``.json``/``.jsonl``/``.parquet`` records file.
        train_split: split used for training.
        val_split: split used for validation.
        val_data: records for validation when they are not a split of ``data`` (default: ``data``).
        train_samples: records of ``train_split`` to label (``None``: all).
        val_samples: records to label for validation.
        label_rule: ``"layer"`` (head j learns the DyVTE label at exit layer j + 1) or ``"monotone"`` (head j
            learns "every exit layer >= j + 1 is safe", i.e. j + 1 >= the smallest safe layer).
        agree: DyVTE agreement threshold.
        loss_ratio: DyVTE loss-ratio threshold.
        batch_size: head-training batch size.
        label_batch_size: rows per MLLM forward while labelling.
        cache_dir: where label caches live (default ``<repo>/runs/label-cache``, see
            :func:`default_label_cache_dir`); one folder per model weights, data, split, samples, agree and loss_ratio.
        relabel: label again even where a cache for the same key exists (it is replaced); without it an existing
            cache is reused, and the log says so with its path.
    """

    def __init__(
        self,
        model: str = "demo",
        data: str = "demo",
        train_split: str = "train",
        val_split: str = "validation",
        val_data: str | None = None,
        train_samples: int | None = 3000,
        val_samples: int | None = 500,
        label_rule: str = "layer",
        agree: float = 0.99,
        loss_ratio: float = 1.03,
        batch_size: int = 256,
        label_batch_size: int = 64,
        cache_dir: str | None = None,
        relabel: bool = False,
    ) -> None:
        super().__init__()
        if label_rule not in ("layer", "monotone"):
            raise ValueError(f"label_rule must be 'layer' or 'monotone', got {label_rule!r}")
        self.save_hyperparameters()
        self.tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.meta: dict | None = None

    # ------------------------------------------------------------------------------------------------ caching
    def _cache_path(self, data: str, split: str, samples: int | None) -> Path:
        hp = self.hparams
        model_dir = REPO_ROOT / "checkpoints" / "demo-mllm" if hp.model == "demo" else Path(hp.model)
        weights = sorted(model_dir.glob("*.safetensors"))
        stamp = [f"{w.name}:{w.stat().st_size}:{int(w.stat().st_mtime)}" for w in weights]
        key = json.dumps([str(model_dir.resolve()), stamp, data, split, samples, hp.agree, hp.loss_ratio])
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        return self.cache_root / f"{split}-{samples}-{digest}"

    @property
    def cache_root(self) -> Path:
        """The folder that holds this datamodule's label caches."""
        return Path(self.hparams.cache_dir) if self.hparams.cache_dir else default_label_cache_dir()

    def cache_paths(self) -> dict[str, Path]:
        """The label-cache folder of each split: ``{"train": ..., "val": ...}``."""
        return {name: self._cache_path(data, split, samples) for name, data, split, samples in self._splits()}

    def _splits(self) -> list[tuple[str, str, str, int | None]]:
        hp = self.hparams
        return [
            ("train", hp.data, hp.train_split, hp.train_samples),
            ("val", hp.val_data or hp.data, hp.val_split, hp.val_samples),
        ]

    def prepare_data(self) -> None:
        """Build the missing label caches (all of them with ``relabel``) and log which ones are reused (rank 0)."""
        todo: dict[Path, tuple[str, str, int | None]] = {}
        for _, data, split, samples in self._splits():
            path = self._cache_path(data, split, samples)
            if (path / "meta.json").is_file() and not self.hparams.relabel:
                labelled = json.loads((path / "meta.json").read_text()).get("samples")
                logger.info(
                    "reusing the cached labels of %s %s samples of %s in %s (to label again, delete that folder "
                    "or pass relabel=True, i.e. --data.relabel true)",
                    labelled,
                    split,
                    data,
                    path,
                )
            else:
                todo[path] = (data, split, samples)
        if not todo:
            return
        from .sources import load_model, load_records

        model, processor = load_model(self.hparams.model)
        spec = resolve(model)
        for path, (data, split, samples) in todo.items():
            if path.exists():  # relabel (or an unfinished cache without meta.json): replace it, never write over it
                logger.info("removing the old label cache %s before labelling again", path)
                shutil.rmtree(path)
            logger.info("labelling %s %s samples of %s into the label cache %s", samples or "all", split, data, path)
            records = load_records(data, split, samples)
            start = time.perf_counter()
            cache = build_label_cache(
                model,
                processor,
                records,
                batch_size=self.hparams.label_batch_size,
                agree=self.hparams.agree,
                loss_ratio=self.hparams.loss_ratio,
            )
            seconds = time.perf_counter() - start
            cache.save_to_disk(str(path))
            meta = {
                "model_type": spec.model_type,
                "hidden_size": spec.text_config.hidden_size,
                "num_layers": spec.num_layers,
                "samples": len(cache),
                "seconds": seconds,
                "ms_per_sample": 1e3 * seconds / len(cache),
            }
            (path / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            logger.info("labelled %d %s samples in %.1f s; label cache written to %s", len(cache), split, seconds, path)

    def setup(self, stage: str | None = None) -> None:
        """Load the caches into tensors: features ``(N, L-1, 2d)`` and targets ``(N, L-1)``."""
        if self.tensors:
            return
        for name, data, split, samples in self._splits():
            path = self._cache_path(data, split, samples)
            if not (path / "meta.json").is_file():
                raise FileNotFoundError(f"label cache {path} is missing: prepare_data() did not run")
            cache = load_from_disk(str(path)).with_format("torch")[:]
            self.meta = json.loads((path / "meta.json").read_text())
            self.tensors[name] = (cache["features"].float(), self.targets(cache["safe"], cache["safe_layer"]))

    def targets(self, safe: torch.Tensor, safe_layer: torch.Tensor) -> torch.Tensor:
        """Head targets ``(N, L-1)`` from the safety at K = 0..L-1 ``(N, L)`` and the smallest safe layer ``(N,)``."""
        if self.hparams.label_rule == "layer":
            return safe[:, 1:].float()
        exits = torch.arange(1, safe.shape[1], device=safe.device)  # exit layer of head j: j + 1
        return (exits[None] >= safe_layer[:, None]).float()

    def heads_config(self, head_size: int | None, threshold: float) -> ExitHeadsConfig:
        """The heads' config for the labelled model."""
        self.setup()
        meta = self.meta
        return ExitHeadsConfig(meta["model_type"], meta["hidden_size"], meta["num_layers"], head_size, threshold)

    def positive_weight(self) -> torch.Tensor:
        """``(L-1,)`` n_neg / n_pos per head in the training targets (1 where a head has no positives)."""
        targets = self.tensors["train"][1]
        positives = targets.sum(0)
        return torch.where(
            positives > 0, (len(targets) - positives) / positives.clamp(min=1), torch.ones_like(positives)
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.tensors["train"]), batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.tensors["val"]), batch_size=self.hparams.batch_size)


class ExitHeadsModule(L.LightningModule):
    """Trains :class:`ExitHeads` on cached labels; the module holds the heads and nothing else.

    Args:
        head_size: hidden width of each head (``None``: ``max(4, d // 32)``).
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

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
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


# --------------------------------------------------------------------------------------------- validation summary
def head_validation(
    heads: ExitHeads, features: torch.Tensor, targets: torch.Tensor, threshold: float | None = None
) -> list[dict[str, float | int | None]]:
    """How each head's "exit" decision compares with the labels, at the heads' threshold.

    A head fires for a sample when ``sigmoid(logit) >= threshold`` (the rule used at inference).

    Args:
        heads: the trained heads.
        features: ``(N, L-1, 2d)`` head inputs (the validation label cache's ``features``).
        targets: ``(N, L-1)`` 0/1 targets of the heads (:meth:`ExitLabelData.targets`).
        threshold: P(exit) threshold (default: the heads' own, ``heads.config.threshold``).

    Returns:
        One dict per head ``j``: ``head`` (j), ``exit_layer`` (j + 1), ``labelled_safe`` (fraction of samples whose
        target is 1), ``exit_rate`` (fraction of samples for which the head fires), ``precision`` (of the firings,
        the fraction labelled safe; ``None`` when the head never fires) and ``recall`` (of the samples labelled safe,
        the fraction it fires for; ``None`` when none is labelled safe).
    """
    threshold = heads.config.threshold if threshold is None else threshold
    with torch.no_grad():
        fires = torch.sigmoid(heads(features).float()) >= threshold  # (N, L-1)
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
