"""Withdrawal on unusual and bad inputs: clear errors, nothing lost, and the loss / inputs_embeds paths."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dyvte
from dyvte.engine.compat import cache_out
from dyvte.engine.registry import resolve
from dyvte.eval.methods import Method

from .oracle import oracle_logits, visual_mask
from .tiny_models import make_batch, make_tiny

ROWS = [[(32, 32)], [(32, 32), (32, 32)], []]
VIEW = 16  # patches per image of the tiny LLaVA (CLIP 32 px / patch 8)
DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.md"


@pytest.fixture(scope="module")
def llava():
    model, processor = make_tiny("llava")
    return model, dict(make_batch(processor, "llava", ROWS))


def test_unsupported_model_names_the_supported_families():
    model = LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=50)
    )
    with pytest.raises(dyvte.UnsupportedModelError, match="llava, llava_next.*qwen2_vl"):
        dyvte.withdraw(model, layer=1)
    assert not model._forward_pre_hooks


@pytest.mark.parametrize(
    ("layer", "error"), [(-1, ValueError), (5, ValueError), ("2", TypeError), (True, TypeError), (None, TypeError)]
)
def test_layer_out_of_range(llava, layer, error):
    model, _ = llava
    with pytest.raises(error, match="layer"):
        dyvte.withdraw(model, layer=layer)
    assert not model._forward_pre_hooks  # nothing left behind


def test_nested_withdrawal_is_refused_and_the_first_survives(llava):
    model, inputs = llava
    with dyvte.withdraw(model, layer=1):
        with pytest.raises(dyvte.WithdrawalError, match="already has an active"):
            dyvte.withdraw(model, layer=2)
        with torch.no_grad():
            out = model(**inputs).logits
        assert out.shape[1] < inputs["input_ids"].shape[1]
    with dyvte.withdraw(model, layer=2):  # after removal a new one is fine
        pass


def test_placeholder_count_mismatch_surfaces_transformers_error(llava):
    model, inputs = llava
    broken = dict(inputs)
    ids = inputs["input_ids"].clone()
    ids[2, -1] = resolve(model).visual_ids[0]  # one placeholder more than there are image features
    broken["input_ids"] = ids
    with dyvte.withdraw(model, layer=1), pytest.raises(ValueError, match="Image features and image tokens"):
        model(**broken)


def test_inputs_embeds_need_an_explicit_visual_mask(llava):
    model, inputs = llava
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    embeds = model.get_input_embeddings()(ids)
    with dyvte.withdraw(model, layer=1), torch.no_grad():
        with pytest.raises(dyvte.WithdrawalError, match="visual_mask"):
            model(inputs_embeds=embeds, attention_mask=mask)
        with pytest.raises(dyvte.WithdrawalError, match="shape"):
            model(inputs_embeds=embeds, attention_mask=mask, visual_mask=visual_mask(model, ids)[:, 1:])
        from_embeds = model(inputs_embeds=embeds, attention_mask=mask, visual_mask=visual_mask(model, ids)).logits
        from_ids = model(input_ids=ids, attention_mask=mask).logits  # same placeholder embeddings, no pixels
    assert torch.equal(from_embeds, from_ids)


def test_foreign_cache_is_refused(llava):
    model, inputs = llava
    with torch.no_grad():
        cache = cache_out(model(**inputs, use_cache=True))  # built without withdrawal
        step = {
            "input_ids": inputs["input_ids"][:, -1:],
            resolve(model).names.cache: cache,
            "attention_mask": torch.cat([inputs["attention_mask"], inputs["attention_mask"][:, -1:]], 1),
        }
        with dyvte.withdraw(model, layer=1), pytest.raises(dyvte.WithdrawalError, match="not produced under"):
            model(**step)


def test_attention_mask_of_wrong_width_is_refused(llava):
    model, inputs = llava
    with dyvte.withdraw(model, layer=1), pytest.raises(dyvte.WithdrawalError, match="attention_mask"):
        model(**{**inputs, "attention_mask": inputs["attention_mask"][:, 1:]})


def test_loss_on_kept_positions_equals_oracle_cross_entropy(llava):
    model, inputs = llava
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -3:] = inputs["input_ids"][:, -3:]  # answer-like targets: the last three text tokens
    reference = oracle_logits(model, inputs, 2)  # (B, T, V)
    expected = torch.nn.functional.cross_entropy(reference[:, -4:-1].flatten(0, 1), labels[:, -3:].flatten())
    with dyvte.withdraw(model, layer=2), torch.no_grad():
        out = model(**inputs, labels=labels)
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)


def test_output_positions_map_back_to_the_input(llava):
    model, inputs = llava
    with dyvte.withdraw(model, layer=1) as handle, torch.no_grad():
        out = model(**inputs).logits
    positions = handle.output_positions  # (B, T_out)
    assert positions.shape == out.shape[:2]
    kept = ~visual_mask(model, inputs["input_ids"]) & inputs["attention_mask"].bool()
    for row in range(positions.shape[0]):
        real = positions[row][positions[row] >= 0]
        assert real.tolist() == kept[row].nonzero().flatten().tolist()  # in order, right-aligned
        assert positions[row, -1] == inputs["input_ids"].shape[1] - 1  # the final token is always kept


def _design_section_3() -> str:
    """The text of docs/design.md's section 3 (the public API)."""
    return DESIGN.read_text().split("## §3 Public API", 1)[1].split("\n## ", 1)[0]


