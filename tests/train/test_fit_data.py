"""train/fit.py on your data: a LLaVA-format export of the demo data with an image folder, end to end; under DDP on
two CPU processes every rank labels its shards and the caches equal those of one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import load_from_disk

from dyvte.data.formats import export_llava
from dyvte.demo import load_demo_dataset, load_demo_model, load_demo_processor
from dyvte.exits.labels import build_label_cache
from dyvte.policies.exit_heads import ExitHeads

from ..scripts import REPO_ROOT, fit_args, load_script, make_fit_setup

ROOT = REPO_ROOT


@pytest.mark.slow
def test_fit_on_a_llava_format_export_of_the_demo(tmp_path):
    records = load_demo_dataset("validation").select(range(16))
    path = export_llava(list(records), tmp_path / "export", len(records))
    (tmp_path / "images-elsewhere").mkdir()
    (tmp_path / "export" / "images").rename(tmp_path / "images-elsewhere" / "images")
    args = [
        f"--data.source.data={path}",
        f"--data.source.image_folder={tmp_path / 'images-elsewhere'}",
        "--data.splits.train_samples=8",
        "--data.splits.val_samples=4",
        "--data.splits.calib_samples=4",
        "--data.labels.shard_size=4",  # a multiple of the batch: the same batches as labelling directly
        "--data.labels.batch_size=4",
        f"--data.labels.cache_dir={tmp_path / 'cache'}",
        f"--output_dir={tmp_path / 'heads'}",
        "--trainer.max_epochs=2",
        f"--trainer.default_root_dir={tmp_path / 'runs'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--trainer.enable_progress_bar=false",
        "--tolerance=0.5",  # 4 calibration records can certify 50% (a 1% promise needs 230)
    ]
    summary = load_script("train/fit.py").main(args)
    heads = ExitHeads.from_pretrained(tmp_path / "heads")
    assert heads.config.num_layers == 8 and summary["steps"] > 0
    train = Path(summary["label_cache"]["train"])
    meta = json.loads((train / "meta.json").read_text())
    cache = load_from_disk(str(train)).with_format("numpy")[:]
    # the same records labelled directly from the demo split (no conversion, no shards) give the same labels
    direct = build_label_cache(
        load_demo_model(), load_demo_processor(), records.select(meta["source_indices"]), batch_size=4, progress=False
    ).with_format("numpy")[:]
    for key in ("features", "match", "correct", "dyvte", "tokens", "visual"):
        assert np.array_equal(cache[key], direct[key]), key
    assert not any(".shards-" in p.name for p in (tmp_path / "cache").iterdir())  # shards merged, removed


@pytest.mark.slow
def test_fit_under_ddp_labels_on_every_rank_and_equals_one_process(tmp_path):
    setup = make_fit_setup(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    caches = {}
    for devices in (1, 2):
        extra = [
            "--trainer.strategy=ddp",
            f"--trainer.devices={devices}",
            f"--data.labels.cache_dir={setup / f'cache-{devices}'}",
            "--data.labels.shard_size=3",
        ]
        done = subprocess.run(
            [sys.executable, str(ROOT / "train" / "fit.py"), *fit_args(setup, f"heads-{devices}", 1, extra)],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        log = done.stderr + done.stdout
        if devices == 2:
            assert "; rank 1 of 2, shards of 3" in log and "; rank 0 of 2, shards of 3" in log
            assert "rank 1: shard" in log  # rank 1 labelled shards of its own
        caches[devices] = sorted(p for p in (setup / f"cache-{devices}").iterdir() if p.is_dir())
    assert [p.name for p in caches[1]] == [p.name for p in caches[2]] and len(caches[1]) == 3  # train, val, calib
    for one, two in zip(caches[1], caches[2], strict=True):
        a, b = load_from_disk(str(one)).with_format("numpy")[:], load_from_disk(str(two)).with_format("numpy")[:]
        for key in a:
            assert np.array_equal(a[key], b[key]), (one.name, key)
