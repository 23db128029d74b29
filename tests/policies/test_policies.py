"""The host-planned exit policies and the policy registry: static K (dyvte.policies.static), a K per row, calibrated K
(dyvte.policies.calibrated), and a new policy registered in one class (dyvte.engine.policy).

- a 0-d tensor or numpy scalar is one K, a 1-D array or tensor a K per row; a K out of range, of the wrong type or
  shape is refused naming the problem, and nothing is left on the model (docs/robustness.md);
- a calibration file that contradicts itself, was made for another model or is corrupt is refused;
- a new policy is one class and one registration, by name or as an instance.

What withdrawal at a K guarantees is ``tests/engine/test_withdrawal.py``'s; how VTW's KL criterion chooses the K is
``tests/exits/test_kl.py``'s.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch

import dyvte
from dyvte.engine.fingerprint import ModelMismatchError, model_fingerprint
from dyvte.engine.policy import POLICIES, ExitPolicy, register_policy

from ..demo_models import fingerprint_warnings
from ..exits.test_kl import batches, prompt_batches
from ..tiny_models import TEMPLATE, make_batch, make_tiny, records

ROWS = [[(32, 32)], [(32, 32), (32, 32)], []]
NUM_LAYERS = 8


@pytest.fixture(scope="module")
def llava():
    model, processor = make_tiny("llava")
    return model, processor, dict(make_batch(processor, "llava", ROWS))


@pytest.fixture(scope="module")
def llava8():
    model, processor = make_tiny("llava", num_layers=NUM_LAYERS)
    return model, dict(make_batch(processor, "llava", [[(32, 32)], [(48, 32), (32, 32)], []]))


@pytest.fixture(scope="module")
def tiny():
    model, processor = make_tiny("llava")
    processor.chat_template = TEMPLATE
    return model, processor


# ----------------------------------------------------------------------------------------- static and per-row K
@pytest.mark.parametrize(
    ("layer", "error"), [(-1, ValueError), (5, ValueError), ("2", TypeError), (True, TypeError), (None, TypeError)]
)
def test_layer_out_of_range(llava, layer, error):
    model, _, _ = llava
    with pytest.raises(error, match="layer"):
        dyvte.withdraw(model, layer=layer)
    assert not model._forward_pre_hooks  # nothing left behind


@pytest.mark.parametrize(
    ("layer", "static", "rows"),
    [
        (torch.tensor(2), 2, None),
        (np.int64(2), 2, None),
        (np.array(1), 1, None),
        (np.array([1, 2, 0]), None, [1, 2, 0]),
        (torch.tensor([2, 0, 1]), None, [2, 0, 1]),
    ],
)
def test_scalar_tensors_are_a_k_and_arrays_are_per_row(llava, layer, static, rows):
    """A 0-d tensor or numpy scalar is one K; a 1-D array or tensor gives each row its own K."""
    model, _, inputs = llava
    with dyvte.withdraw(model, layer=layer) as handle, torch.no_grad():
        assert handle.layer == static
        model(**inputs)
        expected = [static] * len(ROWS) if rows is None else rows
        assert handle.exit_layers.tolist() == expected


@pytest.mark.parametrize(
    ("layer", "match"),
    [(torch.tensor(1.5), "int K"), (np.array([[1, 2]]), "1-D"), (np.array([0.5, 1.0]), "1-D"), ("2", "int")],
)
def test_bad_layer_values_name_the_problem(llava, layer, match):
    model = llava[0]
    with pytest.raises(TypeError, match=match):
        dyvte.withdraw(model, layer=layer)
    assert not model._forward_pre_hooks


# ------------------------------------------------------------------------------------------------ calibrated K
def saved_calibration(model, processor, tmp_path):
    """Calibrate ``model`` on two prompt batches, save it in ``tmp_path``: ``(calibration, its calibration.json)``."""
    cal = dyvte.calibrate(model, prompt_batches(processor), threshold=1e-2, progress=False)
    cal.save(tmp_path)
    return cal, tmp_path / "calibration.json"


def test_inconsistent_calibration_file_is_refused(llava, tmp_path):
    """A stored layer that contradicts the file's own KL curve and threshold is an error on load."""
    model, processor, _ = llava
    cal, file = saved_calibration(model, processor, tmp_path)
    data = json.loads(file.read_text())
    wrong = (cal.layer + 1) % (cal.num_layers + 1)  # not the layer its own curve and threshold choose
    file.write_text(json.dumps({**data, "layer": wrong}))
    with pytest.raises(ValueError, match=rf"calibration.json is not a consistent.*stores layer={wrong}"):
        dyvte.Calibration.load(tmp_path)
    with pytest.raises(ValueError, match="not a consistent"):
        dyvte.withdraw(model, calibration=tmp_path)
    assert not model._forward_pre_hooks
    file.write_text(json.dumps({**data, "kl_per_layer": data["kl_per_layer"][:-1]}))
    with pytest.raises(ValueError, match="L \\+ 1"):
        dyvte.Calibration.load(file)
    file.write_text(json.dumps({**data, "positions": "last"}))
    with pytest.raises(ValueError, match="positions"):
        dyvte.Calibration.load(file)


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


