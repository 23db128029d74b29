"""Where the launchers write, what they refuse before any work, and Lightning's console noise.

:func:`runs_dir` and :func:`default_label_cache_dir` place outputs under ``runs/`` of the working directory (ignored
by git). :func:`check_training_budget` and :func:`require_trained` keep the launchers from saving weights that never
trained; :func:`check_output_dir` refuses an output directory that is a file, and :func:`check_output_folder` /
:func:`check_output_files` everything a run could not write as a whole (docs/guide.md, "Output folders"): a folder
that holds an earlier run is replaced only with ``--overwrite true`` (or when it is the launcher's default folder under
``runs/``, with a warning), a folder that holds anything else is never replaced, and a folder that cannot be written
is refused before the model loads. :func:`quiet_lightning` silences Lightning's known harmless console messages.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L

from dyvte.utils.io import check_writable

__all__ = [
    "LIGHTNING_TIPS",
    "NO_STEP_OPTIONS",
    "RANK_ZERO_LOGGERS",
    "check_output_dir",
    "check_output_files",
    "check_output_folder",
    "check_training_budget",
    "default_label_cache_dir",
    "is_default",
    "quiet_lightning",
    "require_trained",
    "run_name",
    "runs_dir",
]

#: trainer options whose value 0 means "no optimizer step": refused before any work
NO_STEP_OPTIONS = ("max_epochs", "max_steps", "limit_train_batches")


def runs_dir(job: str) -> Path:
    """``runs/<job>`` under the working directory: where a launcher writes by default (the launchers run from the
    repository root, where ``runs/`` is ignored by git; never a tracked file)."""
    return Path.cwd() / "runs" / job


def run_name(model: str) -> str:
    """A folder-name form of a model argument: ``"demo"`` as it is, a model directory by its last part
    (``/models/llava-1.5-7b-hf`` -> ``llava-1.5-7b-hf``), characters other than letters, digits, ``.``, ``_`` and
    ``-`` replaced by ``_``."""
    name = model if model == "demo" else Path(model.rstrip("/\\")).name or "model"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def default_label_cache_dir() -> Path:
    """Where label caches live unless ``cache_dir`` says otherwise: ``runs/label-cache`` under the working
    directory (the repository's, when a launcher runs as the README says; ``runs/`` is ignored by git)."""
    return runs_dir("label-cache")


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


def _listing(names: Sequence[str], limit: int = 5) -> str:
    """``a, b, c`` or ``a, b, c, d, e, ... (12 entries)``."""
    names = sorted(names)
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_output_folder(
    option: str,
    path: str | Path,
    *,
    overwrite: bool,
    default: bool,
    marks: Sequence[str],
    what: str,
) -> str | None:
    """Refuse, before the model loads, an output folder that a run could not replace as a whole with its own outputs.

    A run writes its whole folder into a temporary sibling and swaps it in at the end
    (:func:`dyvte.utils.io.staged_dir`), so that no file of an earlier run survives beside its outputs. So:

    * a path that is an existing file is refused (:func:`check_output_dir`);
    * a non-empty folder that holds none of ``marks`` (the files only this launcher writes) is refused, whatever
      ``overwrite`` says: it is not an earlier run's output, and a launcher replaces nothing else;
    * a folder that holds an earlier run is refused unless ``overwrite`` (``--overwrite true``) or ``default`` (the
      launcher's own default folder under ``runs/``, which the README's commands rerun);
    * a folder (or parent) that cannot be written is refused (:func:`dyvte.utils.io.check_writable`).

    Args:
        option: the option that names the folder, for the messages (``"--output_dir"``).
        path: the folder.
        overwrite: ``--overwrite true`` was given.
        default: ``path`` is the launcher's default folder.
        marks: file names that only this launcher's output holds (e.g. ``["results.json"]``).
        what: what the launcher writes, for the messages (``"evaluation"``).

    Returns:
        ``None`` when there is nothing to replace, else a line saying what the run will replace (to log).

    Raises:
        ValueError: one of the cases above; the message names ``option`` and the folder, and what to do.
    """
    check_output_dir(option, str(path))
    folder = Path(path)
    entries = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    replaced = None
    if entries:
        listing = _listing(entries)
        if not any((folder / mark).is_file() for mark in marks):
            raise ValueError(
                f"{option} {path} is not empty ({listing}) and holds no {' or '.join(marks)}: it is not the output "
                f"of an earlier {what}, and dyvte replaces only its own output folders as a whole; choose a new or "
                "empty folder. Nothing was run."
            )
        if not (overwrite or default):
            raise ValueError(
                f"{option} {path} holds an earlier {what} ({listing}): pass --overwrite true to replace that folder "
                f"as a whole when this run completes, or choose another {option}. Nothing was run."
            )
        replaced = f"the earlier {what} in {path} ({listing}) will be replaced as a whole when this run completes"
        if default and not overwrite:
            replaced += f" (the default {option}; give {option} DIR to keep both)"
    check_writable(folder, option)
    return replaced


def check_output_files(
    option: str, folder: str | Path, names: Sequence[str], *, overwrite: bool, default: bool, what: str
) -> str | None:
    """:func:`check_output_folder` for a launcher that writes the files ``names`` into a folder that may hold other
    things (``report.py --output_dir docs``): those files (written together at the end,
    :func:`dyvte.utils.io.staged_files`) are replaced only with ``overwrite`` or in the ``default`` folder, other
    files are never touched, and the folder must be writable.

    Returns:
        ``None`` when none of ``names`` exists, else a line saying which files the run will replace (to log).

    Raises:
        ValueError: ``folder`` is a file, holds some of ``names`` without ``overwrite`` (not ``default``), or cannot
            be written.
    """
    check_output_dir(option, str(folder))
    there = [name for name in names if (Path(folder) / name).exists()]
    replaced = None
    if there:
        if not (overwrite or default):
            raise ValueError(
                f"{option} {folder} already holds {', '.join(there)} of an earlier {what}: pass --overwrite true to "
                f"replace them when this run completes, or choose another {option}. Nothing was run."
            )
        replaced = f"{', '.join(there)} in {folder} (an earlier {what}) will be replaced when this run completes"
    check_writable(folder, option)
    return replaced


def is_default(path: str | Path, default: str | Path) -> bool:
    """Whether ``path`` is the folder ``default`` (both taken against the working directory)."""
    return Path(path).resolve() == Path(default).resolve()


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
