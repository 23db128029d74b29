"""Launcher scripts (``benchmarks/*.py``, ``train/*.py``) in the tests: import one as a module to test its functions,
and the tiny model and records a launcher run reads (:func:`make_fit_setup`, :func:`fit_args`)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

from .tiny_models import TEMPLATE, make_tiny, records

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_script(relative_path: str) -> ModuleType:
    """The script at ``REPO_ROOT / relative_path``, imported under a name of its own (not run as ``__main__``)."""
    name = "script_" + relative_path.removesuffix(".py").replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def make_fit_setup(root: Path) -> Path:
    """Save a tiny LLaVA (from_pretrained layout) to ``root / "model"`` and 12 records to ``root / "records.jsonl"``."""
    model, processor = make_tiny("llava")
    processor.chat_template = TEMPLATE
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    lines = []
    for i, rec in enumerate(records(12)):
        rec["image"].save(root / f"img{i}.png")
        lines.append(
            json.dumps(
                {"image": f"img{i}.png", "question": rec["question"], "answer": rec["answer"], "qtype": rec["qtype"]}
            )
        )
    (root / "records.jsonl").write_text("\n".join(lines) + "\n")
    return root


def fit_args(root: Path, out: str, epochs: int, extra: list[str] = ()) -> list[str]:
    """``train/fit.py`` arguments for the setup of :func:`make_fit_setup` in ``root``: 8 training and 4 validation
    records, batches of 4, ``epochs`` epochs, heads written to ``root / out``; a promise loose enough (70% at delta
    0.1) for this setup's 2 held-out calibration records to be able to certify it (a 1% promise needs 230)."""
    return [
        f"--data.source.model={root / 'model'}",
        f"--data.source.data={root / 'records.jsonl'}",
        "--data.splits.train_samples=8",
        "--data.splits.val_samples=4",
        "--data.batch_size=4",
        "--data.labels.batch_size=4",
        f"--data.labels.cache_dir={root / 'cache'}",
        f"--output_dir={root / out}",
        f"--trainer.max_epochs={epochs}",
        f"--trainer.default_root_dir={root / 'runs'}",
        f"--trainer.logger.init_args.save_dir={root / 'runs'}",
        "--trainer.enable_progress_bar=false",
        "--tolerance=0.7",
        "--margin=0",  # 2 records certify 70% only with the whole tolerance (not 63%)
        *extra,
    ]
