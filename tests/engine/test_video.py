"""Video inputs (docs/design.md §5): withdrawal on batches that mix image rows, video rows and text-only rows.

Videos reach the models through ``dyvte.data.video.FramesVideoProcessor`` (frames through the image processor; no
torchvision). On Video-LLaVA, LLaVA-NeXT-Video, LLaVA-OneVision and GLM-4V, with withdrawal on:

- withdrawal at every K equals the masking oracle (SDPA and eager, 2e-6 in fp32);
- ``generate`` with the KV cache equals ``generate`` without it;
- a left-padded batch of an image row, two video rows, a text-only row and a row with an image and a video equals
  each row alone (static K and per-row K);
- K = L is the unhooked model, ``remove()`` restores it, and mixed exits run grouped equal the whole batch;
- the video helper's layouts: GLM-4V's temporal patches hold frame ``g * t + i`` in slot ``i`` of group ``g``, and a
  still image's patches are the image processor's own.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import dyvte
from dyvte.data.video import FramesVideoProcessor, attach_frames_video_processor
from dyvte.engine.registry import resolve

from .oracle import check_layers_equal_rows_alone, oracle_logits, visual_mask
from .tiny_models import PROMPT_IMAGE_TOKEN, WORDS, greedy, make_row_images, make_tiny

VIDEO_FAMILIES = ["video_llava", "llava_next_video", "llava_onevision", "glm4v", "glm4v_moe"]
#: Per row: (image sizes, number of video frames); 0 frames = no video. Rows 1 and 4: the same video length.
ROWS: list[tuple[list[tuple[int, int]], int]] = [([(32, 32)], 0), ([], 4), ([], 0), ([(48, 32)], 4), ([], 4)]
#: GLM-4V's (and GLM-4V-MoE's) own model cannot take images and videos in one call: its video frames are image
#: placeholders, and it scatters the image features into every one of them (transformers 5.19-5.24: "Image features
#: and image tokens do not match"). Its batch mixes videos of different lengths (temporal patches are concatenated)
#: and text.
GLM_ROWS: list[tuple[list[tuple[int, int]], int]] = [([], 2), ([], 4), ([], 0), ([], 6), ([], 4)]


def rows_of(family: str) -> list[tuple[list[tuple[int, int]], int]]:
    return GLM_ROWS if family.startswith("glm4v") else ROWS


FRAME = (32, 32)
TOL = 2e-6


def video_placeholder(processor: Any, family: str) -> str:
    """What a prompt carries once per video (GLM-4V wraps its placeholder in video start/end tokens)."""
    if family.startswith("glm4v"):
        return "<|begin_of_video|><|video|><|end_of_video|>"
    return processor.video_token


def encode(processor: Any, family: str, only: int | None = None) -> dict:
    """The left-padded batch of :data:`ROWS` (or row ``only`` alone); a row's content depends on its index only."""
    rows = rows_of(family)
    ids = range(len(rows)) if only is None else [only]
    texts, images, videos = [], [], []
    for i in ids:
        sizes, frames = rows[i]
        words = " ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(2 + 3 * i))
        parts = [PROMPT_IMAGE_TOKEN[family] for _ in sizes] + [video_placeholder(processor, family)] * bool(frames)
        texts.append(" ".join([*parts, words]))
        images.append(make_row_images(sizes, row_id=i))
        if frames:
            videos.append(make_row_images([FRAME] * frames, row_id=100 + i))
    kwargs: dict[str, Any] = {"text": texts, "padding": True, "return_tensors": "pt"}
    if any(images):
        kwargs["images"] = images if only is None else images[0]
    if videos:
        kwargs["videos"] = videos
    processor.tokenizer.padding_side = "left"
    return dict(processor(**kwargs))


@pytest.fixture(scope="module", params=VIDEO_FAMILIES)
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


def test_temporal_patches_hold_each_frame_in_its_slot() -> None:
    """GLM-4V layout: slot i of temporal group g is frame g * t + i; a still frame is the image processor's patch."""
    _, processor = make_tiny("glm4v")
    image_processor = processor.image_processor
    frames = make_row_images([FRAME] * 3, row_id=5)  # 3 frames: padded to 4 by repeating the last one
    out = FramesVideoProcessor(image_processor, fps=2.0)([frames])
    step = image_processor.temporal_patch_size
    still = [image_processor(images=[f], return_tensors="pt")["pixel_values"] for f in frames]  # (N, C*t*p*p) each
    num = still[0].shape[0]
    assert out["video_grid_thw"].tolist() == [[2, 8, 8]] and out["pixel_values_videos"].shape == (2 * num, 96)
    video = out["pixel_values_videos"].view(2, num, 3, step, -1)  # (G, N, C, t, p*p)
    for group in range(2):
        for slot in range(step):
            frame = still[min(group * step + slot, 2)].view(num, 3, step, -1)[:, :, 0]
            assert torch.equal(video[group, :, :, slot], frame)
    assert out["video_metadata"][0].timestamps == [0.0, 0.5, 1.0, 1.5]


def test_video_helper_refuses_bad_input() -> None:
    _, processor = make_tiny("llava")
    with pytest.raises(ValueError, match="no video placeholder"):
        attach_frames_video_processor(processor)
    frames = FramesVideoProcessor(processor.image_processor)
    with pytest.raises(ValueError, match="same frame count"):
        frames([make_row_images([FRAME] * 2), make_row_images([FRAME] * 3)])
    with pytest.raises(ValueError, match="sequence of frames"):
        frames([[1, 2]])
    with pytest.raises(ValueError, match="fps"):
        FramesVideoProcessor(processor.image_processor, fps=0)


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