@pytest.mark.parametrize(
    ("curve", "match"),
    [
        ([-0.5, 0.2, 0.1, 0.0, 0.0], r"kl_per_layer\[0\] = -0.5 is negative"),  # would choose K = 0 (issue 28)
        ([7.5, 0.25, 0.002, 0.001, float("nan")], r"kl_per_layer\[4\] = NaN, but K = L is always scored"),
        ([7.5, float("inf"), 0.002, 0.001, 0.0], r"kl_per_layer\[1\] = inf is infinite"),
        ([7.5, "0.2", 0.002, 0.001, 0.0], r"kl_per_layer\[1\] = '0.2' is not a number"),
        ([7.5, 0.2, None, 0.001, 0.0], r"kl_per_layer\[2\] = None is not a number"),
        ([7.5, 0.2, 0.002, 0.0], r"kl_per_layer must hold L \+ 1 = 5 values"),
    ],
)
def test_an_impossible_kl_curve_is_refused_naming_the_layer(llava, tmp_path, curve, match):
    """A KL divergence is a number >= 0; NaN only marks a layer K < L that was not scored."""
    model = llava[0]
    data = {"layer": 4, "kl_per_layer": curve, "threshold": 3e-3, "num_samples": 10, "positions": "first"}
    data |= {"model_type": "llava", "num_layers": 4, "met": False}
    (tmp_path / "calibration.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        dyvte.Calibration.load(tmp_path)
    with pytest.raises(ValueError, match=match):
        dyvte.withdraw(model, calibration=tmp_path)
    assert not model._forward_pre_hooks
    nan = float("nan")
    unscored = dyvte.Calibration(2, [nan, nan, 0.002, nan, 0.0], 3e-3, 10, "first", "llava", 4, True)
    unscored.save(tmp_path / "ok")  # NaN where not scored (calibrate(layers=...)) is a valid curve
    assert dyvte.Calibration.load(tmp_path / "ok").layer == 2


@pytest.fixture(scope="module")
def demo_and_merged():
    pytest.importorskip("peft")
    from ..demo_models import demo_and_merged

    return demo_and_merged()


def test_demo_calibration_is_refused_on_the_lora_merged_demo_unless_allowed(demo_and_merged, caplog):
    from ..demo_models import DEMO_CALIBRATION

    demo, merged, processor = demo_and_merged
    calibration = dyvte.Calibration.load(DEMO_CALIBRATION)
    assert calibration.model_fingerprint == model_fingerprint(demo, processor)  # the committed file carries it
    with pytest.raises(ModelMismatchError, match=r"calibration .*calibration.json was made for another model: weights"):
        dyvte.withdraw(merged, calibration=DEMO_CALIBRATION)
    assert not merged._forward_pre_hooks
    with pytest.raises(ModelMismatchError, match="weights differ"):
        calibration.check_model(merged, processor)
    with caplog.at_level(logging.WARNING, logger="dyvte.engine.fingerprint"):
        with dyvte.withdraw(demo, calibration=calibration) as handle:  # its own model: no warning
            assert handle.layer == calibration.layer
        calibration.check_model(demo, processor)
        assert not fingerprint_warnings(caplog)
        with dyvte.withdraw(merged, calibration=calibration, allow_other_model=True) as handle:
            assert handle.layer == calibration.layer
    (warning,) = [r.getMessage() for r in fingerprint_warnings(caplog)]
    assert "weights differ" in warning and "Used anyway (allow_other_model=True)" in warning


def test_a_calibration_records_its_model_and_one_without_is_accepted_with_a_warning(tiny, tmp_path, caplog):
    model, processor = tiny
    cal = dyvte.calibrate(model, batches(processor, records(2), 2), progress=False, layers=[1], processor=processor)
    assert cal.model_fingerprint == model_fingerprint(model, processor)
    assert cal.with_threshold(1.0).model_fingerprint == cal.model_fingerprint
    cal.save(tmp_path)
    data = json.loads((tmp_path / "calibration.json").read_text())
    assert dyvte.Calibration.load(tmp_path).model_fingerprint == cal.model_fingerprint  # saved and loaded
    del data["model_fingerprint"]  # a file written before fingerprints
    (tmp_path / "calibration.json").write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="dyvte.engine.fingerprint"):
        with dyvte.withdraw(model, calibration=tmp_path):
            pass
    (warning,) = [r.getMessage() for r in fingerprint_warnings(caplog)]
    assert "carries no model fingerprint" in warning


