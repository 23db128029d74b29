"""prefill_flops against torch's FlopCounterMode, and its conventions."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dyvte
from dyvte.eval.benchmark import LlavaShape, build_random_llava, llava_prompt

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
    ("family", "text"),
    [("qwen3_vl", {}), ("qwen3_vl_moe", {}), ("qwen3_vl_moe", {"mlp_only_layers": [1], "decoder_sparse_step": 1})],
    ids=["dense", "moe", "moe_mixed"],
)
def test_detailed_flops_equal_flop_counter(family, text):
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
