"""Exit heads: labels on hand-built tensors, save/load, and adaptive withdrawal invariants."""

from __future__ import annotations

import json

import pytest
import torch

import dyvte
from dyvte.data.records import build_inputs
from dyvte.engine.registry import resolve
from dyvte.eval.flops import prefill_flops
from dyvte.exits.labels import answer_loss, build_label_cache, exit_safe, on_the_fly_labels, smallest_safe_layer
from dyvte.policies.exit_heads import ExitHeads, ExitHeadsConfig, head_features

from .oracle import check_heads_rows_alone
from .test_calibrate_evaluate import TEMPLATE, records
from .tiny_models import constant_heads, make_batch, make_tiny, sharpened_heads

ROWS = [[(32, 32)], [(48, 32), (32, 32)], []]


def one_hot_logits(tokens: list[list[int]], vocab: int = 5, scale: float = 4.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(tokens), vocab).float() * scale


# ------------------------------------------------------------------------------------------------------- labels
def test_exit_rule_on_hand_built_tensors():
    labels = torch.tensor([[-100, -100, 2, 3], [-100, -100, -100, 1]])  # answers: [2, 3] and [1]
    full = one_hot_logits([[0, 2, 3, 0], [0, 0, 1, 0]])  # predicts the answers at positions 1, 2 and 2
    same = full.clone()
    one_wrong = one_hot_logits([[0, 2, 4, 0], [0, 0, 1, 0]])  # row 0: 1 of 2 answer tokens differ
    assert exit_safe(full, same, labels).tolist() == [True, True]  # identical: safe even at the same loss
    assert exit_safe(full, one_wrong, labels).tolist() == [False, True]
    assert exit_safe(full, one_wrong, labels, agree=0.49).tolist() == [False, True]  # loss rose far above 1.03x
    softer = full.clone()
    softer[1, 2, 1] = 3.9  # same argmax, loss a little higher
    ratio = (answer_loss(softer, labels) / answer_loss(full, labels))[1].item()
    assert ratio > 1.03
    assert exit_safe(full, softer, labels).tolist() == [True, False]
    assert exit_safe(full, softer, labels, loss_ratio=ratio + 1e-3).tolist() == [True, True]
    with pytest.raises(ValueError, match="answer token"):
        exit_safe(full, same, torch.full_like(labels, -100))


def test_smallest_safe_layer():
    safe = torch.tensor([[False, True, True, True], [True, False, True, True], [True] * 4, [False] * 4])
    assert smallest_safe_layer(safe).tolist() == [1, 2, 0, 4]


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
    }
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "exit_heads.safetensors"))
    assert set(saved) == {f"heads.{j}.{i}.{w}" for j in range(3) for i in (0, 1, 3) for w in ("weight", "bias")}
    loaded = ExitHeads.from_pretrained(tmp_path)
    feats = torch.randn(2, 3, 128)
    assert torch.equal(loaded(feats), heads.eval()(feats))


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
    with pytest.raises(ValueError, match=r"extra_inputs: unknown \['logits'\]"):
        ExitHeadsConfig("llava", 64, 4, extra_inputs=["logits"])
    lens = ExitHeads(ExitHeadsConfig("llava", 64, 4, extra_inputs=["lens"]))
    assert lens.heads[0][1].in_features == 2 * 64 + 2
    with pytest.raises(ValueError, match=r"extra inputs \['lens'\] .* that withdrawal does not compute"):
        dyvte.withdraw(model, heads=lens)
    assert not model._forward_pre_hooks


def test_heads_that_never_fire_equal_the_unhooked_model(tiny):
    model, processor = tiny
    inputs = dict(make_batch(processor, "llava", ROWS))
    with torch.no_grad():
        base = model(**inputs).logits
    base_tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    for heads, threshold in ((constant_heads(model, None), 0.5), (ExitHeads.for_model(model), 1.01)):
        with dyvte.withdraw(model, heads=heads, threshold=threshold) as handle:
            with torch.no_grad():
                assert torch.equal(model(**inputs).logits, base)
            assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), base_tokens)
            assert handle.exit_layers.tolist() == [4, 4, 4]


@pytest.mark.parametrize("head", [0, 1, 2])
def test_head_firing_on_layer_k_equals_static_withdrawal_at_k_plus_1(tiny, head):
    model, processor = tiny
    inputs = dict(make_batch(processor, "llava", ROWS))
    with dyvte.withdraw(model, layer=head + 1):
        with torch.no_grad():
            static = model(**inputs).logits
        static_tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with dyvte.withdraw(model, heads=constant_heads(model, head)) as handle:
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, static)
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), static_tokens)
        assert handle.exit_layers.tolist() == [head + 1] * 3


#: the families whose exit heads no other test file covers (test_heads_families.py, test_qwen3_vl.py, test_qwen3_5.py,
#: test_video_qwen.py cover the rest)
HEADS_FAMILIES = ["llava", "llava_next", "qwen2_vl", "internvl", "gemma3", "idefics3", "smolvlm"]


