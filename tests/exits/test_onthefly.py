"""On-the-fly training (the paper's scheme): fresh labels per step, one exit layer per sample in one doubled
forward, equal to the cached labels at that layer; fit.py trains with it through the same data path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_from_disk

from dyvte.data.sources import load_model, load_records
from dyvte.exits.labels import build_label_cache
from dyvte.exits.onthefly import draw_layers, fresh_labels
from dyvte.policies.exit_heads import ExitHeads
from dyvte.train.label_data import ExitLabelData
from dyvte.train.options import LabelOptions

from ..scripts import REPO_ROOT, fit_args, load_script, make_fit_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    return make_fit_setup(tmp_path_factory.mktemp("onthefly"))


def test_fresh_labels_equal_the_cached_labels_at_each_samples_layer(setup):
    model, processor = load_model(str(setup / "model"))
    records = list(load_records(str(setup / "records.jsonl"), "train").select(range(6)))
    layers = draw_layers(4, 6, torch.Generator().manual_seed(0))
    assert all(1 <= k <= 3 for k in layers) and len(set(layers)) > 1  # rows of one batch leave at different layers
    features, targets, mask = fresh_labels(model, processor, records, layers)
    cache = build_label_cache(model, processor, records, batch_size=6, progress=False).with_format("numpy")[:]
    assert mask.sum(1).tolist() == [1.0] * 6 and [int(m.argmax()) + 1 for m in mask] == layers
    for b, k in enumerate(layers):
        assert bool(targets[b, k - 1]) == bool(cache["dyvte"][b, k])  # the paper's rule at the sample's layer
    # head inputs read only the prompt, so forcing another answer does not change them
    torch.testing.assert_close(features, torch.from_numpy(cache["features"]), rtol=1e-5, atol=1e-5)


def test_on_the_fly_needs_the_per_layer_rule():
    with pytest.raises(ValueError, match=r"--data.labels.on_the_fly .*--data.labels.rule dyvte-layer"):
        ExitLabelData(labels=LabelOptions(on_the_fly=True))
    with pytest.raises(ValueError, match=r"--data.labels.on_the_fly labels only the plain head inputs"):
        LabelOptions(on_the_fly=True, rule="dyvte-layer", visual_inputs=True)


@pytest.mark.slow
def test_fit_trains_on_fresh_labels_without_a_training_cache(setup):
    extra = [
        "--data.labels.on_the_fly=true",
        "--data.labels.rule=dyvte-layer",
        f"--data.labels.cache_dir={setup / 'fly-cache'}",
    ]
    summary = load_script("train/fit.py").main(fit_args(setup, "heads-fly", 2, extra))
    heads = ExitHeads.from_pretrained(setup / "heads-fly")
    assert heads.config.num_layers == 4 and summary["steps"] == 4  # 2 epochs x 8 records / batch 4
    caches = [p.name for p in (setup / "fly-cache").iterdir()]
    assert not any(name.startswith("train") for name in caches) and any(name.startswith("val") for name in caches)
    training = json.loads((setup / "heads-fly" / "training.json").read_text())
    assert training["label_rule"] == "dyvte-layer" and set(training["label_cache"]) == {"val", "calib"}
    val = load_from_disk(str(next((setup / "fly-cache").glob("val-*")))).with_format("numpy")[:]
    assert np.isfinite(val["features"]).all()


@pytest.mark.slow
def test_on_the_fly_under_ddp_on_two_cpu_processes(setup):
    import os
    import subprocess
    import sys

    root = REPO_ROOT
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    extra = [
        "--data.labels.on_the_fly=true",
        "--data.labels.rule=dyvte-layer",
        f"--data.labels.cache_dir={setup / 'fly-ddp-cache'}",
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
    ]
    done = subprocess.run(
        [sys.executable, str(root / "train" / "fit.py"), *fit_args(setup, "heads-fly-ddp", 2, extra)],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        cwd=root,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    training = json.loads((setup / "heads-fly-ddp" / "training.json").read_text())
    assert training["steps"] == 2  # 2 epochs x (8 records / 2 ranks / batch 4): each rank trained on its half
    assert ExitHeads.from_pretrained(setup / "heads-fly-ddp").config.num_layers == 4
