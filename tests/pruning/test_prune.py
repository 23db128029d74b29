"""Pruning (dyvte.pruning.prune: FasterVLM and random before the LLM, FastV through the same entry point) on tiny
random models: identity, oracles, cache, ragged batches, composition, refusals, a new method in one registration.

The invariants run on the families pruned before the LLM (``tests.families.prunable()``; Video-LLaVA's separate image
and video towers: ``tests/pruning/test_prune_video.py``); every other family is refused by name with its reason. FastV's
ranking and exactness on every family are ``tests/policies/test_fastv.py``'s.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import dyvte
from dyvte.engine.compat import cache_out
from dyvte.engine.registry import resolve
from dyvte.eval.benchmark import kv_cache_bytes
from dyvte.pruning.prune import PRUNING_METHODS, PatchScorer, register_pruning, scorer_method

from ..engine.test_serving import generate
from ..families import MODEL_TYPES, prunable
from ..families import family as entry
from ..oracle import check_fastv_equals_masking_oracle
from ..tiny_models import greedy, make_batch, make_tiny

ROWS = [[(32, 32)], [(48, 32), (32, 32)], []]  # one image / two images of different sizes / text only
VIEW = 16  # patches per view of the tiny CLIP towers (32 px / patch 8)


def encode(processor, family: str, only: int | None = None) -> dict:
    if only is None:
        return dict(make_batch(processor, family, ROWS))
    return dict(make_batch(processor, family, [ROWS[only]], row_ids=[only]))


#: the families pruned before the LLM whose images come as ``pixel_values`` (Video-LLaVA's image tower takes
#: ``pixel_values_images``: tests/pruning/test_prune_video.py)
IMAGE_PRUNABLE = [family for family in prunable() if family != "video_llava"]


@pytest.fixture(scope="module", params=IMAGE_PRUNABLE)
def tiny(request):
    model, processor = make_tiny(request.param)
    return request.param, model, processor


@pytest.fixture(scope="module")
def llava():
    model, processor = make_tiny("llava", num_layers=8)
    return model, dict(make_batch(processor, "llava", ROWS))


@pytest.mark.parametrize(("method", "budget"), [("fastervlm", {"keep": VIEW}), ("random", {"ratio": 0.0})])
def test_keeping_everything_is_the_unhooked_model(tiny, method, budget):
    family, model, processor = tiny
    inputs = encode(processor, family)
    with torch.no_grad():
        base = model(**inputs).logits
    base_tokens = greedy(model, inputs)
    with dyvte.prune(model, method, **budget) as handle, torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)
        assert torch.equal(greedy(model, inputs), base_tokens)
        assert handle.kept_columns is None
    assert not model._forward_pre_hooks and "get_image_features" not in vars(model.base_model)


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_fastervlm_keeps_the_top_cls_attention_patches(feature_layer):
    model, processor = make_tiny("llava", attn="eager")
    model.config.vision_feature_layer = feature_layer
    inputs = encode(processor, "llava")
    with torch.no_grad():
        attn = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions[feature_layer]
    cls_scores = attn[:, :, 0, 1:].mean(1)  # (images, 16): [CLS] -> patch, mean over heads
    keep = 5
    with dyvte.prune(model, "fastervlm", keep=keep) as handle, torch.no_grad():
        model(**inputs)
    for image, kept in enumerate(handle.kept_features):
        expected = cls_scores[image].topk(keep).indices.sort().values
        assert torch.equal(kept.nonzero().flatten(), expected)


def documented_budget(count: int, budget: dict) -> int:
    """prune.py's documented budget for a view of ``count`` patches (``VIEW`` when whole), in exact arithmetic."""
    if "ratio" in budget:  # max(1, floor((1 - R) * n + 0.5))
        share = 1 - Fraction(budget["ratio"])
    else:  # keep=k of a full view's N: max(1, floor(n * k / N + 0.5))
        share = Fraction(budget["keep"], VIEW)
    return max(1, math.floor(count * share + Fraction(1, 2)))


