"""dyvte.policies.exit_heads: the exit heads themselves: their features, size, save / load, the refusals of heads or
thresholds that do not fit, and the committed demo heads.

What withdrawal under heads guarantees (the learned exits policy) is ``tests/policies/test_learned.py``'s; the labels
the heads learn from are ``tests/exits/test_labels.py``'s; a save that fails midway ``tests/utils/test_io.py``'s.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

import dyvte
from dyvte.engine.fingerprint import ModelMismatchError, model_fingerprint
from dyvte.engine.registry import resolve
from dyvte.policies.exit_heads import ExitHeads, ExitHeadsConfig, head_features, visual_pool

from ..demo_models import fingerprint_warnings
from ..tiny_models import TEMPLATE, make_tiny


# ------------------------------------------------------------------------------------------------- features
def test_head_features_hand_built():
    hidden = torch.arange(6.0).view(1, 6, 1).repeat(2, 1, 1)  # token t has state t
    visual = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    feats = head_features(hidden, visual, valid)
    assert feats.tolist() == [[3.5, 5.0], [2.5, 5.0]]  # mean of tokens 3,4 / 1..4 ; final token 5
    feats = head_features(hidden, visual, valid, final=torch.tensor([4, 3]))
    assert feats.tolist() == [[3.0, 4.0], [1.5, 3.0]]


# -------------------------------------------------------------------------------------------------------- heads
@pytest.fixture(scope="module")
def tiny():
    model, processor = make_tiny("llava")
    processor.chat_template = TEMPLATE
    return model, processor


def test_default_size_is_small_and_save_load_round_trip(tiny, tmp_path):
    model, _ = tiny
    heads = ExitHeads.for_model(model, threshold=0.7)
    spec = resolve(model)
    decoder = sum(p.numel() for p in spec.decoder.parameters())
    assert heads.num_heads == spec.num_layers - 1
    big = ExitHeadsConfig("llava", 4096, 32)  # LLaVA-1.5-7B's decoder: 6.5 B parameters
    assert big.head_size == 128
    assert sum(p.numel() for p in ExitHeads(big).parameters()) < 0.01 * 6.5e9
    assert ExitHeadsConfig("llava", 8192, 80).head_size == 256  # d // 32 above the floor
    assert heads.config.head_size == 128  # the floor of max(128, d // 32): tiny decoders make heads relatively big
    assert decoder > 0
    heads.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exit_heads.safetensors", "exit_heads_config.json"]
    config = json.loads((tmp_path / "exit_heads_config.json").read_text())
    assert config == {
        "model_type": "llava",
        "hidden_size": 64,
        "num_layers": 4,
        "head_size": 128,
        "threshold": 0.7,
        "format_version": 1,
        "thresholds": None,
        "calibration": None,
        "label_rule": None,
        "extra_inputs": None,
        "threshold_logits": None,
        "model_fingerprint": model_fingerprint(model),  # fresh heads are tied to the model they were shaped for
        "score_reference": None,  # set by fit's calibration (the shift check's reference)
        "layer_change": False,
        "members": 1,  # trained alone, not an average (ExitHeads.average)
        "visual_inputs": False,  # the text tokens' features only
    }
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "exit_heads.safetensors"))
    assert set(saved) == {f"heads.{j}.{i}.{w}" for j in range(3) for i in (0, 1, 3) for w in ("weight", "bias")}
    loaded = ExitHeads.from_pretrained(tmp_path)
    feats = torch.randn(2, 3, 128)
    assert torch.equal(loaded(feats), heads.eval()(feats))
    heads.config.score_reference = {"num_quantiles": 2, "n": [5, 1, 0], "quantiles": [[-1.0, 2.0], [0.5, 0.5], None]}
    heads.save_pretrained(tmp_path)
    assert ExitHeads.from_pretrained(tmp_path).config.score_reference == heads.config.score_reference


@pytest.mark.parametrize("layer_change", [False, True])
def test_averaged_heads_equal_the_mean_of_their_members_logits(tmp_path, layer_change):
    torch.manual_seed(0)
    members = []
    for width in (8, 8, 16):  # members of different widths, with LayerNorm scales and shifts that are not 1 and 0
        heads = ExitHeads(ExitHeadsConfig("llava", 16, 5, head_size=width, layer_change=layer_change))
        for param in heads.parameters():
            param.data.normal_()
        members.append(heads.eval())
    average = ExitHeads.average(members)
    assert (average.config.head_size, average.config.members) == (32, 3)
    feats = 3 * torch.randn(64, 4, 32) + 1  # (B, L-1, 2d)
    with torch.no_grad():
        mean = torch.stack([m(feats) for m in members]).mean(0)
        assert torch.allclose(average(feats), mean, rtol=0, atol=1e-4 * mean.abs().max())
        # the average of an average and one more set weighs each of the four sets alike
        again = ExitHeads.average([average, members[0]])
        assert again.config.members == 4
        four = (3 * mean + members[0](feats)) / 4
        assert torch.allclose(again(feats), four, rtol=0, atol=1e-4 * four.abs().max())
        average.save_pretrained(tmp_path)
        loaded = ExitHeads.from_pretrained(tmp_path)
        assert loaded.config.members == 3 and torch.equal(loaded(feats), average(feats))
        # and at run time: one head at a time, as LearnedExit calls them
        for j in range(4):
            previous = feats[:, j - 1] if j else None
            step = torch.stack([m.layer_logits(j, feats[:, j], previous) for m in members]).mean(0)
            assert torch.allclose(loaded.layer_logits(j, feats[:, j], previous), step, atol=1e-4 * mean.abs().max())


def test_averages_of_heads_that_do_not_match_are_refused(tmp_path):
    base = ExitHeads(ExitHeadsConfig("llava", 16, 5))
    with pytest.raises(ValueError, match="at least one"):
        ExitHeads.average([])
    for other, field in (
        (ExitHeadsConfig("llava", 16, 4), "num_layers"),
        (ExitHeadsConfig("qwen2_vl", 16, 5), "model_type"),
        (ExitHeadsConfig("llava", 16, 5, layer_change=True), "layer_change"),
        (ExitHeadsConfig("llava", 16, 5, visual_inputs=True), "visual_inputs"),
    ):
        with pytest.raises(ValueError, match=f"differ in {field}"):
            ExitHeads.average([base, ExitHeads(other)])
    base.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "exit_heads_config.json").read_text())
    for bad in (0, 1.5, True):
        (tmp_path / "exit_heads_config.json").write_text(json.dumps({**config, "members": bad}))
        with pytest.raises(ValueError, match="members must be a positive integer"):
            ExitHeads.from_pretrained(tmp_path)
    (tmp_path / "exit_heads_config.json").write_text(json.dumps({**config, "visual_inputs": "yes"}))
    with pytest.raises(ValueError, match="visual_inputs must be true or false, got 'yes'"):
        ExitHeads.from_pretrained(tmp_path)


def test_visual_pool_is_the_mean_and_max_of_the_real_visual_tokens():
    """The visual inputs pool only real visual slots (padding and text excluded, in any layout); a row without
    visual tokens gets zeros; features put them after the text tokens' ``2d``."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 6, 4)  # (B, T, d)
    visual = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    hidden[0, 4] = 100.0  # a padding slot marked visual: never pooled
    pooled = visual_pool(hidden, visual, valid)  # (B, 2d)
    for row, slots in ((0, [1, 2]), (1, [0, 1])):
        torch.testing.assert_close(pooled[row, :4], hidden[row, slots].mean(0))
        torch.testing.assert_close(pooled[row, 4:], hidden[row, slots].amax(0))
    assert torch.equal(pooled[2], torch.zeros(8))
    features = head_features(hidden, visual, valid, visual_inputs=True)
    assert features.shape == (3, 16)
    assert torch.equal(features[:, :8], head_features(hidden, visual, valid)) and torch.equal(features[:, 8:], pooled)
    config = ExitHeadsConfig("llava", 4, 3, visual_inputs=True)
    assert (config.feature_size, config.input_size) == (16, 16)
    assert ExitHeadsConfig("llava", 4, 3, visual_inputs=True, layer_change=True).input_size == 32


