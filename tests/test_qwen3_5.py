"""Qwen3.5 (dense and MoE): withdrawal on a hybrid decoder whose layers are mostly linear attention.

Three of every four Qwen3.5 decoder layers are Gated DeltaNet layers (a recurrence and a short causal convolution,
no KV cache). Withdrawal there is defined by the compacted oracle (docs/design.md, "Withdrawal on linear-attention
layers (Qwen3.5)"): layers >= K process each row's kept tokens as their whole input, with the original rotary
positions. The parametrized invariant tests (test_withdraw, test_grouping, test_prune, test_tiny_models) run on both
families through ``tests/tiny_models.FAMILIES``; this file adds what is particular to them: the recurrent states
after a withdrawn prefill, the static cache, FastV's constraint on K, the refusals, FLOPs and state bytes.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache

import dyvte
from dyvte.engine.compat import cache_out
from dyvte.engine.registry import resolve
from dyvte.eval.benchmark import kv_cache_bytes, recurrent_state_bytes
from dyvte.eval.flops import NOT_COUNTED_BY_FLOP_COUNTER, layer_flop_parts, prefill_state_bytes

from .oracle import compacted_oracle_logits, oracle_logits, visual_mask
from .tiny_models import greedy, make_batch, make_tiny, random_heads

FAMILIES = ["qwen3_5", "qwen3_5_moe"]
ROWS = [[(32, 32)], [(48, 32), (32, 32)], []]  # one image / two images of different sizes / text only
TOL = 2e-6


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    model, processor = make_tiny(request.param)
    return request.param, model, processor, dict(make_batch(processor, request.param, ROWS))


def test_the_tiny_models_are_hybrid(tiny):
    _, model, _, _ = tiny
    spec = resolve(model)
    assert spec.linear_attention == [True, True, True, False]  # the 3:1 pattern of the real models
    assert spec.family.gated_query


def test_compacted_is_not_the_masking_oracle(tiny):
    """On recurrent layers the definition matters: keys hidden from attention are not tokens removed from the
    recurrence, so the masking oracle (which the other families use) differs from the compacted one."""
    _, model, _, inputs = tiny
    kept = ~visual_mask(model, inputs["input_ids"]) & inputs["attention_mask"].bool()
    compacted = compacted_oracle_logits(model, inputs, 1)
    with dyvte.withdraw(model, layer=1) as handle, torch.no_grad():
        withdrawn = handle.to_input_positions(model(**inputs).logits, float("nan"))
    assert (withdrawn[kept] - compacted[kept]).abs().max() <= TOL
    assert (oracle_logits(model, inputs, 1)[kept] - compacted[kept]).abs().max() > 1e-3


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_recurrent_states_after_prefill_are_those_of_the_kept_sequence(tiny, layer):
    """Every linear layer >= K caches the conv and recurrent state of the row's kept tokens alone (left padding
    leaves them untouched), and every full-attention layer >= K the keys of the kept tokens."""
    _, model, _, inputs = tiny
    spec = resolve(model)
    with dyvte.withdraw(model, layer=layer), torch.no_grad():
        cache = cache_out(model(**inputs, use_cache=True))
    rows = [DynamicCache(config=model.config) for _ in ROWS]
    compacted_oracle_logits(model, inputs, layer, caches=rows)
    for index in range(layer, spec.num_layers):
        got, want = cache.layers[index], [row.layers[index] for row in rows]
        if spec.linear_attention[index]:
            for name in ("conv_states", "recurrent_states"):
                for row, alone in enumerate(want):
                    torch.testing.assert_close(
                        getattr(got, name)[0][row], getattr(alone, name)[0][0], atol=1e-6, rtol=0
                    )
        else:
            for row, alone in enumerate(want):
                width = alone.keys.shape[2]  # right-aligned: the row's kept keys are the last slots
                torch.testing.assert_close(got.keys[row, :, -width:], alone.keys[0], atol=1e-6, rtol=0)


def test_static_cache_equals_dynamic_cache(tiny):
    """Linear-attention states are fixed-size: a static cache holds them as a dynamic one does."""
    _, model, _, inputs = tiny
    heads = random_heads(model, head_size=None)
    for context in (
        lambda: dyvte.withdraw(model, layer=2),
        lambda: dyvte.withdraw(model, layer=[1, 3, 0]),
        lambda: dyvte.withdraw(model, heads=heads, threshold=0.5),
    ):
        with context():
            dynamic = greedy(model, inputs)
            static = greedy(model, inputs, cache_implementation="static")
            again = greedy(model, inputs, cache_implementation="static")
        assert torch.equal(static, dynamic) and torch.equal(again, static)


def test_heads_mixed_exits_grouped_equal_ungrouped_and_rows_alone():
    """Exit heads with really mixed exits: grouped (full-attention layers per group, linear layers on the whole
    batch) equals ungrouped, and cached decoding equals the cache-less one."""
    model, processor = make_tiny("qwen3_5", num_layers=8)
    inputs = dict(make_batch(processor, "qwen3_5", ROWS))
    heads = random_heads(model, seed=5, head_size=None, std=0.2)
    outputs = {}
    for grouped in (True, False):
        with dyvte.withdraw(model, heads=heads, threshold=0.7) as handle, torch.no_grad():
            handle.grouped = grouped
            last = model(**inputs).logits[:, -1]
            outputs[grouped] = (last, greedy(model, inputs), handle.exit_layers.tolist())
    (last, cached, exits), (ref_last, ref_cached, ref_exits) = outputs[True], outputs[False]
    assert exits == ref_exits == [4, 8, 2], exits  # really mixed: before / after the attention layer 3, and never
    torch.testing.assert_close(last, ref_last, atol=TOL, rtol=TOL)
    assert torch.equal(cached, ref_cached)
    for row in range(len(ROWS)):
        alone = dict(make_batch(processor, "qwen3_5", [ROWS[row]], row_ids=[row]))
        with dyvte.withdraw(model, layer=exits[row]), torch.no_grad():
            torch.testing.assert_close(model(**alone).logits[:, -1], last[row : row + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_needs_a_full_attention_layer_before_k(family):
    model, processor = make_tiny(family, attn="eager", num_layers=8)
    with pytest.raises(dyvte.UnsupportedModelError, match=r"layer 1 .* linear-attention .* K in \[4, 8\]"):
        dyvte.prune(model, "fastv", layer=2, ratio=0.5)
    inputs = dict(make_batch(processor, family, ROWS))
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    assert len(attentions) == 2  # one per full-attention layer (3 and 7): the linear layers have no attention
    reference = attentions[0][:, :, -1].mean(1)  # (B, T): layer 3, the last token, mean over heads
    visual = visual_mask(model, inputs["input_ids"]) & inputs["attention_mask"].bool()
    with dyvte.prune(model, "fastv", layer=4, ratio=0.5) as handle:
        with torch.no_grad():
            model(**inputs)
        torch.testing.assert_close(handle.scores[visual], reference[visual], atol=1e-6, rtol=1e-5)
        assert torch.equal(greedy(model, inputs), greedy(model, inputs, use_cache=False))


def test_fastervlm_is_refused(tiny):
    family, model, _, _ = tiny
    for method in ("fastervlm", "random"):
        with pytest.raises(dyvte.UnsupportedModelError, match=f"model_type='{family}'"):
            dyvte.prune(model, method, ratio=0.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_flops_equal_the_flop_counter_and_state_bytes_the_cache(family):
    """Per exit layer: the detailed FLOPs less their parts FlopCounterMode does not count equal its count; the KV
    bytes of the full-attention layers shrink, the linear layers' state bytes do not."""
    model, processor = make_tiny(family, attn="eager")  # eager: CPU SDPA's fused kernel is not counted
    if family == "qwen3_5_moe":
        model.set_experts_implementation("eager")  # per-expert matmuls: FlopCounterMode does not count grouped_mm
    inputs = dict(make_batch(processor, family, [ROWS[1]], row_ids=[1]))  # two images, no padding
    tokens = inputs["input_ids"].shape[1]
    visual = int(visual_mask(model, inputs["input_ids"]).sum())
    spec, top = resolve(model), type(model).__name__
    for layer in range(spec.num_layers + 1):
        counter = FlopCounterMode(display=False)
        with dyvte.withdraw(model, layer=layer), torch.no_grad(), counter:
            cache = cache_out(model(**inputs, logits_to_keep=1, use_cache=True))
        counts = counter.get_flop_counts()
        measured = sum(counts[f"{top}.model.language_model"].values()) + sum(counts[f"{top}.lm_head"].values())
        expected = dyvte.prefill_flops(model.config, tokens, visual, layer)
        uncounted = sum(
            value
            for index in range(spec.num_layers)
            for part, value in layer_flop_parts(
                model.config, tokens if index < layer else tokens - visual, index
            ).items()
            if part in NOT_COUNTED_BY_FLOP_COUNTER
        )
        assert measured == expected.flops - uncounted, (family, layer)
        assert uncounted > 0  # the triangular solves are real work
        assert kv_cache_bytes(cache) == dyvte.prefill_kv_bytes(model.config, tokens, visual, layer)
        assert recurrent_state_bytes(cache) == prefill_state_bytes(model.config) > 0
    assert dyvte.prefill_kv_bytes(model.config, tokens, visual, 0) < dyvte.prefill_kv_bytes(
        model.config, tokens, visual
    )
    with pytest.raises(ValueError, match="linear-attention layers: use convention='detailed'"):
        dyvte.prefill_flops(model.config, tokens, visual, 1, convention="paper")


