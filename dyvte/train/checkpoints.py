"""Interruptible training: a heads-only ``last.ckpt`` at the end of every epoch, a resume command on Ctrl-C / SIGTERM,
and ``--ckpt_path last`` that finds the latest one or says why it cannot.

:class:`EpochCheckpoint` rewrites ``<logs>/version_N/checkpoints/last.ckpt`` (atomically: an interrupted write keeps
the previous file) at the end of every training epoch, with the global random-number generators' states, so that a
run resumed from it draws the same shuffles as the uninterrupted run and ends with the same heads, bit for bit. The
epoch is the unit of resumption: an epoch interrupted half-way is run again from its start (Lightning cannot resume
a shuffled, non-stateful data loader mid-epoch exactly). When training stops on an exception (Ctrl-C, SIGTERM, a
crash), it logs which epoch the checkpoint holds and the exact command that resumes from it.

:func:`fit_resumable` runs ``trainer.fit``: it resolves ``ckpt_path="last"`` to the newest ``last.ckpt`` of the
run's log folder (:func:`find_last_checkpoint`; Lightning itself only looks in the new run's own, still empty,
version folder and starts afresh), refuses ``"last"`` when there is none, and turns SIGTERM into exit status 143.
"""

from __future__ import annotations

import logging
import os
import random
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = [
    "CHECKPOINT_NAME",
    "SIGTERM_EXIT",
    "EpochCheckpoint",
    "capture_rng",
    "find_last_checkpoint",
    "fit_resumable",
    "restore_rng",
]

log = logging.getLogger(__name__)

#: the checkpoint file :class:`EpochCheckpoint` rewrites at the end of every epoch
CHECKPOINT_NAME = "last.ckpt"

#: the exit status of a run stopped by SIGTERM (128 + 15, the shells' convention); Ctrl-C exits 1 (Lightning's)
SIGTERM_EXIT = 143


# ------------------------------------------------------------------------------------------------ random generators
def capture_rng() -> dict[str, Any]:
    """The global generators' states (torch CPU, CUDA when initialized, NumPy, Python ``random``), in types a
    ``weights_only`` checkpoint load accepts (tensors, tuples, ints, floats, strings)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the global generators to ``state`` (:func:`capture_rng`); CUDA's only where it was captured and CUDA is
    present here."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------ where checkpoints go
def _log_root(trainer: L.Trainer) -> Path:
    """The folder whose ``version_*`` subfolders hold the runs' checkpoints: ``<save_dir>/<name>`` of the first
    logger (``default_root_dir`` without a logger), as Lightning's ``ModelCheckpoint`` places them."""
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    return Path(logger.save_dir if logger.save_dir is not None else trainer.default_root_dir) / str(logger.name or "")


def checkpoint_dir(trainer: L.Trainer) -> Path:
    """This run's checkpoint folder: ``<save_dir>/<name>/version_N/checkpoints`` (``<default_root_dir>/checkpoints``
    without a logger). Call it once the logger's version is known (``setup`` or later)."""
    if not trainer.loggers:
        return Path(trainer.default_root_dir) / "checkpoints"
    version = trainer.loggers[0].version
    return _log_root(trainer) / (version if isinstance(version, str) else f"version_{version}") / "checkpoints"


def find_last_checkpoint(trainer: L.Trainer) -> Path | None:
    """The newest ``last.ckpt`` (by modification time) of every run logged where ``trainer`` logs
    (``<save_dir>/<name>/*/checkpoints/last.ckpt``, or ``<default_root_dir>/checkpoints/last.ckpt`` without a
    logger), or ``None``."""
    root = _log_root(trainer)
    pattern = f"*/checkpoints/{CHECKPOINT_NAME}" if trainer.loggers else f"checkpoints/{CHECKPOINT_NAME}"
    found = [path for path in root.glob(pattern) if path.is_file()]
    return max(found, key=lambda path: path.stat().st_mtime_ns) if found else None


def resume_path(trainer: L.Trainer, ckpt_path: str | None) -> str | None:
    """``ckpt_path`` with ``"last"`` resolved by :func:`find_last_checkpoint` (other values unchanged).

    Raises:
        ValueError: ``"last"`` and no ``last.ckpt`` where this run logs; the message says where it looked.
    """
    if ckpt_path != "last":
        return ckpt_path
    found = find_last_checkpoint(trainer)
    if found is None:
        where = _log_root(trainer) / ("*/checkpoints" if trainer.loggers else "checkpoints") / CHECKPOINT_NAME
        raise ValueError(
            f"--ckpt_path last: no checkpoint to resume from ({where} matches no file; a run writes one at the end "
            "of each epoch, under the --trainer.logger save_dir and name of that run, so pass the same ones, or the "
            "checkpoint file itself). Leave --ckpt_path out to train from scratch."
        )
    log.info("--ckpt_path last: resuming from %s", found)
    return str(found)


