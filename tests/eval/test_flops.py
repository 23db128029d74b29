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
