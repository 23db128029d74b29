"""Exit heads (DyVTE) on the newer families, image and video rows (docs/design.md §5, invariants 1 and 4).

Mistral3 on its ragged image batch; Video-LLaVA, LLaVA-NeXT-Video, LLaVA-OneVision and GLM-4V on the mixed
image / video / text batch of ``tests/test_video.py``:

- heads that never fire are the unhooked model (logits bit for bit, greedy tokens);
- a head firing on layer j equals static withdrawal at K = j + 1;
- sharpened random heads send rows out at different layers, and the batch equals each row alone (logits, tokens).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import dyvte
from dyvte.data.video import attach_frames_video_processor

from .oracle import check_heads_rows_alone
from .test_video import encode as encode_video
from .test_video import rows_of
from .tiny_models import constant_heads, make_batch, make_tiny, sharpened_heads

FAMILIES = ["mistral3", "video_llava", "llava_next_video", "llava_onevision", "glm4v", "glm4v_moe"]
IMAGE_ROWS = [[(32, 32)], [(48, 32), (32, 32)], [], [(32, 48)]]
NEW = 3


def encoder(family: str, processor: Any):
    """``encode(only=None)``: the family's batch (images for Mistral3, the image/video/text mix for the others)."""
    if family == "mistral3":
        rows = IMAGE_ROWS
        return len(rows), lambda only=None: dict(
            make_batch(
                processor, family, rows if only is None else [rows[only]], row_ids=None if only is None else [only]
            )
        )
    processor = attach_frames_video_processor(processor)
    return len(rows_of(family)), lambda only=None: encode_video(processor, family, only=only)


def generate(model: Any, inputs: dict) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False)[:, -NEW:]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request: Any) -> tuple[str, Any, Any, int]:
    model, processor = make_tiny(request.param)
    count, encode = encoder(request.param, processor)
    return request.param, model, encode, count


def test_heads_that_never_fire_and_a_head_that_fires(tiny: Any) -> None:
    family, model, encode, count = tiny
    inputs = encode()
    num_layers = model.config.get_text_config().num_hidden_layers
    with torch.no_grad():
        base = model(**inputs).logits
    base_tokens = generate(model, inputs)
    with dyvte.withdraw(model, heads=constant_heads(model, None)) as handle:
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, base)
        assert torch.equal(generate(model, inputs), base_tokens)
        assert handle.exit_layers.tolist() == [num_layers] * count
    with dyvte.withdraw(model, layer=2):
        with torch.no_grad():
            static = model(**inputs).logits
        static_tokens = generate(model, inputs)
    with dyvte.withdraw(model, heads=constant_heads(model, 1)) as handle:
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, static), family
        assert torch.equal(generate(model, inputs), static_tokens)
        assert handle.exit_layers.tolist() == [2] * count


def test_rows_leaving_at_different_layers_equal_rows_alone(tiny: Any) -> None:
    family, model, encode, count = tiny
    inputs = encode()
    assert inputs["input_ids"].shape[0] == count
    check_heads_rows_alone(model, inputs, sharpened_heads(model), encode, generate)  # rows disagree when to leave


def test_exit_heads_on_video_rows_equal_rows_alone(tiny):
    family, model, processor = tiny
    inputs = encode(processor, family)
    assert inputs["input_ids"].shape[0] == len(ROWS)
    heads = sharpened_heads(model)  # rows disagree about when to leave
    check_heads_rows_alone(model, inputs, heads, lambda row: encode(processor, family, only=row))


def test_exit_heads(tiny):
    family, model, processor = tiny
    inputs = encode(processor, family)
    with torch.no_grad():
        base = model(**inputs).logits
    with dyvte.withdraw(model, heads=constant_heads(model, None)) as handle, torch.no_grad():
        assert torch.equal(model(**inputs).logits, base) and handle.exit_layers.tolist() == [4, 4, 4]
    for head in (0, 2):  # inside the DeepStack range
        with dyvte.withdraw(model, layer=head + 1), torch.no_grad():
            static = model(**inputs).logits
        with dyvte.withdraw(model, heads=constant_heads(model, head)) as handle, torch.no_grad():
            assert torch.equal(model(**inputs).logits, static) and handle.exit_layers.tolist() == [head + 1] * 3
    heads = sharpened_heads(model)  # rows disagree about when to leave

    def alone(row: int) -> dict:
        return dict(make_batch(processor, family, [ROWS[row]], row_ids=[row]))

    check_heads_rows_alone(model, inputs, heads, alone)
