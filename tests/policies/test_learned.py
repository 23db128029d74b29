"""Learned exits (dyvte.policies.learned): withdrawal under exit heads (DyVTE), on every family of the table
(docs/design.md §5, invariants 1 and 4).

Each family on its batch of ``tests/video_inputs.py``'s kind (``Family.video``): the ragged image batch, the mixed
image / video / text batch of the frames families (Video-LLaVA, LLaVA-NeXT-Video, LLaVA-OneVision, GLM-4V), or the
Qwen-layout video batch (Qwen2-VL, Qwen2.5-VL, Qwen3-VL):

- heads that never fire are the unhooked model (logits bit for bit, greedy tokens);
- a head firing on layer j equals static withdrawal at K = j + 1;
- sharpened random heads send rows out at different layers, and the batch equals each row alone (logits, tokens).

On a tiny LLaVA: every head and the threshold that never fires; on Qwen3-VL, heads firing inside the DeepStack range.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import dyvte
from dyvte.data.video import attach_frames_video_processor
from dyvte.engine.registry import resolve
from dyvte.policies.exit_heads import ExitHeads, first_exit, head_features

from ..families import MODEL_TYPES, representatives
from ..families import family as entry
from ..oracle import check_heads_rows_alone
from ..tiny_models import constant_heads, make_batch, make_tiny, sharpened_heads
from ..video_inputs import GRID_ROWS, encode_frames, encode_grid, frames_rows_of

IMAGE_ROWS = [[(32, 32)], [(48, 32), (32, 32)], [], [(32, 48)]]
ROWS = IMAGE_ROWS[:3]
NEW = 3


def encoder(family: str, processor: Any):
    """``count, encode(only=None)``: the family's batch (see the module docstring)."""
    kind = entry(family).video
    if kind == "grid":
        return len(GRID_ROWS), lambda only=None: encode_grid(processor, family, only=only)
    if kind is None:
        rows = IMAGE_ROWS
        return len(rows), lambda only=None: dict(
            make_batch(
                processor, family, rows if only is None else [rows[only]], row_ids=None if only is None else [only]
            )
        )
    processor = attach_frames_video_processor(processor)
    return len(frames_rows_of(family)), lambda only=None: encode_frames(processor, family, only=only)


def generate(model: Any, inputs: dict) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False)[:, -NEW:]


@pytest.fixture(scope="module", params=MODEL_TYPES)
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


@pytest.mark.parametrize("visual_inputs", [False, True])
def test_rows_leaving_at_different_layers_equal_rows_alone(tiny: Any, visual_inputs: bool) -> None:
    family, model, encode, count = tiny
    inputs = encode()
    assert inputs["input_ids"].shape[0] == count
    check_heads_rows_alone(model, inputs, disagreeing_heads(model, inputs, visual_inputs), encode, generate)


def disagreeing_heads(model: Any, inputs: dict, visual_inputs: bool) -> ExitHeads:
    """Sharpened random heads (the first seed from 3 on) under which the rows of ``inputs`` leave at different
    layers."""
    for seed in range(3, 40):
        heads = sharpened_heads(model, seed=seed, visual_inputs=visual_inputs)
        with dyvte.withdraw(model, heads=heads) as handle, torch.no_grad():
            model(**inputs)
            if len(set(handle.exit_layers.tolist())) > 1:
                return heads
    raise AssertionError("no seed sends the rows out at different layers")


# ----------------------------------------------------------------------------------------------- DeepStack
@pytest.fixture(scope="module", params=representatives("deepstack"))
def deepstack(request):
    model, processor = make_tiny(request.param)
    return request.param, model, processor


@pytest.fixture(scope="module")
def llava():
    return make_tiny("llava")


def test_exit_heads_inside_the_deepstack_range(deepstack):
    family, model, processor = deepstack
    inputs = dict(make_batch(processor, family, ROWS))
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


# --------------------------------------------------------------------------------- thresholds and each head
def test_heads_that_never_fire_equal_the_unhooked_model(llava):
    model, processor = llava
    inputs = dict(make_batch(processor, "llava", ROWS))
    with torch.no_grad():
        base = model(**inputs).logits
    base_tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    for heads, threshold in ((constant_heads(model, None), 0.5), (ExitHeads.for_model(model), 1.01)):
        with dyvte.withdraw(model, heads=heads, threshold=threshold) as handle:
            with torch.no_grad():
                assert torch.equal(model(**inputs).logits, base)
            assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), base_tokens)
            assert handle.exit_layers.tolist() == [4, 4, 4]


