"""A new exit policy and a new pruning method, each one file plus one registration made outside the package, run
end to end through the harness's method strings (``train/evaluate.py --plugins ... --methods ...``) into its tables."""

from __future__ import annotations

import json

import pytest

from dyvte.eval.methods import MethodError, parse_method

from ..scripts import load_script, make_fit_setup


def test_a_registered_policy_and_pruning_method_run_through_the_harness(plugin, tmp_path, capsys):
    setup = make_fit_setup(tmp_path / "tiny")  # a tiny 4-layer LLaVA saved with from_pretrained, 12 records
    with pytest.raises(MethodError, match="unknown method 'middle'"):
        parse_method("middle", 4)  # nothing is registered until the plugin is loaded

    script = load_script("train/evaluate.py")
    out = tmp_path / "eval"
    methods = ["middle", "static:2", "keepfirst:0.5", "random:0.5", "keepfirst:0.5+middle"]
    results = script.main(
        model=str(setup / "model"),
        data=str(setup / "records.jsonl"),
        split="train",
        methods=methods,
        batch_size=4,
        max_new_tokens=2,
        output_dir=str(out),
        plugins=[str(plugin)],
    )
    by_name = {r.method: r for r in results}
    assert list(by_name) == [
        "full",
        "middle",
        "static K=2",
        "keepfirst R=0.5",
        "random R=0.5",
        "keepfirst R=0.5 + middle",
    ]

    # the new policy is static K = L // 2 under another name: the same answers, exits and FLOPs
    middle, static = by_name["middle"], by_name["static K=2"]
    assert middle.answers == static.answers and middle.exit_layers == static.exit_layers == [2] * len(static.answers)
    assert middle.flops == pytest.approx(static.flops) and middle.flops < 1.0

    # the new pruning method feeds the LLM the same number of tokens as random pruning at the same ratio
    keep, rand = by_name["keepfirst R=0.5"], by_name["random R=0.5"]
    assert keep.flops == pytest.approx(rand.flops) and keep.flops < 1.0
    assert by_name["keepfirst R=0.5 + middle"].flops < keep.flops  # composed: pruned, then withdrawn at L // 2

    # into the harness's outputs: results.json, one file per method, and the printed tables
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) == {*by_name, "timing"}  # "timing": the two full-model passes' check (dyvte.eval.timing)
    assert isinstance(saved["timing"]["reliable"], bool) and saved["timing"]["cores"] >= 1
    table = capsys.readouterr().out.split("accuracy per question type")[0]  # the main table, one row per method
    assert [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ")][1:] == [
        f"| {name}" for name in by_name
    ]

    with pytest.raises(
        MethodError, match=r"method 'middle:3': middle takes no argument; expected middle \(no argument\)"
    ):
        parse_method("middle:3", 4)


def test_a_missing_plugin_is_named_before_any_model_loads(tmp_path, monkeypatch):
    from dyvte.cli import evaluate as script  # where main looks load_model up (train/evaluate.py re-exports main)

    def forbid(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(script, "load_model", forbid)
    with pytest.raises(FileNotFoundError, match=r"--plugins: .*absent\.py does not exist"):
        script.main(plugins=[str(tmp_path / "absent.py")], output_dir=str(tmp_path / "eval"))
    with pytest.raises(ModuleNotFoundError, match="no_such_dyvte_plugin"):
        script.main(plugins=["no_such_dyvte_plugin"], output_dir=str(tmp_path / "eval"))
    assert not (tmp_path / "eval").exists()