@pytest.mark.parametrize("family", HEADS_FAMILIES)
def test_ragged_batch_with_different_exit_layers_equals_rows_alone(family):
    model, processor = make_tiny(family)
    inputs = dict(make_batch(processor, family, ROWS))
    heads = sharpened_heads(model)  # rows disagree about when to leave

    def alone(row: int) -> dict:
        return dict(make_batch(processor, family, [ROWS[row]], row_ids=[row]))

    def generate(model, inputs: dict) -> torch.Tensor:
        return model.generate(**inputs, max_new_tokens=3, do_sample=False)[:, -3:]

    check_heads_rows_alone(model, inputs, heads, alone, generate)


# ------------------------------------------------------------------------------------------------ label caching
def _greedy(model, inputs, eos: int, new_tokens: int) -> list[list[int]]:
    """Each row's greedy answer ids up to and including the first end token (``new_tokens`` at most)."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    out = out[:, inputs["input_ids"].shape[1] :]
    rows = []
    for row in out.tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def test_cached_labels_equal_generation_under_withdrawal_and_on_the_fly_labels(tiny):
    model, processor = tiny
    recs = records(5)
    for i, rec in enumerate(recs):  # answers the full model gives, so that some layers are safe
        inputs = build_inputs(processor, [rec])
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
        rec["answer"] = processor.tokenizer.decode(out[0, -1:]) if i % 2 == 0 else rec["answer"]
    cache = build_label_cache(model, processor, recs, batch_size=2, max_new_tokens=2, progress=False)
    cache = cache.with_format("torch")[:]  # 2-token answers: a random model's longer ones never survive withdrawal
    assert cache["features"].shape == (5, 3, 128) and cache["match"].shape == (5, 4)
    assert cache["correct"].shape == (5, 5)
    eos = processor.tokenizer.eos_token_id
    prompt = build_inputs(processor, recs)
    gold = build_inputs(processor, recs, with_answers=True)["labels"]
    gold = [row[row != -100].tolist() for row in gold]
    full = _greedy(model, prompt, eos, 2)
    assert cache["correct"][:, 4].tolist() == [f == g for f, g in zip(full, gold, strict=True)]
    for layer in range(4):  # match / correct: exactly what greedy generation under withdrawal at K writes
        with dyvte.withdraw(model, layer=layer):
            answers = _greedy(model, prompt, eos, 2)
        assert cache["match"][:, layer].tolist() == [a == f for a, f in zip(answers, full, strict=True)], layer
        assert cache["correct"][:, layer].tolist() == [a == g for a, g in zip(answers, gold, strict=True)], layer
    assert not cache["match"].all() and cache["match"].any()  # both outcomes occur: the comparison can fail
    inputs = build_inputs(processor, recs, with_answers=True)
    labels = inputs["labels"]
    with torch.no_grad():
        full_logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    for layer in (1, 2, 3):  # the paper's rule and the head inputs: as the on-the-fly labels compute them
        feats, fly = on_the_fly_labels(model, inputs, layer)
        assert fly.tolist() == cache["dyvte"][:, layer].tolist()
        torch.testing.assert_close(feats, cache["features"][:, layer - 1], atol=1e-5, rtol=1e-5)
        with dyvte.withdraw(model, layer=layer) as handle, torch.no_grad():
            withdrawn = handle.to_input_positions(model(**{k: v for k, v in inputs.items() if k != "labels"}).logits)
        assert exit_safe(full_logits, withdrawn, labels).tolist() == cache["dyvte"][:, layer].tolist()
    with pytest.raises(ValueError, match="exit layer"):
        on_the_fly_labels(model, inputs, 0)


def test_committed_demo_heads_load_onto_the_demo_model():
    from dyvte.data.records import build_inputs as inputs_of
    from dyvte.demo import load_demo_dataset, load_demo_model, load_demo_processor
    from tests.scripts import REPO_ROOT

    model, processor = load_demo_model(), load_demo_processor()
    heads = ExitHeads.from_pretrained(REPO_ROOT / "checkpoints" / "demo-exit-heads")
    heads.check_model(model)
    batch = inputs_of(processor, list(load_demo_dataset("test").select(range(8))))
    tokens = batch["attention_mask"].sum(1)
    visual = torch.isin(batch["input_ids"], resolve(model).visual_ids).sum(1)
    prefill = prefill_flops(model.config, tokens, visual).full  # (B,) the full model's prefill FLOPs per row
    assert heads.num_heads * heads.flops_per_row() <= 0.01 * prefill.min()  # every head costs < 1% of a prefill
    with torch.no_grad():
        base = model(**batch).logits[:, -1]
    with dyvte.withdraw(model, heads=heads, threshold=0.5) as handle, torch.no_grad():
        last = model(**batch).logits[:, -1]
        exits = handle.exit_layers
    assert ((exits >= 1) & (exits <= 8)).all()
    never = exits == 8  # rows whose heads never fired are the full model
    torch.testing.assert_close(last[never], base[never], atol=1e-5, rtol=1e-5)


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
