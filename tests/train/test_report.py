"""train/report.py (the job: dyvte.cli.report): the matched-FLOPs table picks the right settings, and a small run
writes a consistent report."""

from __future__ import annotations

import re

import pytest

from dyvte.cli import report as report_cli
from dyvte.eval.harness import EvalResult

from ..scripts import load_script


def result(name: str, accuracy: float, flops: float, ms: float = 1.0, kv: float = 1024.0) -> EvalResult:
    metrics = {
        "all": {
            "accuracy": accuracy,
            "agreement": accuracy,
            "relative_flops": flops,
            "prefill_ms": ms,
            "prefill_ms_p10": ms,
            "prefill_ms_p90": ms,
            "kv_bytes": kv,
        }
    }
    return EvalResult(name, metrics, [], [], [])


def every_setting(text: str) -> dict[str, list[str]]:
    """The rows of the report's "Every setting" table, by method: the cells of each."""
    table = text.split("## Every setting")[1].split("\n## ")[0]
    return {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table.splitlines() if line.startswith("|")}


def test_matched_table_takes_the_best_accuracy_at_or_below_each_target():
    script = report_cli
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


def test_speedups_are_against_the_mean_of_the_two_full_passes(tmp_path):
    script = report_cli
    full, again = result("full", 0.9, 1.0, ms=4.0, kv=4096.0), result("full, timed again last", 0.9, 1.0, ms=6.0)
    static = result("static K=1", 0.5, 0.3, ms=2.5, kv=1024.0)
    text = script.render([full, static], again, [0.5], 10, "test", "heads", 5, str(tmp_path / "absent.md"))
    rows = every_setting(text)
    assert [rows[m][6] for m in ("full", "full, timed again last", "static K=1")] == ["1.25×", "0.83×", "2.00×"]
    assert rows["static K=1"][7:9] == ["1.0", "0.250 |"]  # KB per sample; KV relative to the full model
    assert "not measured yet" in text  # no wall-clock file: said so, not invented


@pytest.mark.slow
def test_small_report_on_the_demo_model(tmp_path, plugin):
    script = load_script("train/report.py")
    script.main(
        samples=40,
        batch_size=20,
        thresholds=[0.8],
        keep=[0.25],
        compose_threshold=0.8,
        output_dir=str(tmp_path),
        wallclock=str(tmp_path / "absent.md"),
        methods=["middle", "keepfirst:0.75"],  # a policy and a pruning method registered by a plugin file
        plugins=[str(plugin)],
    )
    text = (tmp_path / "report.md").read_text()
    for png in ("accuracy_vs_flops.png", "exit_layers.png"):
        assert (tmp_path / png).stat().st_size > 1000
    rows = every_setting(text)
    first, again = rows["full"], rows["full, timed again last"]  # the two passes of the full model answer alike
    assert first[1:4] == again[1:4] and first[2:4] == ["1.000", "1.000"]  # same accuracy; agreement, FLOPs 1
    # static K=0 keeps only the text tokens: KV bytes and FLOPs well below the full model's
    k0 = rows["static K=0"]
    assert float(k0[3]) < 0.5 and float(k0[8].rstrip(" |")) < 0.5
    assert "not measured yet" in text  # no wall-clock file given: said so, not invented
    assert re.search(r"\| static \| [0-9.]+ \(K=\d\)", text)
    # the plugin's policy is static K = L // 2 = 4 under another name: its report row says the same
    middle, static = rows["middle"], rows["static K=4"]
    assert middle[1:4] == static[1:4] and middle[8] == static[8]  # accuracy, agreement, FLOPs; KV bytes
    assert "keepfirst R=0.75" in rows
