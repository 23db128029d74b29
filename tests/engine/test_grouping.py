"""Grouped execution after a mixed exit (docs/design.md §4, "Grouped execution"), on tiny random models.

A batch whose rows leave at different layers runs each later layer once per group of rows (rows still in / rows
that left), each at its own width. What must hold:

- the outputs are those of the ungrouped call (``handle.grouped = False``), on every family of the table, SDPA and
  eager, per-row K and exit heads (Qwen3.5: full-attention layers per group, linear layers on the whole batch);
- ``generate`` with the cache equals ``generate`` without it, dynamic caches on every family, static caches on the
  decoder mechanisms that shape a cache (plain, M-RoPE, sliding window): the grouped prefill writes the cache the
  decode steps read;
- the prefill's FLOPs are the sum of its rows' FLOPs alone (the FLOPs ideal), where the ungrouped call costs more;
- repeated rows decode like a batch prefilled with the repeats (Qwen3.5's recurrent states too);
- removing the handle leaves no wrapped forward behind.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dyvte
from dyvte.engine.compat import cache_out
from dyvte.engine.registry import resolve
from dyvte.eval.benchmark import greedy_steps

from ..families import MODEL_TYPES, representative, representatives
from ..tiny_models import greedy as tiny_greedy
from ..tiny_models import make_batch, make_tiny, random_heads

ROWS = [[(32, 32)], [(48, 32), (32, 32)], [], [(32, 32)]]  # ragged, left-padded; row 3 is row 0's shape
HYBRID_ROWS = ROWS[:3]  # Qwen3.5's mixed heads exits below are those of these three rows
EXITS = [1, 3, 0, 4]  # L = 4: row 3 never leaves, so every later layer has rows in and rows out
NEW_TOKENS = 4
TOL = 1e-5


def greedy(model, inputs: dict, **kwargs) -> torch.Tensor:
    return tiny_greedy(model, inputs, NEW_TOKENS, min_new_tokens=NEW_TOKENS, **kwargs)


def run(model, inputs: dict, grouped: bool, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Last-position logits, cached greedy tokens and cache-less greedy tokens under the per-row exits."""
    with dyvte.withdraw(model, layer=EXITS) as handle, torch.no_grad():
        handle.grouped = grouped
        last = model(**inputs).logits[:, -1]
        cached = greedy(model, inputs, **kwargs)
        plain = greedy(model, inputs, use_cache=False)
        assert handle.exit_layers.tolist() == EXITS
    return last, cached, plain


@pytest.mark.parametrize("family", MODEL_TYPES)
def test_grouped_equals_ungrouped_and_cache_equals_no_cache(family):
    model, processor = make_tiny(family)
    inputs = dict(make_batch(processor, family, ROWS))
    last, cached, plain = run(model, inputs, grouped=True)
    ref_last, ref_cached, _ = run(model, inputs, grouped=False)
    torch.testing.assert_close(last, ref_last, atol=TOL, rtol=TOL)
    assert torch.equal(cached, ref_cached), family
    assert torch.equal(cached, plain), f"{family}: decode after a grouped prefill differs from no cache"
    for layer in resolve(model).layers:
        assert "forward" not in vars(layer), "remove() left a wrapped forward"


@pytest.mark.parametrize("family", representatives("plain", "mrope", "sliding_window"))
def test_static_cache_after_a_grouped_prefill(family):
    model, processor = make_tiny(family)
    inputs = dict(make_batch(processor, family, ROWS))
    _, dynamic, plain = run(model, inputs, grouped=True)
    _, static, _ = run(model, inputs, grouped=True, cache_implementation="static")
    assert torch.equal(static, dynamic) and torch.equal(static, plain), family


def test_eager_attention_grouped_equals_ungrouped():
    model, processor = make_tiny("gemma3", attn="eager")
    inputs = dict(make_batch(processor, "gemma3", ROWS))
    last, cached, plain = run(model, inputs, grouped=True)
    ref_last, _, _ = run(model, inputs, grouped=False)
    torch.testing.assert_close(last, ref_last, atol=TOL, rtol=TOL)
    assert torch.equal(cached, plain)


def prefill_flops(model, inputs: dict, exits: list[int] | int, grouped: bool = True) -> int:
    with dyvte.withdraw(model, layer=exits) as handle, torch.no_grad(), FlopCounterMode(display=False) as counter:
        handle.grouped = grouped
        model(**inputs, logits_to_keep=1)
    return counter.get_total_flops()


