"""Video inputs on the Qwen-VL families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE), built without torchvision.

Withdrawal removes ``<|video_pad|>`` tokens exactly like ``<|image_pad|>`` ones (both ids are in the registry's
``visual_id_attrs``). What must hold, with batches that mix video rows, image + video rows and text-only rows:

- the inputs of :mod:`tests.video_inputs` are the video processor's layout, and the processor's own output on
  image-only rows;
- withdrawal at every K equals the masking oracle (SDPA and eager), video tokens leave the residual stream;
- ``generate`` with the cache equals ``generate`` without it;
- a left-padded mixed batch equals each row alone, for one static K and for per-row K (a mixed exit, grouped);
- exit heads that send video rows out at different layers equal each row alone;
- FastV ranks video tokens like image ones and equals the masking oracle of the tokens it prunes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dyvte
from dyvte.engine.registry import resolve

from .oracle import check_heads_rows_alone, check_layers_equal_rows_alone, oracle_logits, visual_mask
from .test_prune import check_fastv_equals_masking_oracle
from .tiny_models import greedy as tiny_greedy
from .tiny_models import make_batch, make_image, make_tiny, sharpened_heads
from .video_inputs import VIDEO_FAMILIES, make_video_batch, video_pixels

FAMILIES = [*VIDEO_FAMILIES, "qwen3_vl_moe"]
# a 4-frame video / an image then a 3-frame video (padded to 4) of another size / text only / a 2-frame video
ROWS = [[("video", (4, 32, 32))], [("image", (32, 32)), ("video", (3, 48, 32))], [], [("video", (2, 32, 48))]]
PER_ROW = [1, 3, 0, 4]  # L = 4: every row leaves at its own layer, row 3 never
NEW_TOKENS = 4
TOL = 2e-6


def encode(processor, family: str, only: int | None = None) -> dict:
    if only is None:
        return dict(make_video_batch(processor, family, ROWS))
    return dict(make_video_batch(processor, family, [ROWS[only]], row_ids=[only]))


def greedy(model, inputs: dict, **kwargs) -> torch.Tensor:
    return tiny_greedy(model, inputs, NEW_TOKENS, min_new_tokens=NEW_TOKENS, **kwargs)


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    model, processor = make_tiny(request.param)
    return request.param, model, processor


def test_video_pixels_are_the_video_processor_layout():
    """Frames through the image processor = the video processor's patch permutation of the normalised frames; a video
    of ``temporal_patch_size`` copies of one image is that image's pixel rows."""
    _, processor = make_tiny("qwen2_vl", num_layers=1)
    ip = processor.image_processor
    rng = np.random.default_rng(0)
    frames = [make_image(32, 48, rng) for _ in range(4)]  # 32x48 is a multiple of patch * merge: not resized
    values, grid = video_pixels(ip, frames)
    temporal, patch, merge = ip.temporal_patch_size, ip.patch_size, ip.merge_size
    raw = (np.stack([np.asarray(f, dtype=np.float32) for f in frames]) / 255 - 0.5) / 0.5  # (F, H, W, C)
    raw = raw.transpose(0, 3, 1, 2)  # (F, C, H, W)
    steps, height, width = len(frames) // temporal, 32 // patch, 48 // patch
    video = raw.reshape(steps, temporal, 3, height // merge, merge, patch, width // merge, merge, patch)
    video = video.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # the video processor's permute (batch axis dropped)
    assert grid == [steps, height, width]
    np.testing.assert_allclose(values, video.reshape(steps * height * width, -1), atol=1e-6)
    still, _ = video_pixels(ip, frames[:1] * temporal)
    np.testing.assert_array_equal(still, ip(images=frames[:1], return_tensors="np")["pixel_values"])
    padded, padded_grid = video_pixels(ip, frames[:3])  # 3 frames: the last one is repeated
    assert padded_grid == grid and np.array_equal(padded, video_pixels(ip, [*frames[:3], frames[2]])[0])
    with pytest.raises(ValueError, match="same size"):
        video_pixels(ip, [frames[0], make_image(48, 48, rng)])


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_image_rows_equal_the_processor(family):
    """On image and text rows, :func:`make_video_batch` gives the processor's own inputs."""
    _, processor = make_tiny(family, num_layers=1)
    rows = [[(32, 32)], [(48, 32), (32, 32)], []]
    ours = make_video_batch(processor, family, [[("image", size) for size in row] for row in rows])
    theirs = make_batch(processor, family, rows)
    assert set(ours) == set(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), (family, key)


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


def test_fastv_prunes_video_tokens_exactly(tiny):
    family, model, processor = tiny
    check_fastv_equals_masking_oracle(model, encode(processor, family), layer=1, ratio=0.5)


def test_exit_heads_on_video_rows_equal_rows_alone(tiny):
    family, model, processor = tiny
    inputs = encode(processor, family)
    assert inputs["input_ids"].shape[0] == len(ROWS)
    heads = sharpened_heads(model)  # rows disagree about when to leave
    check_heads_rows_alone(model, inputs, heads, lambda row: encode(processor, family, only=row))
