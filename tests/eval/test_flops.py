"""Analytic prefill FLOPs and KV bytes (dyvte.eval.flops) against torch's FlopCounterMode and a real cache.

The analytic "detailed" figure equals torch's FlopCounterMode on the text decoder and LM head at every exit layer
(eager attention: CPU SDPA's fused kernel is not counted; per-expert matmuls: grouped_mm is not counted), and the KV
bytes equal a real cache's:

- on LLaVA-shaped benchmark models (``dyvte.eval.benchmark``), with the paper convention and batched rows;
- on every family of the table, on a row with two images and, for the families fed videos through frames, on a row
  with a video (Mistral's decoder, GLM-4V's fused gate/up projection, biased q/k/v, extra post-norms and partial
  rotary, Gemma3's sliding windows, routed experts, ...);
- on Qwen3-VL-MoE with dense and routed layers mixed, and the MoE paper convention (the routed width);
- on Qwen3.5's linear-attention layers, less the parts FlopCounterMode does not count; their state bytes do not shrink.
"""

from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dyvte
from dyvte.data.video import attach_frames_video_processor
from dyvte.engine.compat import cache_out
from dyvte.engine.registry import resolve
from dyvte.eval.benchmark import (
    LlavaShape,
    build_random_llava,
    kv_cache_bytes,
    llava_prompt,
    recurrent_state_bytes,
)
from dyvte.eval.flops import NOT_COUNTED_BY_FLOP_COUNTER, layer_flop_parts, prefill_state_bytes

from ..families import MODEL_TYPES, with_tag, with_video
from ..families import family as entry
from ..oracle import visual_mask
from ..tiny_models import make_batch, make_tiny
from ..video_inputs import encode_frames as encode_video

ROWS = [[(32, 32)], [(48, 32), (32, 32)], []]

SHAPE = LlavaShape(
    hidden_size=64,
    num_layers=3,
    intermediate_size=96,
    num_heads=4,
    num_kv_heads=2,
    vocab_size=32064,
    image_size=56,
    patch_size=14,
    vision_hidden=32,
)


@pytest.fixture(scope="module")
def model():
    # eager attention: CPU SDPA's fused kernel is not counted by FlopCounterMode, eager's matmuls are
    return build_random_llava(SHAPE, dtype=torch.float32, attn="eager")


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_detailed_flops_equal_flop_counter(model, layer):
    inputs = llava_prompt(SHAPE, text_before=5, text_after=7, dtype=torch.float32)
    num_tokens = inputs["input_ids"].shape[1]
    counter = FlopCounterMode(display=False)
    with dyvte.withdraw(model, layer=layer), torch.no_grad(), counter:
        model(**inputs, logits_to_keep=1)
    counts = counter.get_flop_counts()
    measured = sum(counts["LlavaForConditionalGeneration.model.language_model"].values())
    measured += sum(counts["LlavaForConditionalGeneration.lm_head"].values())
    expected = dyvte.prefill_flops(model.config, num_tokens, SHAPE.image_tokens, layer)
    assert measured == expected.flops
    assert expected.ratio == pytest.approx(expected.flops / expected.full)


def test_paper_convention_and_batched_rows(model):
    cfg = model.config.text_config
    n, v, d, m, layers = 30, 16, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    per_layer = lambda t: 4 * t * d * d + 2 * t * t * d + 3 * t * d * m  # noqa: E731
    got = dyvte.prefill_flops(model.config, n, v, 1, convention="paper")
    assert got.flops == per_layer(n) + (layers - 1) * per_layer(n - v)
    assert got.full == layers * per_layer(n)
    rows = dyvte.prefill_flops(model.config, torch.tensor([30, 20]), torch.tensor([16, 0]), torch.tensor([0, 1]))
    assert rows.ratio[1] == 1.0 and rows.ratio[0] < 1.0  # a row without visual tokens saves nothing
    assert dyvte.prefill_flops(model.config, n, v, layers).ratio == 1.0


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="exit_layer"):
        dyvte.prefill_flops(model.config, 10, 4, 4)
    with pytest.raises(ValueError, match="num_visual"):
        dyvte.prefill_flops(model.config, 10, 11, 1)
    with pytest.raises(ValueError, match="visual_after"):
        dyvte.prefill_kv_bytes(model.config, 10, 4, 1, visual_after=5)
    with pytest.raises(ValueError, match="exit_layer"):
        dyvte.prefill_kv_bytes(model.config, 10, 4, -1)
    with pytest.raises(ValueError, match="convention"):
        dyvte.prefill_flops(model.config, 10, 4, 1, convention="macs")