@pytest.mark.parametrize("head", [0, 1, 2])
def test_head_firing_on_layer_k_equals_static_withdrawal_at_k_plus_1(llava, head):
    model, processor = llava
    inputs = dict(make_batch(processor, "llava", ROWS))
    with dyvte.withdraw(model, layer=head + 1):
        with torch.no_grad():
            static = model(**inputs).logits
        static_tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with dyvte.withdraw(model, heads=constant_heads(model, head)) as handle:
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, static)
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), static_tokens)
        assert handle.exit_layers.tolist() == [head + 1] * 3


# ------------------------------------------------------------------------------------------ layer-change heads
def layer_change_heads(model: Any, seed: int = 5) -> ExitHeads:
    """Sharpened random heads (as :func:`sharpened_heads`) that also read their features' change since the previous
    head's layer."""
    torch.manual_seed(seed)
    config = dataclasses.replace(ExitHeads.for_model(model).config, layer_change=True)
    heads = ExitHeads(config).eval()
    with torch.no_grad():
        for head in heads.heads:
            head[3].weight.mul_(30.0)
            head[3].bias.fill_(-1.0)
    return heads


def test_layer_change_heads_exit_where_their_offline_features_say(llava, tmp_path):
    """At run time, a layer-change head reads the change since the previous head's layer exactly as the offline
    ``(B, L-1, 2d)`` features give it (what the heads train and are certified on); saved and loaded, the same; every
    row equals the row alone."""
    model, processor = llava
    inputs = dict(make_batch(processor, "llava", IMAGE_ROWS))
    heads = layer_change_heads(model)
    heads.save_pretrained(tmp_path / "heads")
    loaded = ExitHeads.from_pretrained(tmp_path / "heads")
    assert loaded.config.layer_change and loaded.config.input_size == 4 * model.config.text_config.hidden_size
    with torch.no_grad():
        states = model(**inputs, output_hidden_states=True).hidden_states  # L + 1 of (B, T, d)
    visual = torch.isin(inputs["input_ids"], resolve(model).visual_ids)
    valid = inputs["attention_mask"].bool()
    features = torch.stack([head_features(states[j + 1], visual, valid) for j in range(heads.num_heads)], dim=1)
    with torch.no_grad():
        offline = first_exit(heads(features), heads.exit_logits()).tolist()
    for attached in (heads, loaded):
        with dyvte.withdraw(model, heads=attached) as handle, torch.no_grad():
            model(**inputs)
            assert handle.exit_layers.tolist() == offline
    assert len(set(offline)) > 1, offline  # rows leave at different layers

    def alone(row: int) -> dict:
        return dict(make_batch(processor, "llava", [IMAGE_ROWS[row]], row_ids=[row]))

    check_heads_rows_alone(model, inputs, heads, alone)
    with pytest.raises(ValueError, match="head 1 reads the change since head 0"):
        heads.layer_logits(1, features[:, 1])


# ------------------------------------------------------------------------------------------ heads that see the image
def test_visual_input_heads_exit_where_their_offline_features_say(llava, tmp_path):
    """Heads that also read the visual tokens' pooled states: at run time (a padded batch with a row without images,
    rows leaving at different layers, so that later heads run on a compacted layout) each row exits where the
    offline ``(B, L-1, 4d)`` features say (``head_features(..., visual_inputs=True)`` on the full model's states, what
    the label cache keeps: tests/exits/test_labels.py); saved and loaded, the same; every row equals the row alone."""
    model, processor = llava
    inputs = dict(make_batch(processor, "llava", IMAGE_ROWS))
    heads = sharpened_heads(model, seed=12, visual_inputs=True)
    heads.save_pretrained(tmp_path / "heads")
    loaded = ExitHeads.from_pretrained(tmp_path / "heads")
    hidden = model.config.text_config.hidden_size
    assert loaded.config.visual_inputs and loaded.config.input_size == 4 * hidden
    with torch.no_grad():
        states = model(**inputs, output_hidden_states=True).hidden_states  # L + 1 of (B, T, d)
    visual = torch.isin(inputs["input_ids"], resolve(model).visual_ids)
    valid = inputs["attention_mask"].bool()
    features = torch.stack(
        [head_features(states[j + 1], visual, valid, visual_inputs=True) for j in range(heads.num_heads)], dim=1
    )  # (B, L-1, 4d)
    assert features[2, :, 2 * hidden :].abs().sum() == 0  # the row without images pools nothing
    with torch.no_grad():
        offline = first_exit(heads(features), heads.exit_logits()).tolist()
    assert len(set(offline)) > 1, offline  # rows leave at different layers
    for attached in (heads, loaded):
        with dyvte.withdraw(model, heads=attached) as handle, torch.no_grad():
            model(**inputs)
            assert handle.exit_layers.tolist() == offline

    def alone(row: int) -> dict:
        return dict(make_batch(processor, "llava", [IMAGE_ROWS[row]], row_ids=[row]))

    check_heads_rows_alone(model, inputs, heads, alone)
