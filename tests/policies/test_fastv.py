"""FastV (dyvte.policies.fastv, through ``dyvte.prune(method="fastv")``): its ranking and its exactness.

- its ranking equals the model's own eager attention (the last prompt token's attention at layer K - 1, mean over
  heads), and it keeps each row's documented budget of the top-ranked visual tokens: on image rows of one family per
  mechanism, and on the video rows of the frames families (GLM-4V's interleaved partial rotary included);
- it equals the masking oracle of the keys it prunes (the compacted oracle on linear-attention layers) on every
  family, on image rows, frames video rows and Qwen-layout video rows, and decoding with the cache equals decoding
  without it; Gemma3 with eager attention (bidirectional image attention, sliding windows);
- on Qwen3.5 K - 1 must be a full-attention layer, and the ranking there is that layer's attention.

Its ragged batch against its rows alone and its refusals of bad budgets are ``tests/pruning/test_prune.py``'s, its
host syncs ``tests/engine/test_serving.py``'s.
"""

from __future__ import annotations

import pytest
import torch

import dyvte
from dyvte.data.video import attach_frames_video_processor
from dyvte.engine.registry import resolve

from ..families import MODEL_TYPES, representatives, with_video
from ..families import family as entry
from ..oracle import check_fastv_equals_masking_oracle, expected_kept, visual_mask
from ..tiny_models import greedy, make_batch, make_tiny
from ..video_inputs import encode_frames, encode_grid

ROWS = [[(32, 32)], [(48, 32), (32, 32)], []]  # one image / two images of different sizes / text only


def encode(processor, family: str) -> dict:
    return dict(make_batch(processor, family, ROWS))


@pytest.fixture(scope="module", params=with_video("grid"))
def grid_video(request):
    model, processor = make_tiny(request.param)
    return request.param, model, processor


@pytest.mark.parametrize("family", [f for f in representatives() if "linear_attention" not in entry(f).tags])
def test_fastv_ranking_equals_eager_attention(family):
    """The recomputed attention row of layer K - 1 (the family's own rotary, norms, scaling) is the model's own, and
    FastV keeps each row's budget of top-ranked visual tokens; one family per mechanism (GLM-4V's interleaved partial
    rotary: its video rows below; linear-attention layers have no attention map: Qwen3.5 below). K - 1 = 3 is
    Gemma3's full-attention layer."""
    layer = 4 if "sliding_window" in entry(family).tags else 2
    model, processor = make_tiny(family, attn="eager", num_layers=5)
    inputs = encode(processor, family)
    with torch.no_grad():
        attn = model(**inputs, output_attentions=True).attentions[layer - 1]  # (B, H, T, T)
    reference = attn[:, :, -1].mean(1)  # (B, T) the last token's attention, mean over heads
    visual = torch.isin(inputs["input_ids"], resolve(model).visual_ids) & inputs["attention_mask"].bool()
    ratio = 0.6
    with dyvte.prune(model, "fastv", layer=layer, ratio=ratio) as handle, torch.no_grad():
        model(**inputs)
    torch.testing.assert_close(handle.scores[visual], reference[visual], atol=1e-6, rtol=1e-5)
    for row in range(len(ROWS)):
        cols = visual[row].nonzero().flatten()
        budget = expected_kept(cols.numel(), ratio) if cols.numel() else 0
        top = cols[reference[row, cols].topk(budget).indices].sort().values
        assert torch.equal(handle.kept_visual[row].nonzero().flatten(), top)
        assert int(handle.visual_after[row]) == budget


@pytest.mark.parametrize("family", with_video("frames"))
def test_fastv_ranking_on_video_rows_equals_eager_attention(family: str) -> None:
    """GLM-4V rotates interleaved pairs of the first half of each head (partial rotary): FastV's recomputed row
    equals the model's own eager attention there too, on video rows as on image rows (above)."""
    model, processor = make_tiny(family, attn="eager")
    inputs = encode_frames(attach_frames_video_processor(processor), family)
    layer = 2
    with torch.no_grad():
        attn = model(**inputs, output_attentions=True).attentions[layer - 1]  # (B, H, T, T)
    reference = attn[:, :, -1].mean(1)  # (B, T)
    visual = torch.isin(inputs["input_ids"], resolve(model).visual_ids) & inputs["attention_mask"].bool()
    with dyvte.prune(model, "fastv", layer=layer, ratio=0.5) as handle, torch.no_grad():
        model(**inputs)
    torch.testing.assert_close(handle.scores[visual], reference[visual], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", MODEL_TYPES)
def test_fastv_equals_masking_oracle_on_every_family(family):
    """FastV is exact on every family, Gemma3's bidirectional attention among the kept image tokens included."""
    if "linear_attention" in entry(family).tags:  # its layer K-1 must be a full-attention layer: the 4th of every 4
        model, processor = make_tiny(family, num_layers=8)
        check_fastv_equals_masking_oracle(model, encode(processor, family), layer=4, ratio=0.5)
        return
    model, processor = make_tiny(family)
    check_fastv_equals_masking_oracle(model, encode(processor, family), layer=1, ratio=0.5)


def test_fastv_on_gemma3_eager_and_with_cache():
    """Gemma3 (bidirectional image attention, sliding windows): eager equals the oracle; cache equals no cache."""
    model, processor = make_tiny("gemma3", attn="eager")
    inputs = encode(processor, "gemma3")
    check_fastv_equals_masking_oracle(model, inputs, layer=1, ratio=0.5)
    with dyvte.prune(model, "fastv", layer=1, ratio=0.5):
        assert torch.equal(greedy(model, inputs, use_cache=True), greedy(model, inputs, use_cache=False))


@pytest.mark.parametrize("family", with_video("frames"))
def test_fastv_on_video_rows_equals_masking_oracle(family: str) -> None:
    model, processor = make_tiny(family)
    inputs = encode_frames(attach_frames_video_processor(processor), family)
    check_fastv_equals_masking_oracle(model, inputs, layer=1, ratio=0.5)
    with dyvte.prune(model, "fastv", layer=2, ratio=0.5):
        assert torch.equal(greedy(model, inputs), greedy(model, inputs, use_cache=False))


def test_fastv_prunes_video_tokens_exactly(grid_video):
    family, model, processor = grid_video
    check_fastv_equals_masking_oracle(model, encode_grid(processor, family), layer=1, ratio=0.5)


@pytest.mark.parametrize("family", representatives("linear_attention"))
def test_fastv_needs_a_full_attention_layer_before_k(family):
    model, processor = make_tiny(family, attn="eager", num_layers=8)
    with pytest.raises(dyvte.UnsupportedModelError, match=r"layer 1 .* linear-attention .* K in \[4, 8\]"):
        dyvte.prune(model, "fastv", layer=2, ratio=0.5)
    inputs = dict(make_batch(processor, family, ROWS))
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    assert len(attentions) == 2  # one per full-attention layer (3 and 7): the linear layers have no attention
    reference = attentions[0][:, :, -1].mean(1)  # (B, T): layer 3, the last token, mean over heads
    visual = visual_mask(model, inputs["input_ids"]) & inputs["attention_mask"].bool()
    with dyvte.prune(model, "fastv", layer=4, ratio=0.5) as handle:
        with torch.no_grad():
            model(**inputs)
        torch.testing.assert_close(handle.scores[visual], reference[visual], atol=1e-6, rtol=1e-5)
        assert torch.equal(greedy(model, inputs), greedy(model, inputs, use_cache=False))