@pytest.mark.parametrize("budget", [{"ratio": 0.75}, {"keep": 5}])
def test_llava_next_views_are_pruned_on_their_own_and_newlines_stay(budget):
    """Each view (base view, every unpadded crop) keeps exactly its own budget, its top-[CLS] patches; newlines stay.

    The oracle is independent of prune.py's packing code: every packed feature entry is matched to the (view, patch)
    it came from by comparing it with the features of each view run through the tower and projector on its own;
    the budget of a view follows the rule of prune.py's module docstring for the patches that survived unpadding.
    """
    model, processor = make_tiny("llava_next", attn="eager")
    inputs = encode(processor, "llava_next")
    # a 32 px image's one crop is pixel for pixel its base view: a little noise makes every view tell apart
    noise = torch.randn(inputs["pixel_values"].shape, generator=torch.Generator().manual_seed(0))
    inputs["pixel_values"] = inputs["pixel_values"] + 0.5 * noise
    cfg, newline = model.config, model.model.image_newline
    with torch.no_grad():
        packed = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    with dyvte.prune(model, "fastervlm", **budget) as handle, torch.no_grad():
        model(**inputs)
    assert len(handle.kept_features) == len(packed) == 3
    crops_seen = 0
    for image, (features, kept) in enumerate(zip(packed, handle.kept_features, strict=True)):
        views = image_size_to_num_patches(inputs["image_sizes"][image], cfg.image_grid_pinpoints, 32)
        with torch.no_grad():
            out = model.model.vision_tower(
                inputs["pixel_values"][image, :views], output_hidden_states=True, output_attentions=True
            )
            per_view = model.model.multi_modal_projector(out.hidden_states[-1][:, 1:])  # (views, N, D)
        cls_scores = out.attentions[-1][:, :, 0, 1:].mean(1)  # (views, N): [CLS] -> patch, mean over heads
        is_newline = (features == newline).all(-1)
        assert is_newline.sum() > 0 and kept[is_newline].all()  # every newline token stays
        distance = torch.cdist(features[~is_newline], per_view.flatten(0, 1))  # (entries, views * N)
        nearest = distance.min(1)
        assert distance.sort(1).values[:, 1].min() > 100 * nearest.values.max()  # unambiguous
        origin = nearest.indices  # (entries,) view * N + patch
        assert origin.unique().numel() == origin.numel()  # each entry is a distinct patch
        view_of, patch_of = origin // VIEW, origin % VIEW
        kept_entries = kept[~is_newline]
        assert torch.equal(view_of[:VIEW], torch.zeros(VIEW, dtype=torch.long))  # the base view comes first, whole
        for view in range(views):
            present = patch_of[view_of == view]  # the patches of this view that survived unpadding
            chosen = patch_of[(view_of == view) & kept_entries]
            count = documented_budget(present.numel(), budget)
            assert chosen.numel() == count, (image, view, present.numel())
            top = present[cls_scores[view, present].topk(count).indices]
            assert torch.equal(chosen.sort().values, top.sort().values)
        crops_seen += sum(int((view_of == v).sum()) < VIEW for v in range(1, views))
    assert crops_seen > 0  # some crop is unpadded: its budget differs from the base view's


@pytest.mark.parametrize(
    "spec", [("fastervlm", {"ratio": 0.75}), ("random", {"keep": 3, "seed": 1}), ("fastv", {"layer": 2, "ratio": 0.5})]
)
def test_generate_with_cache_equals_without(tiny, spec):
    family, model, processor = tiny
    method, kwargs = spec
    inputs = encode(processor, family)
    with dyvte.prune(model, method, **kwargs):
        assert torch.equal(greedy(model, inputs, use_cache=True), greedy(model, inputs, use_cache=False))


def test_ragged_batch_equals_rows_alone(tiny):
    check_ragged_batch(*tiny, "fastervlm")


def test_fastv_ragged_batch_equals_rows_alone():
    check_ragged_batch("llava", *make_tiny("llava"), "fastv")  # FastV is the engine's: family-agnostic


