"""benchmarks/serve_load.py: its counting, and a smoke run against a real server that loses nothing and whose every
streamed answer and exit layer equal offline greedy decoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ..scripts import REPO_ROOT, load_script
from ..tools import require_module


def test_summary_counts_errors_lost_and_differing_answers():
    script = load_script("benchmarks/serve_load.py")
    reference = {("heads", 0): ("3", 2), ("heads", 1): ("no", 8)}
    outcomes = [
        script.Outcome("heads", 0, 0.0, latency=0.1, ttft=0.05, text=" 3", tokens=1, exit_layer=2, finished=True),
        script.Outcome("heads", 1, 0.0, latency=0.2, ttft=0.10, text="yes", tokens=1, exit_layer=8, finished=True),
        script.Outcome("heads", 1, 0.0, latency=0.3, ttft=0.10, text="no", tokens=1, exit_layer=5, finished=True),
        script.Outcome("heads", 0, 0.0, text="3", exit_layer=2, finished=False),  # the stream ended early: lost
        script.Outcome("heads", 1, 0.0, error="APIConnectionError: refused"),
    ]
    row = script.summarize(4, "heads", outcomes, wall=2.0, unsent=1, sent=7, reference=reference, peak_rss=2**20)
    assert (row.sent, row.completed, row.errors, row.unsent) == (6, 3, 1, 1)
    assert row.lost == 2  # 6 sent - 1 error - 3 answered in full: the unfinished stream and one never recorded
    assert (row.differing, row.exit_differing) == (1, 1)
    assert row.requests_per_s == pytest.approx(1.5)
    assert row.latency_ms[0] == pytest.approx(200) and row.latency_ms[2] == pytest.approx(300)
    assert row.peak_rss_mib == pytest.approx(1.0)
    assert "| 4 | heads | 6 | 3 | 1 | 2 | 1 | 1 / 1 |" in script.format_table([row])


@pytest.mark.slow
def test_smoke_load_loses_nothing_and_matches_offline(tmp_path):
    require_module("openai", tool="serve", install="pip install -e '.[dev]'")
    require_module("fastapi", tool="serve", install="pip install -e '.[serve]'")
    require_module("psutil", tool="serve", install="pip install -e '.[serve-tests]'")
    out = tmp_path / "load.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "benchmarks/serve_load.py", "--smoke", "--json", str(out)]
    command += ["--output", str(tmp_path / "load.md")]
    run = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["clients"], r["method"]) for r in rows} == {
        (c, m) for c in (1, 2) for m in ("full", "static:4", "heads")
    }  # fmt: skip
    for r in rows:
        assert r["sent"] == r["completed"] == r["clients"] * 2, r
        assert r["errors"] == r["lost"] == r["unsent"] == r["differing"] == r["exit_differing"] == 0, r
        assert r["peak_rss_mib"] > 0  # the server's process tree was sampled
        assert r["ttft_ms"][0] <= r["latency_ms"][0]
    full = {r["clients"]: r for r in rows if r["method"] == "full"}
    assert all(r["mean_exit_layer"] == 8 for r in full.values())
    assert "throughput heads / full" in (tmp_path / "load.md").read_text()
