"""prefill_flops and prefill_kv_bytes on the newer families, image and video rows (docs/design.md §2, FLOPs).

The analytic "detailed" figure equals torch's FlopCounterMode on the text decoder and LM head at every exit layer
(eager attention: CPU SDPA's fused kernel is not counted), and the KV bytes equal a real cache's, for Mistral3
(Mistral decoder), GLM-4V (fused gate/up projection, biased q/k/v, extra post-norms, partial rotary), Video-LLaVA,
LLaVA-NeXT-Video and LLaVA-OneVision, on a row with images and on a row with a video.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dyvte
from dyvte.data.video import attach_frames_video_processor
from dyvte.engine.compat import cache_out
from dyvte.engine.registry import resolve
from dyvte.eval.benchmark import kv_cache_bytes

from .oracle import visual_mask
from .test_video import encode as encode_video
from .tiny_models import make_batch, make_tiny

CASES = [
    ("mistral3", "image"),
    ("glm4v", "image"),
    ("glm4v", "video"),
    ("glm4v_moe", "image"),
    ("glm4v_moe", "video"),
    ("video_llava", "image"),
    ("video_llava", "video"),
    ("llava_next_video", "image"),
    ("llava_next_video", "video"),
    ("llava_onevision", "video"),
]


def one_row(family: str, kind: str, processor: Any) -> dict:
    """One unpadded row: two images of different sizes, or a video (with an image where the family allows)."""
    if kind == "image":
        return dict(make_batch(processor, family, [[(48, 32), (32, 32)]]))
    return encode_video(attach_frames_video_processor(processor), family, only=3)


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_detailed_flops_and_kv_bytes_equal_the_measured(family: str, kind: str) -> None:
    model, processor = make_tiny(family, attn="eager")
    if family == "glm4v_moe":
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