def check_ragged_batch(family: str, model, processor, method: str) -> None:
    kwargs = {"ratio": 0.75, **({"layer": 2} if method == "fastv" else {})}
    inputs = encode(processor, family)
    with dyvte.prune(model, method, **kwargs) as handle:
        with torch.no_grad():
            last = model(**inputs).logits[:, -1]
        tokens = greedy(model, inputs)
        counts = handle.fed_visual if method == "fastervlm" else handle.visual_after
        assert counts[2] == 0 and 0 < counts[0] < counts[1]  # rows keep different numbers of tokens
        for row in range(len(ROWS)):
            alone = encode(processor, family, only=row)
            with torch.no_grad():
                torch.testing.assert_close(model(**alone).logits[:, -1], last[row : row + 1], atol=1e-5, rtol=1e-5)
            assert torch.equal(greedy(model, alone), tokens[row : row + 1])


def test_prune_then_withdraw_equals_pruned_inputs_withdrawn_by_hand(tiny):
    family, model, processor = tiny
    layer, method = 2, "fastervlm"
    for row in range(2):
        inputs = encode(processor, family, only=row)
        with dyvte.prune(model, method, ratio=0.5) as handle, dyvte.withdraw(model, layer=layer), torch.no_grad():
            last = model(**inputs).logits[:, -1]
            kept = handle.kept_features
        if row == 1:
            with dyvte.prune(model, method, ratio=0.5), dyvte.withdraw(model, layer=layer):
                cached = greedy(model, inputs)
                assert torch.equal(cached, greedy(model, inputs, use_cache=False))
            with dyvte.withdraw(model, layer=layer), dyvte.prune(model, method, ratio=0.5):  # either nesting order
                assert torch.equal(greedy(model, inputs), cached)
        with torch.no_grad():  # by hand: the model's features and placeholders, pruned, then withdrawal alone
            extra = {"image_sizes": inputs["image_sizes"]} if family.startswith("llava_next") else {}
            features = model.model.get_image_features(inputs["pixel_values"], **extra).pooler_output
            pruned = [f[k] for f, k in zip(features, kept, strict=True)]
            ids = inputs["input_ids"][0]
            placeholder = ids == model.config.image_token_id
            keep = torch.ones_like(placeholder)
            keep[placeholder] = torch.cat(kept)
            hand = {
                "input_ids": ids[keep][None],
                "attention_mask": torch.ones(1, int(keep.sum()), dtype=torch.long),
                "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=pruned)},
            }
            with dyvte.withdraw(model, layer=layer):
                torch.testing.assert_close(model(**hand).logits[:, -1], last, atol=1e-5, rtol=1e-5)


def test_random_is_seeded_and_the_size_of_fastervlm():
    model, processor = make_tiny("llava_next")
    inputs = encode(processor, "llava_next")
    sets = {}
    for method, seed in [("fastervlm", 0), ("random", 0), ("random", 0), ("random", 1)]:
        with dyvte.prune(model, method, ratio=0.75, seed=seed) as handle, torch.no_grad():
            model(**inputs)
        sets.setdefault(method, []).append(torch.cat(handle.kept_features))
    fastervlm, (r0, r0_again, r1) = sets["fastervlm"][0], sets["random"]
    assert torch.equal(r0, r0_again) and not torch.equal(r0, r1)
    assert fastervlm.sum() == r0.sum() == r1.sum()


def test_bad_inputs_are_clear_errors():
    model, _ = make_tiny("llava", num_layers=2)
    with pytest.raises(ValueError, match="keep=0"):
        dyvte.prune(model, "fastervlm", keep=0)
    with pytest.raises(ValueError, match="keep=17"):
        dyvte.prune(model, "random", keep=VIEW + 1)
    for ratio in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            dyvte.prune(model, "fastervlm", ratio=ratio)
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            dyvte.prune(model, "fastv", layer=1, ratio=ratio)
    with pytest.raises(ValueError, match="K >= 1"):
        dyvte.prune(model, "fastv", layer=0, ratio=0.5)
    with pytest.raises(ValueError, match="out of range"):
        dyvte.prune(model, "fastv", layer=3, ratio=0.5)
    with pytest.raises(TypeError, match="exactly one"):
        dyvte.prune(model, "fastervlm", keep=3, ratio=0.5)
    with pytest.raises(ValueError, match="unknown pruning method"):
        dyvte.prune(model, "sparsevlm", ratio=0.5)
    with dyvte.withdraw(model, layer=1), pytest.raises(dyvte.WithdrawalError, match="cannot nest"):
        dyvte.prune(model, "fastv", layer=1, ratio=0.5)
    with dyvte.prune(model, "fastv", layer=1, ratio=0.5), pytest.raises(dyvte.WithdrawalError, match="already"):
        dyvte.withdraw(model, layer=1)
    with dyvte.prune(model, "random", ratio=0.5), pytest.raises(dyvte.PruningError, match="already pruned"):
        dyvte.prune(model, "fastervlm", ratio=0.5)
    qwen, qwen_processor = make_tiny("qwen2_vl", num_layers=2)
    with pytest.raises(dyvte.UnsupportedModelError, match="llava, llava_next"):
        dyvte.prune(qwen, "fastervlm", ratio=0.5)
    check_fastv_equals_masking_oracle(qwen, encode(qwen_processor, "qwen2_vl"), layer=1, ratio=0.5)  # every family


