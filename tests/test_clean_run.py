"""A clean first run of ``train/fit.py`` with its default output paths, in a fresh git "clone" of the project.

The clone holds the project's ``.gitignore`` and a committed copy of ``checkpoints/``; ``$DYVTE_CHECKPOINTS``
points at it and the run starts in it, as ``python train/fit.py`` from a fresh clone would. Only the model and data
are the tiny ones of ``tests/scripts.py`` (seconds instead of minutes); every output path is left at its default
(``runs/fit-model``: outputs are named after the model folder, ``model`` here).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_from_disk

from dyvte.exits.rules import head_targets
from dyvte.policies.exit_heads import ExitHeads
from dyvte.train.runs import LIGHTNING_TIPS, RANK_ZERO_LOGGERS, quiet_lightning

from .scripts import load_script, make_fit_setup

REAL_ROOT = Path(__file__).resolve().parents[1]
GIT = shutil.which("git")
pytestmark = pytest.mark.skipif(GIT is None, reason="needs git")

#: Lightning logs to these with their own handlers when the root logger had none at import (propagate=False)
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


def git(root: Path, *args: str) -> str:
    """Run git in ``root`` and return its stdout."""
    done = subprocess.run([GIT, *args], cwd=root, capture_output=True, text=True, check=True)
    return done.stdout


def tree_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


class _Records(logging.Handler):
    """Keeps every record it sees once (a propagating record reaches several loggers' handlers)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not any(r is record for r in self.records):
            self.records.append(record)


@dataclass
class Run:
    """What one ``main()`` call logged, warned and returned."""

    messages: list[str]
    warned: list[str]
    summary: dict

    def logged(self, name: str) -> list[str]:
        """Messages of records whose logger name is ``name``."""
        return [m for m in self.messages if m.startswith(f"{name}: ")]


@contextmanager
def run_in(clone: Path) -> Iterator[list]:
    """Demo assets from ``clone``, working directory = ``clone``; yields a list that receives the :class:`Run`."""
    handler = _Records()
    loggers = [logging.getLogger(), *map(logging.getLogger, LIGHTNING_LOGGERS)]
    result: list = []
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mp.setenv("DYVTE_CHECKPOINTS", str(clone / "checkpoints"))
        mp.chdir(clone)
        level = loggers[0].level
        loggers[0].setLevel(logging.INFO)  # what the launcher's basicConfig does on a console (not under pytest)
        for lg in loggers:
            lg.addHandler(handler)
        try:
            yield result
        finally:
            loggers[0].setLevel(level)
            for lg in loggers:
                lg.removeHandler(handler)
    messages = [f"{r.name}: {r.getMessage()}" for r in handler.records]
    result.append(Run(messages, [str(w.message) for w in caught], result.pop() if result else {}))


def fit(clone: Path, setup: Path, *extra: str) -> Run:
    """``train/fit.py``'s ``main()`` in ``clone`` on the tiny model, default output paths."""
    args = [
        f"--data.source.model={setup / 'model'}",
        f"--data.source.data={setup / 'records.jsonl'}",
        "--data.splits.train_samples=8",
        "--data.splits.val_samples=4",
        "--data.batch_size=4",
        "--data.labels.batch_size=4",
        "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false",
        "--tolerance=0.7",  # a promise the setup's 2 calibration records can certify (1% needs 230)
        "--margin=0",  # 2 records certify 70% only with the whole tolerance (not 63%)
        *extra,
    ]
    with run_in(clone) as result:
        main = load_script("train/fit.py").main  # loaded here, in the clone
        result.append(main(args))
    return result[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    return make_fit_setup(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A git repository with the project's .gitignore and checkpoints/, committed."""
    root = tmp_path_factory.mktemp("clone")
    shutil.copy(REAL_ROOT / ".gitignore", root / ".gitignore")
    shutil.copytree(REAL_ROOT / "checkpoints", root / "checkpoints")
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "-m", "fresh clone")
    return root


@pytest.fixture(scope="module")
def first(clone, setup) -> tuple[Run, dict[str, str], dict[str, str]]:
    """The first run in the clone, with the checkpoint hashes (real repository, clone) taken before it."""
    before = tree_hashes(REAL_ROOT / "checkpoints"), tree_hashes(clone / "checkpoints")
    return fit(clone, setup), *before


def test_first_run_leaves_git_status_clean_and_checkpoints_untouched(first, clone):
    _, real_before, clone_before = first
    assert git(clone, "status", "--porcelain", "--untracked-files=all") == ""
    assert tree_hashes(clone / "checkpoints") == clone_before
    assert tree_hashes(REAL_ROOT / "checkpoints") == real_before
    # nothing beside runs/ either (an ignored lightning_logs/ or .cache/ in the working directory would not show above)
    assert sorted(p.name for p in clone.iterdir()) == [".git", ".gitignore", "checkpoints", "runs"]


def test_outputs_are_where_the_log_says(first, clone):
    run = first[0]
    heads_dir = clone / "runs" / "fit-model" / "exit-heads"
    logs_dir = clone / "runs" / "fit-model" / "logs" / "version_0"
    assert f"fit: heads and training.json written to {heads_dir} " in "\n".join(run.logged("fit"))
    assert sorted(p.name for p in heads_dir.iterdir()) == [
        "exit_heads.safetensors",
        "exit_heads_config.json",
        "training.json",
    ]
    assert f"fit: Lightning logs (metrics.csv, config.yaml, checkpoints/last.ckpt) in {logs_dir}" in run.messages
    for name in ("metrics.csv", "config.yaml", "hparams.yaml", "checkpoints/last.ckpt"):
        assert (logs_dir / name).is_file(), name
    caches = {name: Path(path) for name, path in run.summary["label_cache"].items()}
    assert set(caches) == {"train", "val", "calib"} and run.summary["logs"] == str(logs_dir)
    expected = f"{caches['train']} (train), {caches['val']} (validation), {caches['calib']} (calibration)"
    assert f"fit: label cache: {expected}" in run.messages
    for path in caches.values():
        assert path.parent == clone / "runs" / "label-cache" and (path / "meta.json").is_file()
        labelled = [m for m in run.messages if m.startswith("dyvte.train.label_cache: labelling ")]
        assert [m for m in labelled if m.endswith(f" into the label cache {path}")]
    assert json.loads((heads_dir / "training.json").read_text()) == json.loads(json.dumps(run.summary))


def test_head_table_equals_a_recomputation_from_the_cached_labels(first, clone):
    run = first[0]
    heads = ExitHeads.from_pretrained(clone / "runs" / "fit-model" / "exit-heads")
    cache = load_from_disk(run.summary["label_cache"]["val"]).with_format("numpy")[:]
    safe = head_targets(cache, "agreement").bool().numpy()  # head j: answer kept at K = j + 1 and every later K
    with torch.no_grad():
        logits = heads(torch.as_tensor(np.asarray(cache["features"]), dtype=torch.float32)).numpy()
    fires = logits >= heads.exit_logits().numpy()[None]  # float32 logits against the logit thresholds
    assert run.summary["threshold"] == heads.config.threshold and run.summary["val_samples"] == len(safe) == 4
    table = next(m for m in run.logged("fit") if "| head | exit layer |" in m)
    for j, row in enumerate(run.summary["val_heads"]):
        hits = int((fires[:, j] & safe[:, j]).sum())
        expected = {
            "head": j,
            "exit_layer": j + 1,
            "labelled_safe": safe[:, j].mean(),
            "exit_rate": fires[:, j].mean(),
            "precision": hits / fires[:, j].sum() if fires[:, j].any() else None,
            "recall": hits / safe[:, j].sum() if safe[:, j].any() else None,
        }
        assert row == pytest.approx(expected), j
        cells = [f"{v:.3f}" if v is not None else "-" for v in list(expected.values())[2:]]
        assert f"| {j} | {j + 1} | " + " | ".join(cells) + " |" in table.splitlines()


def test_console_is_free_of_the_known_lightning_noise(first):
    run = first[0]
    assert not [m for m in run.messages if "💡 Tip" in m]
    assert len([m for m in run.messages if "Seed set to 0" in m]) == 1
    assert not [w for w in run.warned if "No seed found" in w or "LeafSpec" in w]


def test_later_runs_reuse_the_label_cache_and_relabel_on_request(first, clone, setup):
    caches = [Path(p) for p in first[0].summary["label_cache"].values()]
    stamps = [(p / "meta.json").stat().st_mtime_ns for p in caches]
    again = fit(clone, setup)
    reuse = "dyvte.train.label_cache: reusing the cached labels of "
    for path in caches:
        assert any(
            m.startswith(reuse) and f" in {path} (" in m and "--data.labels.relabel true" in m for m in again.messages
        )
    assert not [m for m in again.messages if "labelling " in m]
    assert [(p / "meta.json").stat().st_mtime_ns for p in caches] == stamps
    assert again.summary["logs"].endswith("version_1")
    (caches[0] / "stale").write_text("left over")
    relabelled = fit(clone, setup, "--data.labels.relabel=true")
    assert not [m for m in relabelled.messages if "reusing the cached labels" in m]
    labelling = [m for m in relabelled.messages if m.startswith("dyvte.train.label_cache: labelling ")]
    assert len([m for m in labelling if "≈" not in m]) == 3  # each split again, after the whole run's estimate
    assert len([m for m in labelling if "≈" in m]) == 1
    assert not (caches[0] / "stale").exists() and all((p / "meta.json").is_file() for p in caches)
    assert relabelled.summary["val_heads"] == again.summary["val_heads"]  # same labels, same seed: same heads
    assert git(clone, "status", "--porcelain", "--untracked-files=all") == ""


def test_quiet_lightning_drops_only_the_known_messages():
    from lightning.pytorch.utilities._pytree import _tree_flatten

    module = "lightning.pytorch.utilities._pytree"
    leafspec = "`isinstance(treespec, LeafSpec)` is deprecated, use something else"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _tree_flatten(1)  # builds a LeafSpec: torch's deprecation, raised from Lightning's module
        assert [w for w in caught if "LeafSpec" in str(w.message)], "torch no longer warns: drop the filter"
        caught.clear()
        quiet_lightning()
        _tree_flatten(1)
        warnings.warn_explicit(leafspec, FutureWarning, "_pytree.py", 1, module=module)
        warnings.warn_explicit("another FutureWarning", FutureWarning, "_pytree.py", 1, module=module)
        warnings.warn_explicit(leafspec, FutureWarning, "elsewhere.py", 1, module="dyvte.elsewhere")
        assert [str(w.message) for w in caught] == ["another FutureWarning", leafspec]

    def passes(name: str, msg: str) -> bool:
        record = logging.LogRecord(name, logging.INFO, __file__, 1, msg, None, None)
        return bool(logging.getLogger(name).filter(record))

    tip = "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](...)"
    assert LIGHTNING_TIPS.match(tip)
    for name in RANK_ZERO_LOGGERS:
        assert not passes(name, tip)
        assert not passes(name, "💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels](...)")
        assert passes(name, "GPU available: False, used: False") and passes(name, "Tip: a message of the user's own")
