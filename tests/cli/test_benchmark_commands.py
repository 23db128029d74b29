"""``evaluate --benchmark`` and ``report --benchmarks``: records -> harness -> scorer -> table, on tiny files, and the
bad inputs refused before the model loads."""

from __future__ import annotations

import json

import pytest

from dyvte.cli import evaluate as evaluate_cli
from dyvte.cli import report as report_cli
from dyvte.demo.benchmarks import build_mme, build_pope, held_out_scenes, write_benchmark

HEADS = "checkpoints/demo-exit-heads"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    scenes = held_out_scenes(4)
    return {
        "pope": write_benchmark(build_pope(scenes, per_image=2), folder / "pope.parquet"),
        "mme": write_benchmark(build_mme(scenes), folder / "mme.parquet"),
    }


def test_evaluate_scores_a_pope_file(files, tmp_path):
    out = tmp_path / "eval"
    evaluate_cli.main(
        benchmark="pope",
        data=str(files["pope"]),
        benchmark_prompt="none",  # the demo's vocabulary has none of the instruction's words
        methods=["full", "static:6"],
        output_dir=str(out),
        batch_size=16,
    )
    saved = json.loads((out / "results.json").read_text())
    bench = saved["benchmark"]
    assert bench["name"] == "pope" and bench["prompt"] == ""
    for method in ("full", "static K=6"):
        scores = bench[method]["scores"]
        if scores["all"]["unparsed"] == 0:  # every answer yes or no: POPE accuracy is the harness's exact match
            assert scores["all"]["accuracy"] == pytest.approx(saved[method]["all"]["accuracy"])
        for split in ("random", "popular", "adversarial"):
            assert scores[split]["samples"] == saved[method][split]["samples"]
        assert bench[method]["headline"]["POPE F1"] == pytest.approx(
            100 * sum(scores[s]["f1"] for s in ("random", "popular", "adversarial")) / 3
        )


def test_report_table_runs_records_scorer_table(files, tmp_path):
    out = tmp_path / "table"
    report_cli.run(
        [
            "--benchmarks",
            f"pope={files['pope']}",
            f"mme={files['mme']}",
            "--benchmark_prompt",
            "none",
            "--table_methods",
            json.dumps(["static:6", f"heads:{HEADS}"]),
            f"--output_dir={out}",
            "--batch_size=32",
        ]
    )
    saved = json.loads((out / "benchmarks.json").read_text())
    rows = {row["method"]: row for row in saved["rows"]}
    assert list(rows) == ["full", "static K=6", "heads(demo-exit-heads) calibrated tol=0.01"]
    assert rows["full"]["relative_flops"] == 1.0
    assert rows["static K=6"]["relative_flops"] < 1.0
    for method, row in rows.items():
        mme = saved["benchmarks"]["mme"][method]["scores"]
        assert row["scores"]["MME-P"] == pytest.approx(sum(mme[s]["score"] for s in ("existence", "count", "position")))
        assert row["scores"]["MME-C"] == pytest.approx(mme["numerical_calculation"]["score"])
        assert row["scores"]["POPE F1"] == pytest.approx(saved["benchmarks"]["pope"][method]["headline"]["POPE F1"])
    text = (out / "benchmarks.md").read_text()
    assert "| method | POPE F1 | MME-P | MME-C | rel. prefill FLOPs | prefill ms/sample |" in text
    assert f"| static K=6 | {rows['static K=6']['scores']['POPE F1']:.1f} |" in text


def test_list_option_reads_space_separated_values():
    args = ["--benchmarks", "pope=a.parquet", "mme=demo", "--batch_size=2"]
    assert report_cli.list_option(args, "--benchmarks") == [
        '--benchmarks=["pope=a.parquet", "mme=demo"]',
        "--batch_size=2",
    ]
    assert report_cli.list_option(["--benchmarks", '["pope=a"]'], "--benchmarks") == ["--benchmarks", '["pope=a"]']


def _no_model(*args, **kwargs):
    raise AssertionError("the model must not load")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"benchmark": "popee", "data": "x.parquet"}, "'popee' is not a benchmark dyvte scores"),
        ({"benchmark": "gqa", "data": "demo"}, "the demo has a pope and a mme set, not 'gqa'"),
        ({"benchmark": "pope", "data": "absent.parquet"}, "no such file"),
        ({"benchmark": "pope", "data": "demo", "samples": 5}, "--samples does not apply with --benchmark"),
    ],
)
def test_evaluate_refuses_bad_benchmark_input_before_the_model_loads(tmp_path, monkeypatch, kwargs, match):
    monkeypatch.setattr(evaluate_cli, "load_model", _no_model)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        evaluate_cli.main(**kwargs, output_dir=str(tmp_path / "eval"))
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize(
    ("benchmarks", "match"),
    [
        (["pope"], "write NAME=PATH"),
        (["pope=demo", "pope=demo"], "names pope twice"),
        (["vizwiz=a.parquet"], "'vizwiz' is not a benchmark"),
    ],
)
def test_report_refuses_bad_benchmarks_before_the_model_loads(tmp_path, monkeypatch, benchmarks, match):
    monkeypatch.setattr(report_cli, "load_model", _no_model)
    with pytest.raises(ValueError, match=match):
        report_cli.main(benchmarks=benchmarks, output_dir=str(tmp_path / "t"))
    assert not (tmp_path / "t").exists()
