"""VTW calibration (dyvte.exits.kl): the KL divergence per exit layer, the K it chooses, and its checks.

The KL of equal logits is 0; the curve, its choice (the smallest K meeting eta) and a JSON round trip; batch
invariance and the first answer position equal to teacher forcing; an unmet threshold means never withdrawing; bad
thresholds or positions are refused; a model in training mode is calibrated in eval mode. Applying a saved
calibration is ``tests/policies/test_policies.py``'s.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import dyvte
from dyvte.data.records import build_inputs
from dyvte.exits.kl import kl_divergence

from ..tiny_models import TEMPLATE, make_batch, make_tiny, records


@pytest.fixture(scope="module")
def tiny():
    model, processor = make_tiny("llava")
    processor.chat_template = TEMPLATE
    return model, processor


@pytest.fixture(scope="module")
def llava():
    model, processor = make_tiny("llava")
    return model, processor, dict(make_batch(processor, "llava", [[(32, 32)], [(32, 32), (32, 32)], []]))


def batches(processor, recs, size, with_answers=False):
    """``recs`` as model inputs, ``size`` records per batch."""
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


def prompt_batches(processor) -> list[dict]:
    """Two batches of two one-image LLaVA prompts (no answers)."""
    return [dict(make_batch(processor, "llava", [[(32, 32)], [(32, 32)]], seed=s)) for s in range(2)]


def test_training_mode_model_is_calibrated_in_eval_mode(tmp_path, caplog):
    """Dropout on: KL at K = L is still exactly 0, a warning says so, and the model's mode is restored."""
    model, processor = make_tiny("llava")
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5  # real dropout in training mode
    batches = prompt_batches(processor)
    model.train()
    with torch.no_grad():  # dropout really perturbs this model in training mode
        first, second = (model(**batches[0]).logits for _ in range(2))
    assert not torch.equal(first, second)
    cal = dyvte.calibrate(model, batches, threshold=1e-2, progress=False)
    assert cal.kl_per_layer[cal.num_layers] == 0.0
    assert "training mode" in caplog.text
    assert model.training and all(m.training for m in model.modules())


def test_unknown_positions_value_is_named(llava):
    model, processor, _ = llava
    with pytest.raises(ValueError, match=r"positions must be one of \('first', 'answer'\), got 'last'"):
        dyvte.calibrate(model, prompt_batches(processor), positions="last", progress=False)
