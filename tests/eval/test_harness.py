"""VTW calibration and the evaluation harness on a tiny LLaVA and a tiny (image, question, answer) dataset."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch

import dyvte
from dyvte.data.records import build_inputs, normalize_answer
from dyvte.eval.harness import format_per_type, format_table, plot_sweep
from dyvte.exits.kl import kl_divergence

from .tiny_models import make_tiny


@pytest.fixture(scope="module")
def tiny():
    model, processor = make_tiny("llava")
    processor.chat_template = TEMPLATE
    return model, processor


def batches(processor, recs, size, with_answers=False):
    return [build_inputs(processor, recs[i : i + size], with_answers=with_answers) for i in range(0, len(recs), size)]


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(3, 11)
    assert torch.equal(kl_divergence(logits, logits), torch.zeros(3))
    assert (kl_divergence(logits, torch.randn(3, 11)) > 0).all()


def test_calibration_curve_choice_and_json_round_trip(tiny, tmp_path):
    model, processor = tiny
    data = batches(processor, records(6), 3)
    cal = dyvte.calibrate(model, data, threshold=1e-2, progress=False)
    num_layers = model.config.text_config.num_hidden_layers
    assert len(cal.kl_per_layer) == num_layers + 1 and cal.kl_per_layer[num_layers] == 0.0
    assert cal.num_samples == 6
    assert cal.kl_per_layer[cal.layer] <= 1e-2
    assert all(kl > 1e-2 for kl in cal.kl_per_layer[: cal.layer])  # the smallest K meeting eta
    cal.save(tmp_path)
    loaded = dyvte.Calibration.load(tmp_path)
    assert loaded == cal
    with dyvte.withdraw(model, calibration=tmp_path) as handle:
        assert handle.layer == cal.layer


def test_calibration_is_batch_invariant_and_first_position_matches_teacher_forcing(tiny):
    model, processor = tiny
    recs = records(4)
    together = dyvte.calibrate(model, batches(processor, recs, 4), progress=False)
    alone = dyvte.calibrate(model, batches(processor, recs, 1), progress=False)
    np.testing.assert_allclose(together.kl_per_layer, alone.kl_per_layer, rtol=1e-4, atol=1e-7)
    forced = dyvte.calibrate(model, batches(processor, recs, 2, with_answers=True), progress=False)
    np.testing.assert_allclose(forced.kl_per_layer, together.kl_per_layer, rtol=1e-4, atol=1e-7)
    every = dyvte.calibrate(model, batches(processor, recs, 2, with_answers=True), positions="answer", progress=False)
    assert every.kl_per_layer[-1] == 0.0 and every.positions == "answer"
    assert not np.allclose(every.kl_per_layer[:-1], forced.kl_per_layer[:-1])  # later positions do count


def test_unmet_threshold_means_never_withdraw(tiny, caplog):
    model, processor = tiny
    with caplog.at_level(logging.WARNING):
        cal = dyvte.calibrate(model, batches(processor, records(2), 2), threshold=1e-30, progress=False)
    assert cal.layer == model.config.text_config.num_hidden_layers and not cal.met
    assert "never withdraw" in caplog.text


@pytest.mark.parametrize("eta", [0.0, -1e-3])
def test_non_positive_threshold_is_refused(tiny, eta):
    model, processor = tiny
    with pytest.raises(ValueError, match="eta"):
        dyvte.calibrate(model, batches(processor, records(2), 2), threshold=eta)


def test_calibration_for_another_model_or_corrupt_file_is_refused(tiny, tmp_path):
    model, processor = tiny
    cal = dyvte.calibrate(model, batches(processor, records(2), 2), progress=False, layers=[1])
    nan = float("nan")
    other = dataclasses.replace(cal, num_layers=12, layer=12, met=False, kl_per_layer=[nan] * 12 + [0.0])
    other.save(tmp_path / "other")  # a consistent calibration of a 12-layer model
    with pytest.raises(ValueError, match="12 layers"):
        dyvte.withdraw(model, calibration=tmp_path / "other")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "calibration.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a dyvte calibration"):
        dyvte.Calibration.load(tmp_path / "bad")
    assert not model._forward_pre_hooks


def test_harness_accuracy_agreement_flops(tiny, tmp_path):
    model, processor = tiny
    recs = records(6)
    first = dyvte.evaluate(model, processor, recs, batch_size=4, max_new_tokens=2, progress=False)
    for i, rec in enumerate(recs):  # rows 0, 2, 4 answer right by construction, the others wrong
        rec["answer"] = first.answers[i] if i % 2 == 0 else "definitely-not-generated"
    full = dyvte.evaluate(model, processor, recs, batch_size=4, max_new_tokens=2, progress=False)
    assert full.answers == first.answers  # deterministic, batch-size independent of nothing else
    assert full.metrics["all"]["accuracy"] == pytest.approx(0.5)
    assert full.metrics["a"]["accuracy"] == 1.0 and full.metrics["b"]["accuracy"] == 0.0
    assert full.metrics["all"]["agreement"] == 1.0 and full.metrics["all"]["relative_flops"] == 1.0
    assert 0 < full.metrics["all"]["prefill_ms_p10"] <= full.metrics["all"]["prefill_ms_p90"]  # over the 2 batches
    never = dyvte.evaluate(
        model,
        processor,
        recs,
        dyvte.PolicyRun("static", {"layer": 4}),
        reference=full,
        batch_size=3,
        max_new_tokens=2,
        progress=False,
    )
    assert never.answers == full.answers and never.metrics["all"]["agreement"] == 1.0
    zero = dyvte.evaluate(
        model,
        processor,
        recs,
        dyvte.PolicyRun("static", {"layer": 0}),
        reference=full,
        batch_size=3,
        max_new_tokens=2,
        progress=False,
    )
    assert zero.exit_layers == [0] * 6
    inputs = build_inputs(processor, recs)
    visual = (inputs["input_ids"] == model.config.image_token_id).sum(1)
    expected = dyvte.prefill_flops(model.config, inputs["attention_mask"].sum(1), visual, 0).ratio
    assert zero.relative_flops == pytest.approx(expected.tolist())
    kv = [dyvte.prefill_kv_bytes(model.config, inputs["attention_mask"].sum(1), visual, k) for k in (0, None)]
    assert zero.metrics["all"]["kv_bytes"] == pytest.approx(float(kv[0].mean()))
    assert full.metrics["all"]["kv_bytes"] == pytest.approx(float(kv[1].mean()))
    assert zero.metrics["all"]["kv_bytes"] < full.metrics["all"]["kv_bytes"]
    agree = np.mean([a == b for a, b in zip(zero.answers, full.answers, strict=True)])
    assert zero.metrics["all"]["agreement"] == pytest.approx(agree)
    full.save(tmp_path / "full.json")
    assert dyvte.EvalResult.load(tmp_path / "full.json") == full
    plot_sweep([full, never, zero], tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert "static K=0" in format_table([full, zero]) and "| a | b | all |" in format_per_type([full])
    assert json.loads((tmp_path / "full.json").read_text())["metrics"]["all"]["samples"] == 6


def test_bad_datasets(tiny):
    model, processor = tiny
    recs = records(3)
    with pytest.raises(dyvte.DataError, match="empty"):
        dyvte.evaluate(model, processor, [], progress=False)
    broken = [dict(r) for r in recs]
    broken[1]["image"] = None
    with pytest.raises(dyvte.DataError, match="record 1 has no image"):
        dyvte.evaluate(model, processor, broken, progress=False)
    broken = [dict(r) for r in recs]
    broken[2]["answer"] = "zzqx-unknown-word"
    with pytest.raises(dyvte.DataError, match="cannot express"):
        build_inputs(processor, broken, with_answers=True)


def test_normalize_answer():
    assert normalize_answer("  Seven.\nmore") == "seven"
    assert normalize_answer("A  b") == "a b"


def test_oracle_exit_on_hand_built_results():
    from dyvte.eval.harness import EvalResult, format_histogram, oracle_exit

    def result(answers, flops):
        return EvalResult("x", {}, answers, [0] * len(answers), flops, ["a", "b", "a"])

    full = result(["1", "2", "3"], [1.0] * 3)
    static = {  # L = 3; sample 0 safe from K=1, sample 1 only at K=3 (K=2 wrong), sample 2 from K=0
        0: result(["9", "2", "3"], [0.2, 0.2, 0.2]),
        1: result(["1", "2", "3"], [0.4, 0.4, 0.4]),
        2: result(["1", "9", "3"], [0.7, 0.7, 0.7]),
        3: full,
    }
    layers, flops = oracle_exit(full, static)
    assert layers == [1, 3, 0] and flops == [0.4, 1.0, 0.2]
    table = format_histogram(layers, full.qtypes, 3)
    assert "| a | 1 | 1 | 0 | 0 | 0.50 |" in table and "| all | 1 | 1 | 0 | 1 | 1.33 |" in table
    with pytest.raises(ValueError, match="every K"):
        oracle_exit(full, {0: static[0], 3: full})


def test_composed_method_equals_nesting_by_hand(tiny):
    from dyvte.eval.methods import Compose, PruningRun, parse_method

    model, processor = tiny
    recs = records(4)
    full = dyvte.evaluate(model, processor, recs, batch_size=4, max_new_tokens=2, progress=False)
    method = Compose(PruningRun("random", {"ratio": 0.5}), dyvte.PolicyRun("static", {"layer": 1}))
    assert [m.name for m in parse_method("random:0.5+static:1", 4)] == [method.name]
    got = dyvte.evaluate(model, processor, recs, method, reference=full, batch_size=4, max_new_tokens=2, progress=False)
    inputs = build_inputs(processor, recs)
    with dyvte.prune(model, method="random", ratio=0.5) as pruning, dyvte.withdraw(model, layer=1):
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        fed_tokens, fed_visual = pruning.fed_tokens, pruning.fed_visual
    texts = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert got.answers == [normalize_answer(t) for t in texts]
    assert got.exit_layers == [1] * 4
    visual = (inputs["input_ids"] == model.config.image_token_id).sum(1)
    full_flops = dyvte.prefill_flops(model.config, inputs["attention_mask"].sum(1), visual).full
    expected = dyvte.prefill_flops(model.config, fed_tokens, fed_visual, 1).flops / full_flops
    assert got.relative_flops == pytest.approx(expected.tolist())
    assert all(r < 0.7 for r in got.relative_flops)
