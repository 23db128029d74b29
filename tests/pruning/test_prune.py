"""Pruning (FasterVLM, random, FastV) on tiny random models: identity, oracles, cache, ragged batches, composition."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import dyvte
from dyvte.data.records import build_inputs
from dyvte.engine.compat import cache_out
from dyvte.engine.registry import resolve
from dyvte.eval.benchmark import kv_cache_bytes
from dyvte.eval.methods import PruningRun, parse_method

from .test_calibrate_evaluate import TEMPLATE, records
from .tiny_models import FAMILIES, greedy, make_batch, make_tiny

ROWS = [[(32, 32)], [(48, 32), (32, 32)], []]  # one image / two images of different sizes / text only
VIEW = 16  # patches per view of the tiny CLIP towers (32 px / patch 8)


def encode(processor, family: str, only: int | None = None) -> dict:
    if only is None:
        return dict(make_batch(processor, family, ROWS))
    return dict(make_batch(processor, family, [ROWS[only]], row_ids=[only]))


@pytest.fixture(scope="module", params=["llava", "llava_next", "llava_next_video"])
def tiny(request):
    model, processor = make_tiny(request.param)
    return request.param, model, processor


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


@pytest.mark.parametrize(("family", "layer"), [("llava", 2), ("qwen2_vl", 1), ("gemma3", 4)])
def test_fastv_ranking_equals_eager_attention(family, layer):
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


def test_flops_and_harness():
    flops = dyvte.prefill_flops
    model, processor = make_tiny("llava")
    cfg = model.config
    layers = cfg.text_config.num_hidden_layers
    got = flops(cfg, 40, 16, 2, visual_after=4, convention="paper")
    per_layer = lambda n: float(dyvte.eval.flops.layer_flops(cfg, n, "paper"))  # noqa: E731
    assert got.flops == pytest.approx(2 * per_layer(40) + (layers - 2) * per_layer(40 - 16 + 4))
    assert flops(cfg, 40, 16, 2, visual_after=16).ratio == 1.0
    assert flops(cfg, 40, 16, 2).flops == flops(cfg, 40, 16, 2, visual_after=0).flops
    with pytest.raises(ValueError, match="visual_after"):
        flops(cfg, 40, 16, 2, visual_after=17)

    names = [m.name for m in parse_method("fastervlm:0.75,0.9", layers) + parse_method("fastv:2:0.5", layers)]
    assert names == ["fastervlm R=0.75", "fastervlm R=0.9", "fastv K=2 R=0.5"]
    assert parse_method("random:0.5", layers)[0] == PruningRun("random", {"ratio": 0.5})
    processor.chat_template = TEMPLATE
    data = records(4)
    full = dyvte.evaluate(model, processor, data, batch_size=2, progress=False)
    assert full.relative_flops == [1.0] * len(data)
    # each record alone: its tokens (padding excluded) and visual tokens, and what the documented budget keeps
    alone = [build_inputs(processor, [r]) for r in data]
    tokens = torch.tensor([int(x["attention_mask"].sum()) for x in alone])
    visual = torch.tensor([int(torch.isin(x["input_ids"], resolve(model).visual_ids).sum()) for x in alone])
    assert visual.tolist() == [VIEW] * len(data)
    kept = torch.tensor([expected_kept(int(v), 0.75) for v in visual])  # 16 -> 4
    unpruned = flops(cfg, tokens, visual).full  # the reference of "relative": the full model on the full prompt
    expected = {  # FasterVLM: the LLM receives a shorter prompt; FastV: layers >= K see the kept visual tokens
        "fastervlm": flops(cfg, tokens - visual + kept, kept).full / unpruned,
        "fastv": flops(cfg, tokens, visual, 2, visual_after=kept).flops / unpruned,
    }
    for method in (PruningRun("fastervlm", {"ratio": 0.75}), PruningRun("fastv", {"ratio": 0.75, "layer": 2})):
        result = dyvte.evaluate(model, processor, data, method, reference=full, batch_size=2, progress=False)
        assert result.relative_flops == pytest.approx(expected[method.method].tolist(), rel=1e-12)
        assert result.flops == pytest.approx(float(expected[method.method].mean()), rel=1e-6)
        assert result.exit_layers == [2 if method.method == "fastv" else layers] * len(data)


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


#: why each family without a feature layout cannot be pruned before the LLM (the README's support matrix)
PRUNE_REFUSALS = {
    "llava_onevision": "SiglipVisionModel\\) has no \\[CLS\\]",
    "gemma3": "SiglipVisionModel\\) has no \\[CLS\\]",
    "mistral3": "PixtralVisionModel\\) has no \\[CLS\\]",
    "internvl": "not laid out as patches of views",
}
PRUNABLE = ("llava", "llava_next", "llava_next_video", "video_llava")


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_before_the_llm_is_refused_by_name_or_runs(family):
    """FasterVLM / random run on the families with a feature layout; every other family is refused before anything
    runs, by name and with the reason, and the model is left unhooked."""
    model, _ = make_tiny(family, num_layers=4)
    if family in PRUNABLE:
        with dyvte.prune(model, "fastervlm", ratio=0.5):
            pass
        return
    for method in ("fastervlm", "random"):
        reason = PRUNE_REFUSALS.get(family, "has no \\[CLS\\] token")
        with pytest.raises(dyvte.UnsupportedModelError, match=f"model_type='{family}': .*{reason}"):
            dyvte.prune(model, method, ratio=0.5)
    assert not model._forward_pre_hooks and not resolve(model).layers[0]._forward_pre_hooks


@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_equals_masking_oracle_on_every_family(family):
    """FastV is exact on every family, Gemma3's bidirectional attention among the kept image tokens included."""
    if family.startswith("qwen3_5"):  # its layer K-1 must be a full-attention layer: the 4th of every 4
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
