"""Pruning before the LLM (dyvte.pruning.prune, docs/design.md §2, FasterVLM) of video frames, on the mixed image /
video / text batch of ``tests/video_inputs.py``.

- Video-LLaVA: FasterVLM prunes every video frame on its own by that frame's [CLS] attention (the frame's [CLS]
  feature stays), and its images like LLaVA-1.5's; the result equals the model fed the pruned features by hand;
  counts follow the documented budget; cache == no cache; a mixed batch equals its rows alone; KV bytes.
- LLaVA-NeXT-Video: its images are pruned like LLaVA-NeXT's (and run through ``tests/pruning/test_prune.py``'s
  tests); its videos (2x2-pooled features) are refused.

Encoders without [CLS] are refused by name on every family (``tests/pruning/test_prune.py``); FastV on video rows is
``tests/policies/test_fastv.py``'s.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import dyvte
from dyvte.data.video import attach_frames_video_processor
from dyvte.engine.compat import cache_out
from dyvte.engine.registry import resolve
from dyvte.eval.benchmark import kv_cache_bytes

from ..tiny_models import greedy, make_tiny
from ..video_inputs import FRAMES_ROWS as ROWS
from ..video_inputs import encode_frames as encode

VIEW = 16  # patches per 32 px view / frame (patch 8)
FRAMES = 4


def budget(count: int, spec: dict) -> int:
    if "ratio" in spec:
        return max(1, int(count * (1 - spec["ratio"]) + 0.5))
    return max(1, (2 * count * spec["keep"] + VIEW) // (2 * VIEW))


@pytest.fixture(scope="module")
def video_llava() -> tuple[Any, Any]:
    model, processor = make_tiny("video_llava", attn="eager")
    return model, attach_frames_video_processor(processor)


@pytest.mark.parametrize("spec", [{"ratio": 0.5}, {"keep": 5}])
def test_fastervlm_keeps_each_frames_top_cls_attention_patches(video_llava: Any, spec: dict) -> None:
    model, processor = video_llava
    inputs = encode(processor, "video_llava")
    frames = inputs["pixel_values_videos"].flatten(0, 1)  # (V * F, C, H, W)
    with torch.no_grad():
        attn = model.model.video_tower(frames, output_attentions=True).attentions[model.config.vision_feature_layer]
        images = model.model.image_tower(inputs["pixel_values_images"], output_attentions=True).attentions[-1]
    with dyvte.prune(model, "fastervlm", **spec) as handle, torch.no_grad():
        model(**inputs)
    count = budget(VIEW, spec)
    assert len(handle.kept_video_features) == frames.shape[0] == 3 * FRAMES
    for frame, kept in enumerate(handle.kept_video_features):
        assert kept.shape == (VIEW + 1,) and kept[0]  # the frame's [CLS] feature stays
        expected = attn[frame, :, 0, 1:].mean(0).topk(count).indices.sort().values + 1  # (count,) encoder tokens
        assert torch.equal(kept.nonzero().flatten()[1:], expected), frame
    for image, kept in enumerate(handle.kept_features):  # images: LLaVA-1.5's rule ([CLS] feature dropped)
        expected = images[image, :, 0, 1:].mean(0).topk(count).indices.sort().values
        assert torch.equal(kept.nonzero().flatten(), expected)
    video_rows = [n for _, n in ROWS]
    image_rows = [len(sizes) for sizes, _ in ROWS]
    expected_fed = [i * count + bool(n) * FRAMES * (1 + count) for i, n in zip(image_rows, video_rows, strict=True)]
    assert handle.fed_visual.tolist() == expected_fed


@pytest.mark.parametrize("row", [1, 3])
def test_pruned_video_equals_pruned_features_fed_by_hand(video_llava: Any, row: int) -> None:
    """Pruning (and pruning + withdrawal) equals the model given the kept features and placeholders by hand."""
    model, processor = video_llava
    inputs = encode(processor, "video_llava", only=row)
    for layer in (None, 2):
        with dyvte.prune(model, "fastervlm", ratio=0.75) as handle, torch.no_grad():
            withdrawal = dyvte.withdraw(model, layer=layer) if layer is not None else None
            last = model(**inputs).logits[:, -1]
            if withdrawal is not None:
                withdrawal.remove()
            kept_video, kept_images = handle.kept_video_features, handle.kept_features
        with torch.no_grad():
            ids = inputs["input_ids"][0]
            keep = torch.ones_like(ids, dtype=torch.bool)
            outputs = {}
            video = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output  # (V*F, S, D)
            keep[ids == model.config.video_token_id] = torch.cat(kept_video)
            outputs["video"] = BaseModelOutputWithPooling(
                pooler_output=torch.stack([f[k] for f, k in zip(video, kept_video, strict=True)])
            )
            if "pixel_values_images" in inputs:
                images = model.model.get_image_features(inputs["pixel_values_images"]).pooler_output
                keep[ids == model.config.image_token_id] = torch.cat(kept_images)
                outputs["image"] = BaseModelOutputWithPooling(
                    pooler_output=torch.stack([f[k] for f, k in zip(images, kept_images, strict=True)])
                )
            hand = {
                "input_ids": ids[keep][None],
                "attention_mask": torch.ones(1, int(keep.sum()), dtype=torch.long),
                "mm_encoder_outputs": outputs,
            }
            if layer is None:
                reference = model(**hand).logits[:, -1]
            else:
                with dyvte.withdraw(model, layer=layer):
                    reference = model(**hand).logits[:, -1]
        assert int(keep.sum()) < ids.numel()
        torch.testing.assert_close(last, reference, atol=1e-5, rtol=1e-5)


def test_random_pruning_of_videos_cache_equals_no_cache(video_llava: Any) -> None:
    model, processor = video_llava
    inputs = encode(processor, "video_llava")
    with dyvte.prune(model, "random", ratio=0.5, seed=3) as handle:
        assert torch.equal(greedy(model, inputs), greedy(model, inputs, use_cache=False))
        assert handle.kept_video_features[0].sum() == 1 + budget(VIEW, {"ratio": 0.5})


def test_pruned_mixed_batch_equals_rows_alone_and_cache(video_llava: Any) -> None:
    """FasterVLM's choice depends on the row only (random draws depend on the whole call, as for images)."""
    model, processor = video_llava
    inputs = encode(processor, "video_llava")
    with dyvte.prune(model, "fastervlm", ratio=0.5) as handle:
        with torch.no_grad():
            last = model(**inputs).logits[:, -1]
        tokens = greedy(model, inputs)
        assert torch.equal(tokens, greedy(model, inputs, use_cache=False))
        fed = handle.fed_visual.tolist()
        for row in range(len(ROWS)):
            alone = encode(processor, "video_llava", only=row)
            with torch.no_grad():
                torch.testing.assert_close(model(**alone).logits[:, -1], last[row : row + 1], atol=1e-5, rtol=1e-5)
            assert handle.fed_visual.tolist() == [fed[row]]
            assert torch.equal(greedy(model, alone), tokens[row : row + 1]), row


def test_pruned_video_kv_bytes_equal_the_formula(video_llava: Any) -> None:
    model, processor = video_llava
    inputs = encode(processor, "video_llava", only=3)  # an image and a video
    with dyvte.prune(model, "fastervlm", ratio=0.75) as handle, torch.no_grad():
        cache = cache_out(model(**inputs, use_cache=True))
    expected = dyvte.prefill_kv_bytes(model.config, handle.fed_tokens[0], handle.fed_visual[0])
    assert kv_cache_bytes(cache) == expected


def test_llava_next_video_prunes_images_and_refuses_videos() -> None:
    model, processor = make_tiny("llava_next_video")
    attach_frames_video_processor(processor)
    images_only = encode(processor, "llava_next_video", only=0)
    with dyvte.prune(model, "fastervlm", ratio=0.75) as handle, torch.no_grad():
        model(**images_only)
        visual = torch.isin(images_only["input_ids"], resolve(model).visual_ids).sum()
        assert 0 < int(handle.fed_visual[0]) < int(visual)
        with pytest.raises(dyvte.PruningError, match="not its videos"):
            model(**encode(processor, "llava_next_video", only=1))