def test_heads_for_another_model_or_corrupt_files_are_refused(tiny, tmp_path):
    model, _ = tiny
    other, _ = make_tiny("llava", num_layers=3)
    heads = ExitHeads.for_model(other)
    with pytest.raises(ValueError, match="3 layers"):
        dyvte.withdraw(model, heads=heads)
    assert not model._forward_pre_hooks
    with pytest.raises(FileNotFoundError, match="exit_heads_config.json"):
        ExitHeads.from_pretrained(tmp_path)
    heads.save_pretrained(tmp_path)
    weights = tmp_path / "exit_heads.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt"):
        ExitHeads.from_pretrained(tmp_path)
    ExitHeads.for_model(model).save_pretrained(tmp_path / "four")
    (tmp_path / "four" / "exit_heads.safetensors").replace(weights)  # weights of 4-layer heads, config of 3
    ExitHeads.for_model(other).save_pretrained(tmp_path / "x")
    (tmp_path / "x" / "exit_heads_config.json").replace(tmp_path / "exit_heads_config.json")
    with pytest.raises(ValueError, match="does not hold|shape"):
        ExitHeads.from_pretrained(tmp_path)
    (tmp_path / "exit_heads_config.json").write_text("{]")
    with pytest.raises(ValueError, match="not a valid"):
        ExitHeads.from_pretrained(tmp_path)


