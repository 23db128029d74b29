"""The Lightning module that trains exit heads, and the per-head validation summary of trained heads.

``ExitHeadsModule`` holds only the heads, so Lightning checkpoints never contain the MLLM. Class imbalance: each
head's BCE weighs its positive ("exit") examples by ``n_neg / n_pos`` of that layer in the training labels
(:func:`positive_weight`, ``balance=True``), since early layers are rarely safe and late layers nearly always are.
:func:`head_validation` and :func:`format_head_table` give the per-head validation summary that ``train/fit.py``
logs and writes to ``training.json``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

import lightning as L
import torch
from torchmetrics.classification import MultilabelPrecision, MultilabelRecall

from dyvte.policies.exit_heads import ExitHeads
from dyvte.utils.checks import check_positive_int
from dyvte.utils.devices import model_device

if TYPE_CHECKING:
    from dyvte.train.label_data import ExitLabelData

__all__ = ["ExitHeadsModule", "format_head_table", "head_validation", "positive_weight"]


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
        layer_change: heads that also read the change of their features since the previous head's layer
            (:attr:`dyvte.policies.exit_heads.ExitHeadsConfig.layer_change`).
    """

    def __init__(
        self,
        head_size: int | None = None,
        threshold: float = 0.5,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        balance: bool = True,
        layer_change: bool = False,
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
        config = data.heads_config(self.hparams.head_size, self.hparams.threshold)
        self.heads = ExitHeads(dataclasses.replace(config, layer_change=bool(self.hparams.layer_change)))
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
        if isinstance(batch, list) and isinstance(
            batch[0], Mapping
        ):  # records (--data.labels.on_the_fly): fresh labels
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
    thresholds = heads.exit_logits(threshold)  # (L-1,) logit thresholds, on the host
    with torch.no_grad():  # the heads may still be on the device they trained on: their logits come back
        fires = heads(features.to(model_device(heads))).float().cpu() >= thresholds[None]  # (N, L-1)
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
