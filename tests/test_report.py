"""train/report.py: the matched-FLOPs table picks the right settings, and a small run writes a consistent report."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest

from dyvte.evaluate import EvalResult
from dyvte.training import REPO_ROOT


def load_script():
    spec = importlib.util.spec_from_file_location("train_report", REPO_ROOT / "train" / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def result(name: str, accuracy: float, flops: float) -> EvalResult:
    metrics = {"all": {"accuracy": accuracy, "relative_flops": flops}}
    return EvalResult(name, metrics, [], [], [])


def test_matched_table_takes_the_best_accuracy_at_or_below_each_target():
    script = load_script()
    results = [
        result("full", 0.9, 1.0),
        result("static K=1", 0.3, 0.3),
        result("static K=2", 0.5, 0.5),  # exactly at the 50% target: counts
        result("static K=3", 0.8, 0.7000001),  # just above 70%: does not count
        result("heads(h) p=0.5", 0.7, 0.6),
        result("heads(h) p=0.9", 0.6, 0.4),  # cheaper but less accurate than p=0.5 at <= 70%
        result("fastv K=2 R=0.5", 0.6, 0.65),
    ]
    lines = script.matched(results, [0.7, 0.5, 0.3]).splitlines()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert set(rows) == {"static", "heads(h)", "fastv"}  # the full model is not a family
    assert rows["static"] == "| static | 0.500 (K=2) | 0.500 (K=2) | 0.300 (K=1) |"
    assert rows["heads(h)"] == "| heads(h) | 0.700 (p=0.5) | 0.600 (p=0.9) | — |"
    assert rows["fastv"] == "| fastv | 0.600 (K=2 R=0.5) | — | — |"


@pytest.mark.slow
def test_small_report_on_the_demo_model(tmp_path):
    script = load_script()
    script.main(
        samples=40,
        batch_size=20,
        thresholds=[0.8],
        keep=[0.25],
        compose_threshold=0.8,
        output_dir=str(tmp_path),
        wallclock=str(tmp_path / "absent.md"),
    )
    text = (tmp_path / "report.md").read_text()
    for png in ("accuracy_vs_flops.png", "exit_layers.png"):
        assert (tmp_path / png).stat().st_size > 1000
    table = text.split("## Every setting")[1].split("\n## ")[0]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table.splitlines() if line.startswith("|")}
    # the full model's two passes answer identically and are the speedup baseline: their speedups bracket 1
    first, again = rows["full"], rows["full, timed again last"]
    assert first[1:4] == again[1:4] and first[2:4] == ["1.000", "1.000"]  # same accuracy; agreement, FLOPs 1
    speedups = [float(first[6].rstrip("×")), float(again[6].rstrip("×"))]
    assert min(speedups) <= 1.0 <= max(speedups)
    # static K=0 keeps only the text tokens: KV bytes and FLOPs well below the full model's
    k0 = rows["static K=0"]
    assert float(k0[3]) < 0.5 and float(k0[8].rstrip(" |")) < 0.5
    assert "not measured yet" in text  # no wall-clock file given: said so, not invented
    assert re.search(r"\| static \| [0-9.]+ \(K=\d\)", text)
