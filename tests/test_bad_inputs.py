"""Bad inputs to withdrawal and calibration: a clear error or a correct result, never a silent wrong number.

Each test names the case of docs/robustness.md it covers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import dyvte
from dyvte.engine.compat import cache_out
from dyvte.engine.registry import resolve
from dyvte.utils.io import atomic_path

from .scripts import load_script
from .tiny_models import make_batch, make_tiny

ROWS = [[(32, 32)], [(32, 32), (32, 32)], []]


@pytest.fixture(scope="module")
def llava():
    model, processor = make_tiny("llava")
    return model, processor, dict(make_batch(processor, "llava", ROWS))


def prompt_batches(processor) -> list[dict]:
    return [dict(make_batch(processor, "llava", [[(32, 32)], [(32, 32)]], seed=s)) for s in range(2)]


# ------------------------------------------------------------------------------------------- exit-layer arguments
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


# ---------------------------------------------------------------------------------------------- the KV cache
def test_withdrawn_cache_used_after_its_handle_is_refused(llava):
    """A cache prefilled under withdraw and decoded after the `with` block says what to do (not a shape error)."""
    model, _, inputs = llava
    with dyvte.withdraw(model, layer=1), torch.no_grad():
        cache = cache_out(model(**inputs, use_cache=True))
    step = {
        "input_ids": inputs["input_ids"][:, -1:],
        "attention_mask": torch.cat([inputs["attention_mask"], inputs["attention_mask"][:, -1:]], 1),
        resolve(model).names.cache: cache,
    }
    with pytest.raises(dyvte.WithdrawalError, match="filled under dyvte.withdraw.*same handle"), torch.no_grad():
        model(**step)
    with torch.no_grad():  # the model itself is untouched: a fresh prefill and decode step work
        fresh = cache_out(model(**inputs, use_cache=True))
        step[resolve(model).names.cache] = fresh
        assert model(**step).logits.shape[:2] == (len(ROWS), 1)


def test_full_length_cache_is_not_sealed(llava):
    """A handle that withdrew nothing (K = L) leaves an ordinary cache that decodes after the block."""
    model, _, inputs = llava
    with dyvte.withdraw(model, layer=resolve(model).num_layers), torch.no_grad():
        cache = cache_out(model(**inputs, use_cache=True))
    assert not getattr(cache, "_dyvte_sealed", False)


# ----------------------------------------------------------------------------------------------- calibration
def _saved_calibration(model, processor, tmp_path):
    cal = dyvte.calibrate(model, prompt_batches(processor), threshold=1e-2, progress=False)
    cal.save(tmp_path)
    return cal, tmp_path / "calibration.json"


def test_inconsistent_calibration_file_is_refused(llava, tmp_path):
    """A stored layer that contradicts the file's own KL curve and threshold is an error on load."""
    model, processor, _ = llava
    cal, file = _saved_calibration(model, processor, tmp_path)
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


def test_calibrate_launcher_checks_arguments_before_writing(llava, tmp_path):
    """A bad --report_thresholds fails before the model loads, and a good calibration file stays as it was."""
    model, processor, _ = llava
    _, file = _saved_calibration(model, processor, tmp_path)
    before = file.read_bytes()
    script = load_script("train/calibrate.py")
    for bad in ({"report_thresholds": [1e-3, -1.0]}, {"threshold": 0.0}, {"positions": "last"}, {"dtype": "float16"}):
        with pytest.raises(ValueError, match="threshold|positions|dtype"):
            script.main(model="/nonexistent/model", output=str(tmp_path), **bad)
    assert file.read_bytes() == before


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    target = tmp_path / "calibration.json"
    target.write_text("good")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["calibration.json"]  # no temporary file left behind


def test_a_4d_attention_mask_is_refused_naming_its_shape(llava):
    model, _, inputs = llava
    tokens = inputs["input_ids"].shape[1]
    mask = torch.ones(len(ROWS), 1, tokens, tokens)
    with dyvte.withdraw(model, layer=1), pytest.raises(dyvte.WithdrawalError, match=r"2-D padding.*\(3, 1, \d+, \d+\)"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], attention_mask=mask)