def test_bad_calibrated_thresholds_and_ablation_inputs_are_refused(tiny, tmp_path):
    model, _ = tiny
    heads = ExitHeads.for_model(model)
    heads.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "exit_heads_config.json").read_text())
    for thresholds, match in (([0.5, 0.5], r"one per head \(3\) expected, got 2"), ([0.5, 2.0, 0.5], r"\[2.0\]")):
        (tmp_path / "exit_heads_config.json").write_text(json.dumps({**config, "thresholds": thresholds}))
        with pytest.raises(ValueError, match=match):
            ExitHeads.from_pretrained(tmp_path)
    (tmp_path / "exit_heads_config.json").write_text(json.dumps({**config, "layer_change": "yes"}))
    with pytest.raises(ValueError, match="layer_change must be true or false, got 'yes'"):
        ExitHeads.from_pretrained(tmp_path)
    (tmp_path / "exit_heads_config.json").write_text(json.dumps({**config, "layer_change": True}))
    with pytest.raises(ValueError):  # heads saved without the change input cannot load as heads that read it
        ExitHeads.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"extra_inputs: unknown \['logits'\]"):
        ExitHeadsConfig("llava", 64, 4, extra_inputs=["logits"])
    lens = ExitHeads(ExitHeadsConfig("llava", 64, 4, extra_inputs=["lens"]))
    assert lens.heads[0][1].in_features == 2 * 64 + 2
    with pytest.raises(ValueError, match=r"extra inputs \['lens'\] .* that withdrawal does not compute"):
        dyvte.withdraw(model, heads=lens)
    assert not model._forward_pre_hooks