def fit_resumable(
    trainer: L.Trainer, model: L.LightningModule, datamodule: L.LightningDataModule, ckpt_path: str | None
) -> None:
    """``trainer.fit(model, datamodule=datamodule, ckpt_path=...)`` with ``ckpt_path="last"`` resolved
    (:func:`resume_path`), and a SIGTERM that stopped training turned into ``SystemExit(SIGTERM_EXIT)`` (Lightning
    raises ``SIGTERMException``, a ``SystemExit`` with status 0). Ctrl-C exits 1 inside ``fit`` (Lightning's)."""
    path = resume_path(trainer, ckpt_path)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=path)
    except SIGTERMException:
        raise SystemExit(SIGTERM_EXIT) from None


# ------------------------------------------------------------------------------------------------ the callback
class EpochCheckpoint(Checkpoint):
    """Rewrites ``last.ckpt`` (everything Lightning saves to resume: the heads, the optimizer, the loops' progress,
    plus the generators' states) at the end of every training epoch, and logs the resume command when training
    stops on an exception.

    Args:
        program: how the run was started, for the resume command (``"python train/fit.py"``, ``"dyvte fit"``).
        args: the run's arguments; the resume command gives them again, with ``--ckpt_path`` set to the checkpoint.
    """

    def __init__(self, program: str = "python train/fit.py", args: Sequence[str] = ()) -> None:
        super().__init__()
        self.program = program
        self.args = list(args)
        self.path: Path | None = None  # this run's last.ckpt, once setup knows the logger's version
        self.epochs_saved = 0  # epochs held by this run's checkpoint or, before its first, by the one it resumed from
        self.resumed_from: str | None = None
        self._announced = False

    # ---------------------------------------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Fix this run's checkpoint path (rank 0's, on every rank)."""
        if stage == "fit":
            self.path = Path(trainer.strategy.broadcast(str(checkpoint_dir(trainer)))) / CHECKPOINT_NAME

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save ``last.ckpt`` (to a temporary file first, then renamed over the previous one)."""
        if trainer.sanity_checking or trainer.fast_dev_run or self.path is None:
            return
        temporary = self.path.with_name(self.path.name + ".tmp")
        trainer.save_checkpoint(temporary, weights_only=False)  # every rank takes part; global rank 0 writes
        if trainer.is_global_zero:
            os.replace(temporary, self.path)
        self.epochs_saved = trainer.current_epoch + 1
        if not self._announced and trainer.is_global_zero:
            self._announced = True
            log.info(
                "epoch %d of %s done: checkpoint %s (rewritten at the end of every epoch; resume an interrupted run "
                "with --ckpt_path last)",
                self.epochs_saved,
                trainer.max_epochs,
                self.path,
            )

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Note the epochs the resumed checkpoint holds (its generators come back in :meth:`load_state_dict`)."""
        self.epochs_saved = int(checkpoint.get("epoch", -1)) + 1
        self.resumed_from = str(trainer.ckpt_path) if trainer.ckpt_path else None
        if trainer.is_global_zero:
            log.info(
                "resuming after epoch %d of %s (step %s) from %s",
                self.epochs_saved,
                trainer.max_epochs,
                checkpoint.get("global_step"),
                self.resumed_from,
            )

    def state_dict(self) -> dict[str, Any]:
        """The generators' states at the moment the checkpoint is written."""
        return {"rng": capture_rng()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the generators, so the next epoch draws the shuffle the uninterrupted run drew."""
        if "rng" in state_dict:
            restore_rng(state_dict["rng"])

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Log what the checkpoint holds and the command that resumes from it."""
        if not trainer.is_global_zero:
            return
        if self.path is not None:
            self.path.with_name(self.path.name + ".tmp").unlink(missing_ok=True)  # a save cut short
        interrupted = isinstance(exception, (KeyboardInterrupt, SIGTERMException))
        if isinstance(exception, KeyboardInterrupt):
            why = "interrupted (Ctrl-C)"
        elif isinstance(exception, SIGTERMException):
            why = "stopped by SIGTERM"
        else:
            why = f"failed ({type(exception).__name__})"
        where = f"in epoch {trainer.current_epoch + 1} of {trainer.max_epochs}"
        saved = str(self.path) if self.path is not None and self.path.is_file() else self.resumed_from
        if saved is None or self.epochs_saved == 0:
            if not interrupted:
                return  # a failure before any checkpoint: its traceback says all
            log.error(
                "training %s %s, before any epoch ended: no new checkpoint; start again with: %s",
                why,
                where,
                self.resume_command(None),
            )
            return
        log.error(
            "training %s %s: %s holds the training after epoch %d (an unfinished epoch is run again). Resume with: %s",
            why,
            where,
            saved,
            self.epochs_saved,
            self.resume_command(saved),
        )

    # ---------------------------------------------------------------------------------------------- the command
    def resume_command(self, checkpoint: str | None) -> str:
        """The command that started the run, with its ``--ckpt_path`` replaced by ``--ckpt_path checkpoint`` (the
        command as it was when ``checkpoint`` is ``None``); arguments are quoted for a POSIX shell."""
        if checkpoint is None:
            return " ".join([self.program, *map(shlex.quote, self.args)])
        words, skip = [], False
        for word in self.args:
            if skip:
                skip = False
            elif word == "--ckpt_path":
                skip = True
            elif not word.startswith("--ckpt_path="):
                words.append(word)
        words += ["--ckpt_path", checkpoint]
        return " ".join([self.program, *map(shlex.quote, words)])
