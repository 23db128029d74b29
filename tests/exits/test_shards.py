"""Sharded labelling: 2 processes give exactly the cache of 1, and a run killed mid-way then resumed equals an
uninterrupted one (finished shards are kept, not labelled again)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_from_disk

from dyvte.data.sources import load_model, load_records
from dyvte.exits.shards import label_shards, merge_shards, missing_shards, shard_ranges

from ..scripts import REPO_ROOT, make_fit_setup

ROOT = REPO_ROOT
RECORDS = 12
SHARD = 3  # 4 shards of 3 records, batches of 2 (a shard's last batch is short)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    return make_fit_setup(tmp_path_factory.mktemp("shards"))


def worker(setup: Path, shards: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tests.shard_worker", str(setup / "model"), str(setup / "records.jsonl")]
    return subprocess.Popen(
        [*command, str(shards), f"--shard_size={SHARD}", *args], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen) -> int:
    _, err = process.communicate(timeout=300)
    if process.returncode not in (0, -9):
        raise AssertionError(err[-3000:])
    return process.returncode


def columns(path: Path) -> dict[str, np.ndarray]:
    return load_from_disk(str(path)).with_format("numpy")[:]


def assert_same(a: Path, b: Path) -> None:
    left, right = columns(a), columns(b)
    assert left.keys() == right.keys()
    for key in left:
        assert np.array_equal(left[key], right[key]), key  # exactly, not approximately
    arrow = sorted(p.name for p in a.glob("*.arrow"))
    assert arrow and arrow == sorted(p.name for p in b.glob("*.arrow"))
    assert all((a / name).read_bytes() == (b / name).read_bytes() for name in arrow)  # byte for byte


@pytest.fixture(scope="module")
def one_process(setup) -> Path:
    """The reference: every shard labelled by this process, on one thread like the workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, processor = load_model(str(setup / "model"))
        records = load_records(str(setup / "records.jsonl"), "train")
        done = label_shards(model, processor, records, setup / "one.shards", shard_size=SHARD, batch_size=2)
    finally:
        torch.set_num_threads(threads)
    assert done == [0, 1, 2, 3]
    merged = merge_shards(setup / "one.shards", setup / "one", RECORDS, SHARD)
    assert merged["index"] == list(range(RECORDS)) and not (setup / "one.shards").exists()
    return setup / "one"


def test_shard_ranges_cover_every_record_once():
    assert [list(r) for r in shard_ranges(7, 3)] == [[0, 1, 2], [3, 4, 5], [6]]


@pytest.mark.slow
def test_two_processes_give_the_cache_of_one(setup, one_process):
    shards = setup / "two.shards"
    ranks = [worker(setup, shards, f"--rank={r}", "--world=2") for r in range(2)]  # concurrently
    assert [finish(p) for p in ranks] == [0, 0]
    merge_shards(shards, setup / "two", RECORDS, SHARD)
    assert_same(one_process, setup / "two")


@pytest.mark.slow
def test_a_killed_run_resumes_and_equals_an_uninterrupted_one(setup, one_process):
    shards = setup / "killed.shards"
    assert finish(worker(setup, shards, "--kill_at_shard=2")) == -9  # SIGKILL while labelling its third shard
    assert missing_shards(shards, RECORDS, SHARD) == [2, 3]  # the two finished shards are on disk, whole
    kept = {str(p.relative_to(shards)): p.stat().st_mtime_ns for p in shards.glob("shard-*/*.arrow")}
    assert len(kept) == 2
    assert finish(worker(setup, shards)) == 0  # the same command again
    again = {str(p.relative_to(shards)): p.stat().st_mtime_ns for p in shards.glob("shard-*/*.arrow")}
    assert {name: again[name] for name in kept} == kept and len(again) == 4  # finished shards were not relabelled
    merge_shards(shards, setup / "resumed", RECORDS, SHARD)
    assert_same(one_process, setup / "resumed")