def test_grouped_prefill_costs_the_sum_of_its_rows():
    """Equal rows, exits [1, 1, 3, 8] of 8 layers: the grouped batch's FLOPs are exactly the rows' FLOPs alone."""
    model, processor = make_tiny("llava", num_layers=8)
    exits = [1, 1, 3, 8]
    batch = dict(make_batch(processor, "llava", [[(32, 32)]] * len(exits), row_ids=[0] * len(exits)))
    alone = dict(make_batch(processor, "llava", [[(32, 32)]], row_ids=[0]))
    rows = sum(prefill_flops(model, alone, exit_layer) for exit_layer in exits)
    grouped = prefill_flops(model, batch, exits)
    ungrouped = prefill_flops(model, batch, exits, grouped=False)
    assert grouped == rows
    assert ungrouped > 1.2 * rows  # the old cost: every row at the widest width until the last row leaves


def test_heads_with_mixed_exits_grouped_equal_ungrouped():
    """Run-time exits (heads decide layer by layer) group too; a cache-less generate re-decides the exits on every
    longer prompt, so the cached tokens are compared with the ungrouped cached tokens."""
    model, processor = make_tiny("llava", num_layers=8)
    inputs = dict(make_batch(processor, "llava", ROWS))
    heads = random_heads(model)
    outputs = {}
    for grouped in (True, False):
        with dyvte.withdraw(model, heads=heads, threshold=0.7) as handle, torch.no_grad():
            handle.grouped = grouped
            last = model(**inputs).logits[:, -1]
            exits = handle.exit_layers.tolist()
            outputs[grouped] = (last, greedy(model, inputs), exits)
    (last, cached, exits), (ref_last, ref_cached, ref_exits) = outputs[True], outputs[False]
    assert exits == ref_exits and len(set(exits)) > 1 and max(exits) > min(exits)  # really mixed
    torch.testing.assert_close(last, ref_last, atol=TOL, rtol=TOL)
    assert torch.equal(cached, ref_cached)


@pytest.mark.parametrize(
    ("family", "num_layers"), [(representative("plain"), 8), (representative("linear_attention"), 4)]
)
def test_repeated_rows_decode_like_a_prefilled_batch(family, num_layers):
    """``handle.repeat_rows`` after a grouped prefill decodes the tokens of a batch prefilled with the repeats
    (Qwen3.5: the linear layers' recurrent and conv states are repeated with the KV cache; benchmarks/decode.py uses
    it)."""
    model, processor = make_tiny(family, num_layers=num_layers)
    rows, exits, times = [[(32, 32)], [(32, 32)]], [1, num_layers], 2
    suppress = resolve(model).visual_ids
    few = dict(make_batch(processor, family, rows))
    many = dict(make_batch(processor, family, [r for r in rows for _ in range(times)], row_ids=[0, 0, 1, 1]))
    outs = []
    for inputs, layer, repeat in ((few, exits, times), (many, [e for e in exits for _ in range(times)], 1)):
        with dyvte.withdraw(model, layer=layer) as handle, torch.no_grad():
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            cache, logits, mask = cache_out(out), out.logits[:, -1], inputs["attention_mask"]
            if repeat > 1:
                handle.repeat_rows(cache, repeat)
                logits, mask = logits.repeat_interleave(repeat, 0), mask.repeat_interleave(repeat, 0)
            outs.append(greedy_steps(model, logits, cache, mask, NEW_TOKENS, suppress)[0])
            assert handle.exit_layers.tolist() == [1, 1, num_layers, num_layers]
    assert torch.equal(outs[0], outs[1])
    with dyvte.withdraw(model, layer=exits) as handle, pytest.raises(dyvte.WithdrawalError, match="cache"):
        handle.repeat_rows(cache, 2)


def test_heads_mixed_exits_grouped_equal_ungrouped_and_rows_alone():
    """Exit heads with really mixed exits: grouped (full-attention layers per group, linear layers on the whole
    batch) equals ungrouped, and cached decoding equals the cache-less one."""
    model, processor = make_tiny("qwen3_5", num_layers=8)
    inputs = dict(make_batch(processor, "qwen3_5", HYBRID_ROWS))
    heads = random_heads(model, seed=5, head_size=None, std=0.2)
    outputs = {}
    for grouped in (True, False):
        with dyvte.withdraw(model, heads=heads, threshold=0.7) as handle, torch.no_grad():
            handle.grouped = grouped
            last = model(**inputs).logits[:, -1]
            outputs[grouped] = (last, tiny_greedy(model, inputs), handle.exit_layers.tolist())
    (last, cached, exits), (ref_last, ref_cached, ref_exits) = outputs[True], outputs[False]
    assert exits == ref_exits == [4, 8, 2], exits  # really mixed: before / after the attention layer 3, and never
    torch.testing.assert_close(last, ref_last, atol=2e-6, rtol=2e-6)
    assert torch.equal(cached, ref_cached)
    for row in range(len(HYBRID_ROWS)):
        alone = dict(make_batch(processor, "qwen3_5", [HYBRID_ROWS[row]], row_ids=[row]))
        with dyvte.withdraw(model, layer=exits[row]), torch.no_grad():
            torch.testing.assert_close(model(**alone).logits[:, -1], last[row : row + 1], atol=1e-5, rtol=1e-5)
