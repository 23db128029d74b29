"""Video inputs (docs/design.md §5): withdrawal on batches that mix image rows, video rows and text-only rows.

Videos reach the models through ``dyvte.data.video.FramesVideoProcessor`` (frames through the image processor; no
torchvision). On Video-LLaVA, LLaVA-NeXT-Video, LLaVA-OneVision and GLM-4V, with withdrawal on:

- withdrawal at every K equals the masking oracle (SDPA and eager, 2e-6 in fp32);
- ``generate`` with the KV cache equals ``generate`` without it;
- a left-padded batch of an image row, two video rows, a text-only row and a row with an image and a video equals
  each row alone (static K and per-row K);
- K = L is the unhooked model, ``remove()`` restores it, and mixed exits run grouped equal the whole batch.

The families are those the table feeds videos through frames (``tests.families.with_video("frames")``), the rows
those of ``tests/video_inputs.py`` (:data:`FRAMES_ROWS`); the helper's own layouts are ``tests/data/test_video.py``'s.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import dyvte
from dyvte.data.video import attach_frames_video_processor
from dyvte.engine.registry import resolve

from ..families import with_video
from ..oracle import check_layers_equal_rows_alone, oracle_logits, visual_mask
from ..tiny_models import greedy, make_tiny
from ..video_inputs import encode_frames as encode
from ..video_inputs import frames_rows_of as rows_of

TOL = 2e-6


@pytest.fixture(scope="module", params=with_video("frames"))
def tiny(request: Any) -> tuple[str, Any, Any]:
    model, processor = make_tiny(request.param)
    return request.param, model, attach_frames_video_processor(processor)


def test_rows_mix_images_videos_and_text(tiny: Any) -> None:
    family, model, processor = tiny
    inputs = encode(processor, family)
    counts = visual_mask(model, inputs["input_ids"]).sum(1).tolist()
    assert counts[2] == 0 and min(counts[:2] + counts[3:]) > 0
    assert counts[3] > counts[1] == counts[4]  # image + video (GLM-4V: a longer video) > the 4-frame video alone
    assert "pixel_values_videos" in inputs and (inputs["attention_mask"] == 0).any()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_withdrawal_on_videos_equals_masking_oracle(tiny: Any, attn: str) -> None:
    family, _, processor = tiny
    model, _ = make_tiny(family, attn=attn)
    inputs = encode(processor, family)
    kept = ~visual_mask(model, inputs["input_ids"]) & inputs["attention_mask"].bool()
    for layer in range(resolve(model).num_layers):
        reference = oracle_logits(model, inputs, layer)
        with dyvte.withdraw(model, layer=layer) as handle, torch.no_grad():
            mapped = handle.to_input_positions(model(**inputs).logits, float("nan"))
        assert not mapped[kept].isnan().any()
        diff = (mapped[kept] - reference[kept]).abs().max().item()
        assert diff <= TOL, f"{family}/{attn} K={layer}: max |withdrawn - oracle| = {diff:.2e}"


@pytest.mark.parametrize("layer", [0, 2])
def test_video_generate_with_cache_equals_without(tiny: Any, layer: int) -> None:
    family, model, processor = tiny
    inputs = encode(processor, family)
    with dyvte.withdraw(model, layer=layer):
        assert torch.equal(greedy(model, inputs, use_cache=True), greedy(model, inputs, use_cache=False)), family


@pytest.mark.parametrize("layers", [2, [1, 3, 0, 2, 4]])
def test_mixed_batch_equals_rows_alone(tiny: Any, layers: Any) -> None:
    family, model, processor = tiny
    inputs = encode(processor, family)
    assert inputs["input_ids"].shape[0] == len(rows_of(family))
    check_layers_equal_rows_alone(model, inputs, lambda row: encode(processor, family, only=row), layers, greedy)


def test_never_withdrawing_is_the_unhooked_model_and_remove_restores(tiny: Any) -> None:
    family, model, processor = tiny
    inputs = encode(processor, family)
    spec = resolve(model)
    with torch.no_grad():
        base = model(**inputs).logits
    base_tokens = greedy(model, inputs)
    with dyvte.withdraw(model, layer=spec.num_layers) as handle, torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)
        assert torch.equal(greedy(model, inputs), base_tokens)
        assert handle.output_positions is None
    handle = dyvte.withdraw(model, layer=1)
    with torch.no_grad():
        assert model(**inputs).logits.shape[1] < base.shape[1]
    handle.remove()
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert all(not layer._forward_pre_hooks and "forward" not in vars(layer) for layer in spec.layers)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)


def test_grouped_mixed_exits_equal_the_whole_batch(tiny: Any) -> None:
    """Rows leaving at different layers run grouped (docs/design.md §4); the result is the ungrouped batch's."""
    family, model, processor = tiny
    inputs = encode(processor, family)
    exits = [1, 3, 0, 4, 2]
    runs = []
    for grouped in (True, False):
        with dyvte.withdraw(model, layer=exits) as handle, torch.no_grad():
            handle.grouped = grouped
            runs.append((model(**inputs).logits[:, -1], greedy(model, inputs), greedy(model, inputs, use_cache=False)))
    (last, cached, plain), (ref_last, ref_cached, _) = runs
    torch.testing.assert_close(last, ref_last, atol=1e-5, rtol=1e-5)
    assert torch.equal(cached, ref_cached) and torch.equal(cached, plain), family
