"""Qwen3-VL and Qwen3-VL-MoE specifics: DeepStack under withdrawal, M-RoPE positions, pruning, FLOPs.

The invariants of docs/design.md §5 run on both families through ``tests/tiny_models.FAMILIES`` (test_withdraw,
test_grouping, test_prune, test_compat); video rows in ``tests/test_video_qwen.py``. Here:

- DeepStack (docs/design.md §4): the features the decoder adds after its first layers reach the text logits (so
  the masking-oracle test at every K, K inside the DeepStack range included, can fail), and without the engine's
  handling a withdrawal inside that range breaks the model's own injection;
- M-RoPE: layers after an exit get the kept tokens' original 3-D rotary tables;
- exit heads (DyVTE): never firing is the unmodified model, a head firing at j is static K = j + 1, and heads that
  send rows out at different layers (grouped) equal each row alone;
- the DeepStack hooks read nothing on the host: one read per prefill for planned exits, none without an exit, none
  per decode step (docs/design.md §4, "Hot path");
- ``remove()`` takes the DeepStack hooks away too; FasterVLM / random are refused by name; static cache decoding;
- analytic prefill FLOPs equal ``FlopCounterMode`` at every K, dense and routed-MoE layers (mixed too).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dyvte
from dyvte.engine import registry
from dyvte.engine.compat import CompatibilityError, check_deepstack
from dyvte.engine.registry import resolve

from .oracle import check_heads_rows_alone, oracle_logits, visual_mask
from .test_engine import STEPS, count_syncs
from .tiny_models import QWEN3_DEEPSTACK, constant_heads, make_batch, make_tiny, sharpened_heads

FAMILIES = ["qwen3_vl", "qwen3_vl_moe"]
ROWS = [[(32, 32)], [(48, 32), (32, 32)], []]
NEW_TOKENS = 4


def encode(processor, family: str) -> dict:
    return dict(make_batch(processor, family, ROWS))


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    model, processor = make_tiny(request.param)
    return request.param, model, processor


def zero_deepstack(model):
    """Pre-hook on the text decoder that zeroes the DeepStack features (undo with ``.remove()``)."""

    def hook(module, args, kwargs):
        embeds = kwargs.get("deepstack_visual_embeds")
        if embeds is None:
            return None
        return args, {**kwargs, "deepstack_visual_embeds": [torch.zeros_like(e) for e in embeds]}

    return resolve(model).decoder.register_forward_pre_hook(hook, with_kwargs=True)


def test_deepstack_reaches_the_text_logits(tiny):
    """Zeroing the DeepStack features changes the text logits of the oracle at K = len(DeepStack) (every injection
    lands before the exit) and of the withdrawn run alike, so a lost or misplaced injection fails the oracle test."""
    family, model, processor = tiny
    inputs = encode(processor, family)
    kept = ~visual_mask(model, inputs["input_ids"]) & inputs["attention_mask"].bool()
    layer = len(QWEN3_DEEPSTACK)
    reference = oracle_logits(model, inputs, layer)
    hook = zero_deepstack(model)
    try:
        without = oracle_logits(model, inputs, layer)
        with dyvte.withdraw(model, layer=layer) as handle, torch.no_grad():
            withdrawn = handle.to_input_positions(model(**inputs).logits)
    finally:
        hook.remove()
    assert (without[kept] - reference[kept]).abs().max() > 1e-3
    torch.testing.assert_close(withdrawn[kept], without[kept], atol=2e-6, rtol=0)  # the oracle of the zeroed model
    with dyvte.withdraw(model, layer=layer) as handle, torch.no_grad():
        withdrawn = handle.to_input_positions(model(**inputs).logits)
    torch.testing.assert_close(withdrawn[kept], reference[kept], atol=2e-6, rtol=0)


def test_without_deepstack_handling_an_early_exit_breaks(tiny, monkeypatch):
    """The model adds its features through a (B, T) mask: after an exit inside the DeepStack range the hidden states
    are shorter and its own injection fails. The registry's ``deepstack`` flag is what makes the engine apply them."""
    family, model, processor = tiny
    inputs = encode(processor, family)
    plain = dataclasses.replace(registry.REGISTRY[family], deepstack=False)
    monkeypatch.setitem(registry.REGISTRY, family, plain)
    with dyvte.withdraw(model, layer=1), torch.no_grad(), pytest.raises((RuntimeError, IndexError)):
        model(**inputs)