def video_batch(model, processor, family: str) -> dict:
    """A ragged batch whose row 0 holds a video, row 1 an image, row 2 text only.

    Qwen3.5's video processor needs torchvision (absent here), so the clip is built from the image processor's
    output: one temporal patch (two identical frames), its placeholders turned into ``<|video_pad|>`` with
    ``mm_token_type_ids`` 2, its patches passed as ``pixel_values_videos`` with their ``video_grid_thw``.
    """
    inputs = dict(make_batch(processor, family, [[(48, 32)], [(32, 32)], []]))
    grid = inputs["image_grid_thw"]  # (2, 3)
    first = int(grid[0].prod())  # patches of row 0's image
    ids, types = inputs["input_ids"].clone(), inputs["mm_token_type_ids"].clone()
    row0 = ids[0] == model.config.image_token_id
    ids[0, row0], types[0, row0] = model.config.video_token_id, 2
    inputs.update(input_ids=ids, mm_token_type_ids=types, image_grid_thw=grid[1:], video_grid_thw=grid[:1])
    inputs["pixel_values_videos"] = inputs["pixel_values"][:first]
    inputs["pixel_values"] = inputs["pixel_values"][first:]
    return inputs


def test_video_rows_are_withdrawn_like_image_rows(tiny):
    family, model, processor, _ = tiny
    inputs = video_batch(model, processor, family)
    visual = visual_mask(model, inputs["input_ids"])
    assert (inputs["input_ids"][0] == model.config.video_token_id).sum() == visual[0].sum() == 24
    kept = ~visual & inputs["attention_mask"].bool()
    with torch.no_grad():
        base = model(**inputs).logits
        moved = model(**{**inputs, "pixel_values_videos": inputs["pixel_values_videos"] + 1}).logits
    assert (moved[0] - base[0]).abs().max() > 1e-3  # the clip reaches the decoder
    for layer in range(resolve(model).num_layers):
        reference = compacted_oracle_logits(model, inputs, layer)
        with dyvte.withdraw(model, layer=layer) as handle, torch.no_grad():
            mapped = handle.to_input_positions(model(**inputs).logits, float("nan"))
        assert (mapped[kept] - reference[kept]).abs().max() <= TOL, (family, layer)
    with dyvte.withdraw(model, layer=2):
        assert torch.equal(greedy(model, inputs), greedy(model, inputs, use_cache=False))
