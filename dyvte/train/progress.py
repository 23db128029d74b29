"""One progress bar over a whole Lightning run, with its ETA (Lightning's own bar restarts at every epoch)."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar

__all__ = ["RunProgressBar"]


class RunProgressBar(ProgressBar):
    """A ``tqdm`` bar over every optimizer step of ``fit`` (``trainer.estimated_stepping_batches``: epochs x batches,
    or ``max_steps``), so its ETA is the time left for the whole training; the latest logged losses are shown
    beside it. Validation runs between steps without a bar of its own."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._bar: Any = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from tqdm.auto import tqdm

        total = trainer.estimated_stepping_batches
        self._bar = tqdm(
            total=None if not math.isfinite(total) else int(total),
            initial=trainer.global_step,  # a resumed run starts where its checkpoint stopped
            desc="training",
            unit="step",
            disable=not (self._enabled and trainer.is_global_zero),
            dynamic_ncols=True,
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._bar is not None:
            self._bar.update(trainer.global_step - self._bar.n)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None and not trainer.sanity_checking:
            metrics = trainer.callback_metrics
            losses = {k.replace("/", "_"): f"{float(v):.4g}" for k, v in metrics.items() if k.endswith("loss")}
            self._bar.set_postfix(epoch=trainer.current_epoch, **losses)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)
