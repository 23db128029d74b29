"""train/fit.py on a tiny model saved to disk: heads-only checkpoints, resume, DDP on two CPU processes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dyvte.policies.exit_heads import ExitHeads

from ..scripts import REPO_ROOT, fit_args, make_fit_setup

ROOT = REPO_ROOT


def _fit_main():
    spec = importlib.util.spec_from_file_location("fit", ROOT / "train" / "fit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    """A tiny LLaVA saved with from_pretrained layout and a JSONL of records with image files."""
    return make_fit_setup(tmp_path_factory.mktemp("fit"))


def test_fit_writes_only_heads_and_resumes(setup_dir):
    main = _fit_main()
    main(fit_args(setup_dir, "heads", 2))
    heads = ExitHeads.from_pretrained(setup_dir / "heads")
    assert heads.config.num_layers == 4 and heads.config.model_type == "llava"
    ckpts = sorted((setup_dir / "runs").rglob("last.ckpt"))
    assert len(ckpts) == 1
    state = torch.load(ckpts[0], weights_only=False)
    assert set(state["state_dict"]) == {f"heads.{k}" for k in heads.state_dict()}  # no MLLM weights
    assert state["global_step"] == 4  # 2 epochs x (8 samples / batch 4)
    first_steps = state["global_step"]
    main(fit_args(setup_dir, "heads-resumed", 3, [f"--ckpt_path={ckpts[0]}"]))
    resumed = torch.load(sorted((setup_dir / "runs").rglob("last.ckpt"))[-1], weights_only=False)
    assert resumed["global_step"] == first_steps + 2  # one more epoch, not a fresh run of three
    training = json.loads((setup_dir / "heads-resumed" / "training.json").read_text())
    assert training["steps"] == first_steps + 2 and training["labels_ms_per_sample"] > 0
    assert [h["exit_layer"] for h in training["val_heads"]] == [1, 2, 3] and training["val_samples"] == 4
    assert Path(training["logs"]).parent == setup_dir / "runs" / "logs"  # the --trainer.logger save_dir given
    assert {Path(p).parent for p in training["label_cache"].values()} == {setup_dir / "cache"}


@pytest.mark.slow
def test_fit_ddp_two_cpu_processes(setup_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    args = fit_args(setup_dir, "heads-ddp", 1, ["--trainer.strategy=ddp", "--trainer.devices=2"])
    done = subprocess.run(
        [sys.executable, str(ROOT / "train" / "fit.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world_size: 2" in done.stderr + done.stdout or "Initializing distributed: GLOBAL_RANK: 1" in (
        done.stderr + done.stdout
    )
    heads = ExitHeads.from_pretrained(setup_dir / "heads-ddp")
    assert np.isfinite(sum(p.sum().item() for p in heads.parameters()))
