"""Methods the harness runs (dyvte.eval.methods): method strings parsed through the registries, checked against the
model before anything runs, and composed methods.

Malformed or out-of-range method strings are named with their form (docs/robustness.md, case 13); well-formed ones
parse; an inconsistent calibration or directories made for another model are named with the method string; a
composed method (pruning + withdrawal) equals nesting the two by hand.
"""

from __future__ import annotations

import json
import logging
import re

import pytest

import dyvte
from dyvte.data.records import build_inputs, normalize_answer
from dyvte.eval.methods import parse_method

from ..scripts import REPO_ROOT
from ..tiny_models import TEMPLATE, make_tiny, records

DEMO_HEADS = REPO_ROOT / "checkpoints" / "demo-exit-heads"  # made for the 8-layer demo model
DEMO_CALIBRATION = REPO_ROOT / "checkpoints" / "demo-calibration"


@pytest.fixture(scope="module")
def tiny():
    model, processor = make_tiny("llava")
    processor.chat_template = TEMPLATE
    return model, processor


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


BAD_METHODS = [
    "static:abc",
    "static:",
    "static:1,,2",
    "static:9",
    "static:-1",
    "static:1.5",
    "full:1",
    "fastervlm:abc",
    "fastervlm:1",
    "fastervlm:-0.5",
    "fastervlm:nan",
    "random:",
    "fastv:2",
    "fastv:x:0.5",
    "fastv:0:0.5",
    "fastv:9:0.5",
    "fastv:2:1.5",
    "calibrated:",
    "calibrated:/no/such/dir",
    f"heads:{DEMO_HEADS}:abc",
    f"heads:{DEMO_HEADS}:0",
    f"heads:{DEMO_HEADS}:1.5",
    f"heads:{DEMO_HEADS}:",
    f"heads:{DEMO_HEADS}:0.5:0.7",
    "heads:",
    "heads:/no/such/dir:0.5",
    "bogus:1",
    "",
    "static:1+fastervlm:0.5",
    "full+static:1",
    "fastervlm:0.5+static:1+static:2",
]


@pytest.mark.parametrize("spec", BAD_METHODS)
def test_malformed_method_strings_are_named_with_their_form(spec):
    """`static:abc` / `heads:DIR:abc` gave bare int() / float() errors, `static:9` on 8 layers passed."""
    with pytest.raises(ValueError, match=re.escape(f"method {spec!r}: ") + r".*; expected "):
        parse_method(spec, 8)


def test_well_formed_method_strings_still_parse():
    assert [m.name for m in parse_method("static:0,8", 8)] == ["static K=0", "static K=8"]
    assert len(parse_method(" static:all ", 8)) == 9
    heads = parse_method(f"heads:{DEMO_HEADS}:0.5,1", 8)
    assert [m.options["threshold"] for m in heads] == [0.5, 1.0]
    assert parse_method(f"heads:{DEMO_HEADS}", 8)[0].options["threshold"] is None
    assert [m.name for m in parse_method("fastv:8:0,0.5", 8)] == ["fastv K=8 R=0", "fastv K=8 R=0.5"]
    assert len(parse_method(f"random:0.5+heads:{DEMO_HEADS}:0.5", 8)) == 1


def test_an_inconsistent_calibration_is_named_with_its_method_string(tmp_path):
    data = json.loads((DEMO_CALIBRATION / "calibration.json").read_text())
    data["layer"] = (data["layer"] + 1) % (data["num_layers"] + 1)
    (tmp_path / "calibration.json").write_text(json.dumps(data))
    spec = f"calibrated:{tmp_path}"
    with pytest.raises(ValueError, match=re.escape(f"method {spec!r}: cannot load the calibration") + ".*consistent"):
        parse_method(spec, 8)


@pytest.mark.parametrize("spec", [f"heads:{DEMO_HEADS}:0.5", f"calibrated:{DEMO_CALIBRATION}"])
def test_directories_for_another_model_are_named_before_running(spec):
    from dyvte.eval.methods import check_method

    model, _ = make_tiny("llava")  # 4 layers; the demo heads and calibration were made for 8
    hooks = len(model._forward_pre_hooks)
    for method in parse_method(spec, 4):
        with pytest.raises(ValueError, match=re.escape(f"method {spec!r} (") + r".*cannot run on this model"):
            check_method(method, model, spec)
    assert len(model._forward_pre_hooks) == hooks  # nothing left on the model


@pytest.mark.parametrize(
    "spec", [f"heads:{DEMO_HEADS}", f"calibrated:{DEMO_CALIBRATION}", f"random:0.5+heads:{DEMO_HEADS}"]
)
def test_demo_directories_on_the_lora_merged_demo_are_refused_unless_allowed(spec, caplog):
    """The method strings of train/evaluate.py: refused before running, naming the weights; ``--allow_other_model``
    (:func:`dyvte.eval.methods.allow_other_model`) runs them with a warning."""
    pytest.importorskip("peft")
    from dyvte.cli.evaluate import resolve_methods
    from dyvte.eval.methods import MethodError, allow_other_model, check_method

    from ..demo_models import demo_and_merged, fingerprint_warnings

    demo, merged, processor = demo_and_merged()
    (method,) = parse_method(spec, 8)
    check_method(method, demo, spec, processor)  # made for the demo: its weights and tokenizer
    with pytest.raises(MethodError, match=re.escape(f"method {spec!r} (") + r".*made for another model: weights"):
        check_method(method, merged, spec, processor)
    with pytest.raises(MethodError, match="allow_other_model=True"):
        resolve_methods([spec], merged, 8, processor)
    assert not merged._forward_pre_hooks
    with caplog.at_level(logging.WARNING, logger="dyvte.engine.fingerprint"):
        check_method(allow_other_model(method), merged, spec, processor)
        (chosen,) = resolve_methods([spec], merged, 8, processor, allow_other_models=True)
    assert chosen.name == method.name  # the override does not rename the method's results
    warnings = [r.getMessage() for r in fingerprint_warnings(caplog)]
    assert warnings and all("weights differ" in w and "Used anyway" in w for w in warnings)