def test_public_api_of_design_section_3(llava, tmp_path):
    """The exports are exactly the documented ones, the documented calls bind, and they do what §3 says."""
    model, inputs = llava
    num_layers = resolve(model).num_layers
    exports = _design_section_3().split("exports:", 1)[1].split("(`CompatibilityError`", 1)[0]
    assert set(re.findall(r"`(\w+)`", exports)) == set(dyvte.__all__)
    documented_calls = [  # the calls of §3's example, bound against the real signatures
        (dyvte.withdraw, (model,), {"layer": 16}),
        (dyvte.withdraw, (model,), {"layer": [2, 5, 8]}),
        (dyvte.withdraw, (model,), {"calibration": "ckpt/cal"}),
        (dyvte.withdraw, (model,), {"heads": object(), "threshold": 0.8}),
        (dyvte.calibrate, (model, []), {"threshold": 3e-3}),
        (dyvte.ExitHeads.from_pretrained, ("checkpoints/demo-exit-heads",), {}),
        (dyvte.prune, (model, "fastervlm"), {"ratio": 0.75}),
        (dyvte.prune, (model, "random"), {"keep": 64, "seed": 0}),
        (dyvte.prune, (model, "fastv"), {"layer": 2, "ratio": 0.75}),
        (dyvte.prefill_flops, (model.config, 40, 16, 2), {}),
        (dyvte.evaluate, (model, None, [], dyvte.PolicyRun("static", {"layer": 6})), {}),
    ]
    for fn, args, kwargs in documented_calls:
        inspect.signature(fn).bind(*args, **kwargs)  # TypeError if the documented call no longer fits
    assert all(issubclass(getattr(dyvte, m), Method) for m in ("Full", "PolicyRun", "PruningRun", "Compose"))
    assert dyvte.supported_model_types() == sorted(dyvte.REGISTRY) and "llava" in dyvte.REGISTRY

    with dyvte.withdraw(model, layer=[1, 2, num_layers]) as handle, torch.no_grad():  # one exit layer per row
        logits = model(**inputs).logits
    full = handle.to_input_positions(logits, float("nan"))
    assert handle.exit_layers.tolist() == [1, 2, num_layers]
    assert handle.output_positions.shape == logits.shape[:2]
    assert full.shape == (*inputs["input_ids"].shape, logits.shape[-1])
    real = handle.output_positions >= 0
    assert int(full.isnan().all(-1).logical_not().sum()) == int(real.sum())  # NaN fill everywhere else
    assert not model._forward_pre_hooks  # removed on exit

    cal = dyvte.calibrate(model, [inputs], threshold=3e-3, progress=False)
    assert len(cal.kl_per_layer) == num_layers + 1 and 0 <= cal.layer <= num_layers and isinstance(cal.met, bool)
    cal.save(tmp_path / "cal")
    assert (tmp_path / "cal" / "calibration.json").is_file()
    with dyvte.withdraw(model, calibration=str(tmp_path / "cal")) as handle, torch.no_grad():
        model(**inputs)
    assert handle.exit_layers.tolist() == [cal.layer] * len(ROWS)

    heads = dyvte.ExitHeads.for_model(model)
    loaded = dyvte.ExitHeads.from_pretrained(heads.save_pretrained(tmp_path / "heads"))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in heads.state_dict().items())
    with dyvte.withdraw(model, heads=loaded, threshold=1.5) as handle, torch.no_grad():  # > 1: never fires
        model(**inputs)
    assert handle.exit_layers.tolist() == [num_layers] * len(ROWS)

    def kept(n: int) -> int:  # ratio R = 0.75: max(1, floor((1 - R) * n + 0.5)) of n tokens, none of none
        return max(1, int(0.25 * n + 0.5)) if n else 0

    per_image = kept(VIEW)
    with dyvte.prune(model, "fastervlm", ratio=0.75) as pruning, torch.no_grad():
        model(**inputs)
    images = [len(r) for r in ROWS]
    assert pruning.fed_visual.tolist() == [n * per_image for n in images]
    assert [int(k.sum()) for k in pruning.kept_features] == [per_image] * sum(images)
    assert pruning.fed_tokens.tolist() == (pruning.kept_columns >= 0).sum(1).tolist()
    with dyvte.prune(model, "fastv", layer=2, ratio=0.75) as fastv, torch.no_grad():
        model(**inputs)
    assert fastv.visual_after.tolist() == [kept(n * VIEW) for n in images]  # FastV ranks a row's visual tokens
    assert fastv.visual_after.tolist() == fastv.kept_visual.sum(1).tolist()
    assert fastv.scores.shape == inputs["input_ids"].shape

    flops = dyvte.prefill_flops(model.config, 40, 16, 2)
    assert flops.ratio == pytest.approx(flops.flops / flops.full) and flops.convention == "detailed"