# ------------------------------------------------------------------------------------------ the demo's heads
def test_committed_demo_heads_record_a_promise_their_calibration_certifies():
    """The committed heads' calibration record is self-consistent: its binomial p-value, recomputed from the counts it
    saves, is the saved one and <= delta; it was certified on validation records disjoint from the Platt-scaling
    (validation) records; its P(exit) thresholds are the sigmoids of the logits the heads fire on."""
    from dyvte.exits.risk import binomial_cdf
    from dyvte.exits.rules import exit_logit
    from tests.scripts import REPO_ROOT

    config = json.loads((REPO_ROOT / "checkpoints" / "demo-exit-heads" / "exit_heads_config.json").read_text())
    training = json.loads((REPO_ROOT / "checkpoints" / "demo-exit-heads" / "training.json").read_text())
    cal = config["calibration"]
    p_value = binomial_cdf(cal["errors"], cal["samples"], cal["tolerance"])
    assert p_value == pytest.approx(cal["p_value"], rel=1e-9) and p_value <= cal["delta"]
    val_samples = training["val_samples"]
    assert cal["source"]["calib"] == f"demo [validation] records {val_samples}..{val_samples + cal['samples'] - 1}"
    assert cal["family"] == "savings" and cal["tolerance"] == 0.01 and cal["delta"] == 0.1
    for p, logit in zip(config["thresholds"], config["threshold_logits"], strict=True):
        assert logit is not None and float(exit_logit(p)) == pytest.approx(logit, rel=1e-5, abs=1e-4)


# ------------------------------------------------------------------------- heads tied to the model they were fit on
@pytest.fixture(scope="module")
def demo_and_merged():
    pytest.importorskip("peft")
    from ..demo_models import demo_and_merged

    return demo_and_merged()


def test_committed_demo_heads_carry_the_demo_models_fingerprint(demo_and_merged):
    from ..demo_models import DEMO_HEADS

    demo, _, processor = demo_and_merged
    saved = ExitHeads.from_pretrained(DEMO_HEADS).config.model_fingerprint
    assert saved == model_fingerprint(demo, processor)  # weights, tokenizer and chat template, as fit records them


def test_demo_heads_are_refused_on_the_lora_merged_demo_unless_allowed(demo_and_merged, caplog):
    """Issue 28: the merged demo has the heads' type, width and depth; there their "<= 1% differ" became 18.8%."""
    from ..demo_models import DEMO_HEADS

    demo, merged, processor = demo_and_merged
    heads = ExitHeads.from_pretrained(DEMO_HEADS)
    with pytest.raises(ModelMismatchError, match=r"exit heads .*demo-exit-heads was made for another model: weights"):
        dyvte.withdraw(merged, heads=heads)
    assert not merged._forward_pre_hooks  # refused before any hook
    with pytest.raises(ModelMismatchError, match="weights differ"):
        heads.check_model(merged, processor)
    with caplog.at_level(logging.WARNING, logger="dyvte.engine.fingerprint"):
        with dyvte.withdraw(demo, heads=heads):  # the demo itself: no warning
            pass
        heads.check_model(demo, processor)
        assert not fingerprint_warnings(caplog)
        with dyvte.withdraw(merged, heads=heads, allow_other_model=True) as handle:
            assert merged._forward_pre_hooks and handle.layer is None  # attached: a run-time policy
    (warning,) = [r.getMessage() for r in fingerprint_warnings(caplog)]
    assert "weights differ" in warning and "Used anyway (allow_other_model=True)" in warning
    assert not merged._forward_pre_hooks and not demo._forward_pre_hooks
    with pytest.raises(TypeError, match="allow_other_model= applies to heads= and calibration= only"):
        dyvte.withdraw(demo, layer=3, allow_other_model=True)


def test_heads_saved_without_a_fingerprint_are_accepted_with_a_warning(tiny, tmp_path, caplog):
    model, processor = tiny
    heads = ExitHeads.for_model(model, processor=processor)
    assert heads.config.model_fingerprint == model_fingerprint(model, processor)
    heads.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "exit_heads_config.json").read_text())
    del config["model_fingerprint"]  # as 0.2 wrote them
    (tmp_path / "exit_heads_config.json").write_text(json.dumps(config))
    old = ExitHeads.from_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="dyvte.engine.fingerprint"):
        with dyvte.withdraw(model, heads=old):
            pass
    (warning,) = [r.getMessage() for r in fingerprint_warnings(caplog)]
    assert "carries no model fingerprint" in warning and str(tmp_path) in warning
    config["model_fingerprint"] = "abc"
    (tmp_path / "exit_heads_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_fingerprint must be a dict or null"):
        ExitHeads.from_pretrained(tmp_path)
