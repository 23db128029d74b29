"""Withdrawal on Qwen-layout video rows (``video_grid_thw``), built without torchvision by ``tests/video_inputs.py``.

The families the table feeds videos that way (``tests.families.with_video("grid")``: Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
Qwen3-VL-MoE). Withdrawal removes ``<|video_pad|>`` tokens exactly like ``<|image_pad|>`` ones (both ids are in the
registry's ``visual_id_attrs``). What must hold, with batches that mix video rows, image + video rows and text-only
rows:

- withdrawal at every K equals the masking oracle (SDPA and eager), video tokens leave the residual stream;
- ``generate`` with the cache equals ``generate`` without it;
- a left-padded mixed batch equals each row alone, for one static K and for per-row K (a mixed exit, grouped);
- Qwen3.5 (linear attention), whose clip is built from the image processor's output: withdrawal equals the compacted
  oracle.

The helper's own layout is ``tests/test_video_inputs.py``'s; exit heads and FastV on these rows are
``tests/policies/test_learned.py``'s and ``tests/policies/test_fastv.py``'s.
"""

from __future__ import annotations

import pytest
import torch

import dyvte
from dyvte.engine.registry import resolve

from ..families import representatives, with_video
from ..oracle import check_layers_equal_rows_alone, compacted_oracle_logits, oracle_logits, visual_mask
from ..tiny_models import greedy as tiny_greedy
from ..tiny_models import make_batch, make_tiny
from ..video_inputs import GRID_ROWS as ROWS
from ..video_inputs import encode_grid as encode

PER_ROW = [1, 3, 0, 4]  # L = 4: every row leaves at its own layer, row 3 never
NEW_TOKENS = 4
TOL = 2e-6


def greedy(model, inputs: dict, **kwargs) -> torch.Tensor:
    return tiny_greedy(model, inputs, NEW_TOKENS, min_new_tokens=NEW_TOKENS, **kwargs)


@pytest.fixture(scope="module", params=with_video("grid"))
def tiny(request):
    model, processor = make_tiny(request.param)
    return request.param, model, processor


@pytest.fixture(scope="module", params=representatives("linear_attention"))
def hybrid(request):
    model, processor = make_tiny(request.param)
    return request.param, model, processor


def test_rows_mix_videos_images_and_text(tiny):
    family, model, processor = tiny
    inputs = encode(processor, family)
    ids = inputs["input_ids"]
    videos = (ids == model.config.video_token_id).sum(1).tolist()
    images = (ids == model.config.image_token_id).sum(1).tolist()
    assert videos[0] > 0 and videos[1] > 0 and videos[2] == 0 and videos[3] > 0 and len(set(videos)) == 4
    assert images == [0, 16, 0, 0]
    assert inputs["video_grid_thw"].tolist() == [[2, 8, 8], [2, 12, 8], [1, 8, 12]]
    assert (inputs["mm_token_type_ids"] == 2).sum(1).tolist() == videos


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_withdrawal_equals_masking_oracle(tiny, attn):
    family, _, processor = tiny
    model, _ = make_tiny(family, attn=attn)
    inputs = encode(processor, family)
    visual = visual_mask(model, inputs["input_ids"])
    kept = ~visual & inputs["attention_mask"].bool()
    with torch.no_grad():
        base = model(**inputs).logits
    for layer in range(resolve(model).num_layers):
        reference = oracle_logits(model, inputs, layer)
        with dyvte.withdraw(model, layer=layer) as handle, torch.no_grad():
            out = model(**inputs).logits
            mapped = handle.to_input_positions(out, float("nan"))
        assert out.shape[1] == int(kept.sum(1).max()), "every video token leaves the residual stream"
        positions = handle.output_positions
        assert not visual.gather(1, positions.clamp(min=0))[positions >= 0].any()
        diff = (mapped[kept] - reference[kept]).abs().max().item()
        assert diff <= TOL, f"{family}/{attn} K={layer}: max |withdrawn - oracle| = {diff:.2e}"
        assert (reference[kept] - base[kept]).abs().max() > 1e-3  # the oracle is not the unmodified model


@pytest.mark.parametrize("layer", [0, 2])
def test_generate_with_cache_equals_without(tiny, layer):
    family, model, processor = tiny
    inputs = encode(processor, family)
    with dyvte.withdraw(model, layer=layer):
        assert torch.equal(greedy(model, inputs, use_cache=True), greedy(model, inputs, use_cache=False)), family


@pytest.mark.parametrize("layers", [2, PER_ROW], ids=["static", "per_row"])
def test_mixed_batch_equals_rows_alone(tiny, layers):
    """Video / image + video / text / video rows, left-padded, equal each row alone (per-row K runs grouped)."""
    family, model, processor = tiny
    inputs = encode(processor, family)
    assert inputs["input_ids"].shape[0] == len(ROWS)
    check_layers_equal_rows_alone(model, inputs, lambda row: encode(processor, family, only=row), layers, greedy)


def test_never_withdraw_is_identity_with_video(tiny):
    family, model, processor = tiny
    inputs = encode(processor, family)
    with torch.no_grad():
        base = model(**inputs).logits
    with dyvte.withdraw(model, layer=resolve(model).num_layers), torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)


# ------------------------------------------- Qwen3.5: a clip built from the image processor's output
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


def test_video_rows_are_withdrawn_like_image_rows(hybrid):
    family, model, processor = hybrid
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