def test_mrope_tables_are_the_kept_tokens_original_ones(tiny):
    """Layers >= K get the rows of the full run's (cos, sin) at each kept token's original column: 3-D positions of
    the visual tokens are not renumbered (renumbering would give other tables)."""
    family, model, processor = tiny
    inputs = encode(processor, family)
    spec, layer = resolve(model), 2
    seen = {}

    def grab(name):
        def hook(module, args, kwargs):
            seen[name] = kwargs["position_embeddings"][0].detach().clone()  # cos (B, T, d)

        return hook

    hook = spec.layers[layer].register_forward_pre_hook(grab("full"), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    with dyvte.withdraw(model, layer=layer) as handle, torch.no_grad():
        hook = spec.layers[layer].register_forward_pre_hook(grab("withdrawn"), with_kwargs=True)  # after dyvte's
        model(**inputs)
        hook.remove()
        positions = handle.output_positions  # (B, T') original column per slot, -1 = padding
    full = seen["full"].expand(positions.shape[0], -1, -1)
    valid = positions >= 0
    expected = full.gather(1, positions.clamp(min=0)[..., None].expand(-1, -1, full.shape[-1]))
    assert torch.equal(seen["withdrawn"][valid], expected[valid])
    renumbered = full.gather(1, torch.arange(positions.shape[1])[None, :, None].expand_as(expected))
    assert not torch.equal(renumbered[valid], expected[valid])


@pytest.mark.parametrize("cache", [None, "static"])
def test_host_syncs_are_those_of_every_family(tiny, cache):
    family, model, processor = tiny
    inputs = encode(processor, family)
    for layer, prefill in ((1, 1), ([1, 3, 0], 1), (resolve(model).num_layers, 0)):
        with dyvte.withdraw(model, layer=layer):
            assert count_syncs(model, inputs, cache_implementation=cache) == [prefill] + [0] * STEPS, layer


def test_remove_takes_the_deepstack_hooks_away(tiny):
    family, model, processor = tiny
    spec = resolve(model)
    assert spec.deepstack_layers == len(QWEN3_DEEPSTACK) < spec.num_layers
    with dyvte.withdraw(model, layer=1):  # the add-back hooks sit only on the layers features are added after
        assert spec.decoder._forward_pre_hooks
        assert [bool(layer._forward_hooks) for layer in spec.layers] == [
            index < len(QWEN3_DEEPSTACK) for index in range(spec.num_layers)
        ]
    assert not spec.decoder._forward_pre_hooks
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in spec.layers)


def test_deepstack_errors_are_clear(tiny):
    family, model, processor = tiny
    inputs = encode(processor, family)
    spec = resolve(model)

    class Renamed(torch.nn.Module):
        def forward(self, inputs_embeds=None, visual_positions=None, deepstack_visual_embeds=None):
            return inputs_embeds

    with pytest.raises(CompatibilityError, match="visual_pos_masks"):
        check_deepstack(Renamed())

    def shorten(module, args, kwargs):  # runs before dyvte's hook: positions that no longer fit the call
        return args, {**kwargs, "visual_pos_masks": kwargs["visual_pos_masks"][:, 1:]}

    hook = spec.decoder.register_forward_pre_hook(shorten, with_kwargs=True, prepend=True)
    try:
        with dyvte.withdraw(model, layer=1), torch.no_grad(), pytest.raises(dyvte.WithdrawalError, match="DeepStack"):
            model(**inputs)
    finally:
        hook.remove()
    assert not spec.decoder._forward_pre_hooks


@pytest.mark.parametrize("method", ["fastervlm", "random"])
def test_pruning_before_the_llm_is_refused_by_name(tiny, method):
    """Qwen's vision encoder has no [CLS] token and no views to prune: refused like qwen2_vl, naming the family."""
    family, model, _ = tiny
    with pytest.raises(dyvte.UnsupportedModelError, match=rf"model_type='{family}'.*fastv"):
        dyvte.prune(model, method, ratio=0.5)
    assert not model._forward_pre_hooks


def test_static_cache_after_mixed_exits_equals_dynamic(tiny):
    family, model, processor = tiny
    inputs = encode(processor, family)
    ids = resolve(model).visual_ids.tolist()
    runs = []
    for kwargs in ({}, {"cache_implementation": "static"}, {"use_cache": False}):
        with dyvte.withdraw(model, layer=[1, 3, 0]), torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, suppress_tokens=ids, **kwargs)
        runs.append(out[:, -NEW_TOKENS:])
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


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


def flop_model(family: str, **text):
    """Eager attention and per-expert matmuls (FlopCounterMode counts neither SDPA's fused kernel nor grouped_mm)."""
    model, processor = make_tiny(family, attn="eager")
    if text:
        config = model.config
        for key, value in text.items():
            setattr(config.text_config, key, value)
        torch.manual_seed(0)
        model = type(model)._from_config(config, attn_implementation="eager").eval()
    if family.endswith("moe"):
        model.set_experts_implementation("eager")
    return model, processor


@pytest.mark.parametrize(
    ("family", "text"),
    [("qwen3_vl", {}), ("qwen3_vl_moe", {}), ("qwen3_vl_moe", {"mlp_only_layers": [1], "decoder_sparse_step": 1})],
    ids=["dense", "moe", "moe_mixed"],
)
def test_detailed_flops_equal_flop_counter(family, text):
    model, processor = flop_model(family, **text)
    inputs = dict(make_batch(processor, family, [ROWS[1]], row_ids=[1]))  # two images, no padding
    tokens, visual = inputs["input_ids"].shape[1], int(visual_mask(model, inputs["input_ids"]).sum())
    top = type(model).__name__
    kinds = {type(layer.mlp).__name__ for layer in resolve(model).layers}
    assert len(kinds) == (2 if text else 1)
    for layer in range(resolve(model).num_layers + 1):
        counter = FlopCounterMode(display=False)
        with dyvte.withdraw(model, layer=layer), torch.no_grad(), counter:
            model(**inputs, logits_to_keep=1)
        counts = counter.get_flop_counts()
        measured = sum(counts[f"{top}.model.language_model"].values()) + sum(counts[f"{top}.lm_head"].values())
        assert measured == dyvte.prefill_flops(model.config, tokens, visual, layer).flops, (family, layer)


def test_moe_paper_convention_counts_the_routed_width():
    model, _ = make_tiny("qwen3_vl_moe", num_layers=2)
    cfg = model.config.text_config
    d, m, n = cfg.hidden_size, cfg.num_experts_per_tok * cfg.moe_intermediate_size, 30
    per_layer = 4 * n * d * d + 2 * n * n * d + 3 * n * d * m
    assert dyvte.prefill_flops(model.config, n, 10, 2, convention="paper").flops == 2 * per_layer