# ------------------------------------------------------------------------------------------ a new policy
class EveryRowAtTheMiddle(ExitPolicy):
    """A new policy in one class: every row leaves at layer L // 2 (planned on the host)."""

    def planned_exits(self, state):
        return [self.spec.num_layers // 2] * state.batch

    def earliest_exit(self) -> int:
        return self.spec.num_layers // 2


class LeaveWhenImagesAreLong(ExitPolicy):
    """A run-time policy: a row leaves at ``layer`` if it holds more than ``tokens`` visual tokens."""

    def __init__(self, layer: int, tokens: int) -> None:
        self.at, self.tokens = layer, tokens

    def decide(self, layer, hidden, state):
        return (state.visual & state.valid).sum(1) > self.tokens if layer == self.at else state.valid[:, 0] & False


def test_a_new_policy_is_one_class_and_one_registration(llava8):
    model, inputs = llava8
    register_policy("middle", lambda model: EveryRowAtTheMiddle())
    register_policy("long_images", lambda model, at, tokens: LeaveWhenImagesAreLong(at, tokens))
    try:
        with dyvte.withdraw(model, layer=NUM_LAYERS // 2), torch.no_grad():
            reference = model(**inputs).logits
        with dyvte.withdraw(model, policy="middle") as handle, torch.no_grad():
            assert torch.equal(model(**inputs).logits, reference)
        assert handle.exit_layers.tolist() == [NUM_LAYERS // 2] * 3
        with dyvte.withdraw(model, policy="long_images", at=2, tokens=20) as handle, torch.no_grad():
            model(**inputs)
        assert handle.exit_layers.tolist() == [NUM_LAYERS, 2, NUM_LAYERS]  # only row 1 has two images (32 tokens)
        with dyvte.withdraw(model, policy=EveryRowAtTheMiddle()) as handle, torch.no_grad():  # or an instance
            assert torch.equal(model(**inputs).logits, reference)
    finally:
        POLICIES.pop("middle")
        POLICIES.pop("long_images")
    with pytest.raises(ValueError, match="unknown exit policy 'middle'"):
        dyvte.withdraw(model, policy="middle")
    with pytest.raises(TypeError, match="options go with policy"):
        dyvte.withdraw(model, layer=1, tokens=3)