@pytest.mark.parametrize("family", MODEL_TYPES)
def test_pruning_before_the_llm_is_refused_by_name_or_runs(family):
    """FasterVLM / random run on the families with a feature layout; every other family is refused before anything
    runs, by name, with the reason (the table's ``prune_refusal``: the README's support matrix; an encoder without
    [CLS] is named) and FastV as the way to prune it, and the model is left unhooked."""
    model, _ = make_tiny(family, num_layers=4)
    if family in prunable():
        with dyvte.prune(model, "fastervlm", ratio=0.5):
            pass
        return
    for method in ("fastervlm", "random"):
        reason = entry(family).prune_refusal
        with pytest.raises(dyvte.UnsupportedModelError, match=f"model_type='{family}': .*{reason}.*fastv"):
            dyvte.prune(model, method, ratio=0.5)
    assert not model._forward_pre_hooks and not resolve(model).layers[0]._forward_pre_hooks


@pytest.mark.parametrize(
    "spec", [("fastervlm", {"ratio": 0.75}), ("random", {"ratio": 0.5}), ("fastv", {"ratio": 0.75})]
)
def test_kv_cache_bytes_equal_the_formula(tiny, spec):
    """The cache after a pruned prefill holds what ``prefill_kv_bytes`` gives for the tokens the handle reports."""
    family, model, processor = tiny
    method, budget = spec
    inputs = encode(processor, family, only=1)
    tokens = int(inputs["attention_mask"].sum())
    visual = int(torch.isin(inputs["input_ids"], resolve(model).visual_ids).sum())
    layer = 2 if method == "fastv" else None
    with dyvte.prune(model, method, layer=layer, **budget) as handle, torch.no_grad():
        cache = cache_out(model(**inputs, use_cache=True))
    if method == "fastv":
        expected = dyvte.prefill_kv_bytes(model.config, tokens, visual, layer, visual_after=handle.visual_after[0])
    else:
        expected = dyvte.prefill_kv_bytes(model.config, handle.fed_tokens[0], handle.fed_visual[0])
        assert handle.fed_visual[0] < visual
    assert kv_cache_bytes(cache) == expected
    assert expected < dyvte.prefill_kv_bytes(model.config, tokens, visual)


# -------------------------------------------------------------------------------- a new pruning method
def _first_patches(attention, total: int, seed: int) -> torch.Tensor:
    """Scores that rank each view's patches in reading order (a toy scorer)."""
    return -torch.arange(max(total, 1), dtype=torch.float64)


def test_a_new_pruning_method_is_one_scorer_and_one_registration(llava):
    model, inputs = llava
    register_pruning(scorer_method("first", PatchScorer(uses_attention=False, score=_first_patches)))
    try:
        with dyvte.prune(model, "first", keep=4) as handle:
            cached = generate(model, inputs)
            assert torch.equal(generate(model, inputs, use_cache=False), cached)
            assert torch.equal(generate(model, inputs, cache_implementation="static"), cached)
        assert handle.kept_features and all(k[:4].all() and not k[4:].any() for k in handle.kept_features)
        assert handle.fed_visual.tolist() == [4, 8, 0]
    finally:
        PRUNING_METHODS.pop("first")
    with pytest.raises(ValueError, match="unknown pruning method 'first'"):
        dyvte.prune(model, "first", keep=4)