# ----------------------------------------------------------------------------------------------- every family
#: every family on a row with two images of different sizes (Qwen3.5's linear attention: below), and the families fed
#: videos through frames on a row with a video
CASES = [(family, "image") for family in MODEL_TYPES if "linear_attention" not in entry(family).tags]
CASES += [(family, "video") for family in with_video("frames")]


def one_row(family: str, kind: str, processor: Any) -> dict:
    """One unpadded row: two images of different sizes, or a video (with an image where the family allows)."""
    if kind == "image":
        return dict(make_batch(processor, family, [[(48, 32), (32, 32)]]))
    return encode_video(attach_frames_video_processor(processor), family, only=3)


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_detailed_flops_and_kv_bytes_equal_the_measured(family: str, kind: str) -> None:
    model, processor = make_tiny(family, attn="eager")
    if "moe" in entry(family).tags:
        model.set_experts_implementation("eager")  # per-expert matmuls: FlopCounterMode does not count grouped_mm
    inputs = one_row(family, kind, processor)
    spec = resolve(model)
    tokens = int(inputs["attention_mask"].sum())
    visual = int(visual_mask(model, inputs["input_ids"]).sum())
    assert 0 < visual < tokens
    modules = (f"{type(model).__name__}.{spec.family.decoder_path}", f"{type(model).__name__}.lm_head")
    for layer in range(spec.num_layers + 1):
        counter = FlopCounterMode(display=False)
        with dyvte.withdraw(model, layer=layer), torch.no_grad(), counter:
            cache = cache_out(model(**inputs, logits_to_keep=1, use_cache=True))
        counts = counter.get_flop_counts()
        measured = sum(sum(counts[name].values()) for name in modules)
        expected = dyvte.prefill_flops(model.config, tokens, visual, layer)
        assert measured == expected.flops, (family, kind, layer)
        assert kv_cache_bytes(cache) == dyvte.prefill_kv_bytes(model.config, tokens, visual, layer), (family, layer)


# ------------------------------------------------------------------------------------------------- Qwen3-VL
def flop_model(family: str, **text):
    """Eager attention and per-expert matmuls (FlopCounterMode counts neither SDPA's fused kernel nor grouped_mm)."""
    model, processor = make_tiny(family, attn="eager")
    if text:
        config = model.config
        for key, value in text.items():
            setattr(config.text_config, key, value)
        torch.manual_seed(0)
        model = type(model)._from_config(config, attn_implementation="eager").eval()
    if family.endswith("moe"):
        model.set_experts_implementation("eager")
    return model, processor


@pytest.mark.parametrize(
    ("family", "text"), [("qwen3_vl_moe", {"mlp_only_layers": [1], "decoder_sparse_step": 1})], ids=["moe_mixed"]
)
def test_detailed_flops_of_mixed_dense_and_moe_layers_equal_flop_counter(family, text):
    model, processor = flop_model(family, **text)
    inputs = dict(make_batch(processor, family, [ROWS[1]], row_ids=[1]))  # two images, no padding
    tokens, visual = inputs["input_ids"].shape[1], int(visual_mask(model, inputs["input_ids"]).sum())
    top = type(model).__name__
    kinds = {type(layer.mlp).__name__ for layer in resolve(model).layers}
    assert len(kinds) == (2 if text else 1)
    for layer in range(resolve(model).num_layers + 1):
        counter = FlopCounterMode(display=False)
        with dyvte.withdraw(model, layer=layer), torch.no_grad(), counter:
            model(**inputs, logits_to_keep=1)
        counts = counter.get_flop_counts()
        measured = sum(counts[f"{top}.model.language_model"].values()) + sum(counts[f"{top}.lm_head"].values())
        assert measured == dyvte.prefill_flops(model.config, tokens, visual, layer).flops, (family, layer)


def test_moe_paper_convention_counts_the_routed_width():
    model, _ = make_tiny("qwen3_vl_moe", num_layers=2)
    cfg = model.config.text_config
    d, m, n = cfg.hidden_size, cfg.num_experts_per_tok * cfg.moe_intermediate_size, 30
    per_layer = 4 * n * d * d + 2 * n * n * d + 3 * n * d * m
    assert dyvte.prefill_flops(model.config, n, 10, 2, convention="paper").flops == 2 * per_layer


# ------------------------------------------------------------------------------------------------- Qwen3.5
@pytest.mark.parametrize("family", with_tag("linear_attention"))
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
