"""Serving (docs/design.md §4, "Hot path"; §5 item 6): host syncs per call, static cache = dynamic cache, compiled
decoding, in-place layouts.

Host syncs are counted by :class:`dyvte.engine.syncs.SyncCounter` (a ``TorchFunctionMode``): every call of a reading
function (``item``, ``tolist``, ``__bool__``, ``cpu``, ``nonzero``, ...), boolean-mask indexing, and every
host-to-device copy whose innermost caller outside torch is the ``dyvte`` package, i.e. dyvte itself (hooks,
policies, FastV's ranking) and not transformers or ``generate``. The counts hold on one representative of every
mechanism (``tests.families.representatives()``); the static cache equals the dynamic one on the decoder mechanisms
that shape a cache (plain, M-RoPE, sliding window), under DeepStack and on linear-attention states.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version

import dyvte
from dyvte.engine.registry import resolve
from dyvte.engine.syncs import SyncCounter

from ..families import representatives
from ..tiny_models import greedy, make_batch, make_tiny, random_heads

ROWS = [[(32, 32)], [(48, 32), (32, 32)], []]  # B = 3: one image / two images / text only (ragged, left-padded)
NUM_LAYERS = 8
STEPS = 4  # decode steps after the prefill
NEW_TOKENS = 4


def encode(processor, family: str) -> dict:
    return dict(make_batch(processor, family, ROWS))


@pytest.fixture(scope="module", params=representatives())
def tiny(request):
    model, processor = make_tiny(request.param)
    return request.param, model, processor


@pytest.fixture(scope="module", params=representatives("deepstack"))
def deepstack(request):
    model, processor = make_tiny(request.param)
    return request.param, model, processor


@pytest.fixture(scope="module", params=representatives("linear_attention"))
def hybrid(request):
    model, processor = make_tiny(request.param)
    return request.param, model, processor, dict(make_batch(processor, request.param, ROWS))


@pytest.fixture(scope="module")
def llava():
    model, processor = make_tiny("llava", num_layers=NUM_LAYERS)
    return model, dict(make_batch(processor, "llava", ROWS))


def generate(model, inputs: dict, steps: int = STEPS, **kwargs) -> torch.Tensor:
    ids = resolve(model).visual_ids.tolist()
    return model.generate(
        **inputs, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False, suppress_tokens=ids, **kwargs
    )


def count_syncs(model, inputs: dict, **kwargs) -> list[int]:
    """Syncs per call of one greedy generate: ``[prefill, step 1, ..., step STEPS]``."""
    counter = SyncCounter(model)
    try:
        with counter, torch.no_grad():
            generate(model, inputs, **kwargs)
    finally:
        counter.remove()
    assert len(counter.calls) == STEPS + 1, counter.calls
    return counter.calls


# ------------------------------------------------------------------------------------------------- host syncs
@pytest.mark.parametrize("cache", [None, "static"])
@pytest.mark.parametrize("layer", [2, [1, 3, NUM_LAYERS], 0])
def test_planned_exits_read_once_per_prefill_and_never_per_step(llava, layer, cache):
    """Static and per-row K: one read of a (B, 3) count tensor in the prefill's top-level hook, none per layer or
    per decode step (dynamic and static caches)."""
    model, inputs = llava
    with dyvte.withdraw(model, layer=layer):
        assert count_syncs(model, inputs, cache_implementation=cache) == [1] + [0] * STEPS


def test_never_withdrawing_reads_nothing(llava):
    model, inputs = llava
    with dyvte.withdraw(model, layer=NUM_LAYERS):
        assert count_syncs(model, inputs) == [0] * (STEPS + 1)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.7, 1.5])
def test_heads_read_once_per_layer_while_a_row_is_in(llava, threshold):
    """Exit heads: the count read, then one read per layer where some row is still in (none after the last row
    leaves); zero per decode step."""
    model, inputs = llava
    with dyvte.withdraw(model, heads=random_heads(model), threshold=threshold) as handle:
        calls = count_syncs(model, inputs, cache_implementation="static")
        exits = handle.exit_layers.tolist()
    layers_run = min(max(exits), NUM_LAYERS - 1)  # heads are read at layers 1 .. the last row's exit
    assert calls == [1 + layers_run] + [0] * STEPS, (exits, calls)
    if threshold == 0.0:
        assert exits == [1, 1, 1] and calls[0] == 2
    if threshold == 1.5:
        assert exits == [NUM_LAYERS] * 3 and calls[0] == NUM_LAYERS


@pytest.mark.parametrize("threshold", [0.0, 0.7, 1.5])
def test_watching_the_heads_scores_for_a_shift_reads_nothing_more(llava, threshold):
    """The shift monitor keeps the scores on the device: the same reads per call as without it, and each head kept
    the logits of exactly the rows that reached it (those whose exit layer is later)."""
    from dyvte.policies.learned import LearnedExit

    model, inputs = llava
    heads = random_heads(model)
    counts = {}
    for monitor in (False, True):
        policy = LearnedExit(heads, threshold, monitor_shift=monitor)
        with dyvte.withdraw(model, policy=policy) as handle:
            counts[monitor] = count_syncs(model, inputs, cache_implementation="static")
            exits = handle.exit_layers.tolist()
    assert counts[True] == counts[False]
    seen = [len(s) for s in handle.shift_monitor.scores()]
    assert seen == [sum(e > j for e in exits) for j in range(NUM_LAYERS - 1)], (exits, seen)


def test_mixed_heads_exits_are_really_mixed(llava):
    """The threshold sweep above covers a batch whose rows leave at different layers."""
    model, inputs = llava
    seen = set()
    for threshold in (0.5, 0.7):
        with dyvte.withdraw(model, heads=random_heads(model), threshold=threshold) as handle, torch.no_grad():
            model(**inputs)
        seen.add(len(set(handle.exit_layers.tolist())))
    assert max(seen) > 1


def test_fastv_reads_once_per_prefill(llava):
    model, inputs = llava
    with dyvte.prune(model, "fastv", layer=2, ratio=0.5):
        assert count_syncs(model, inputs) == [1] + [0] * STEPS
        assert count_syncs(model, inputs, cache_implementation="static") == [1] + [0] * STEPS


# ------------------------------------------------------------------------------------------------ static cache
def _policies(model):
    heads = random_heads(model)
    return {
        "static": lambda: dyvte.withdraw(model, layer=2),
        "per-row": lambda: dyvte.withdraw(model, layer=[1, 3, 0]),
        "heads": lambda: dyvte.withdraw(model, heads=heads, threshold=0.5),
        "fastv": lambda: dyvte.prune(model, "fastv", layer=2, ratio=0.5),
    }


@pytest.mark.parametrize("family", representatives("plain", "mrope", "sliding_window"))
def test_static_cache_equals_dynamic_cache(family):
    """Greedy tokens with ``cache_implementation="static"`` equal those of the dynamic cache, for every policy, and
    a second generate reusing the (reset) static cache gives them again."""
    model, processor = make_tiny(family)
    inputs = dict(make_batch(processor, family, ROWS))
    kwargs = {"output_logits": True, "return_dict_in_generate": True}
    for name, context in _policies(model).items():
        with context():
            dynamic = generate(model, inputs, steps=5, **kwargs)
            static = generate(model, inputs, steps=5, cache_implementation="static", **kwargs)
            again = generate(model, inputs, steps=5, cache_implementation="static", **kwargs)
        assert torch.equal(static.sequences, dynamic.sequences), (family, name)
        assert torch.equal(again.sequences, static.sequences), (family, name)
        for got, want in zip(static.logits, dynamic.logits, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with dyvte.withdraw(model, layer=2):  # sliding-window layers (gemma3) decode past their window too
        long = generate(model, inputs, steps=12)
        assert torch.equal(generate(model, inputs, steps=12, cache_implementation="static"), long)


def test_pruning_before_the_llm_works_with_a_static_cache(llava):
    """... and its decode steps read nothing either (its prefill scores and packs views on the host)."""
    model, inputs = llava
    for method in ("fastervlm", "random"):
        with dyvte.prune(model, method, ratio=0.5), dyvte.withdraw(model, layer=2):
            assert torch.equal(generate(model, inputs, cache_implementation="static"), generate(model, inputs))
        with dyvte.prune(model, method, ratio=0.5):
            assert count_syncs(model, inputs, cache_implementation="static")[1:] == [0] * STEPS


#: transformers releases whose compiled decoding step is one dynamo graph (measured: 5.24 yes, 5.19 no)
ONE_DECODE_GRAPH = Version(transformers.__version__) >= Version("5.24")


@pytest.mark.slow
def test_compiled_decoding_equals_eager_with_one_graph_and_no_break():
    """``generate``'s compiled decoding forward (static cache, transformers' default ``CompileConfig``) under
    withdrawal: the dynamic cache's tokens, one dynamo graph for every decode step, no graph break (~20 s on CPU)."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model, processor = make_tiny("llava", num_layers=4)
    inputs = dict(make_batch(processor, "llava", ROWS))
    config = CompileConfig(mode="default")  # CUDA graphs ("reduce-overhead") need a GPU
    config._compile_all_devices = True  # generate compiles on CPU only when told to
    for context in (lambda: dyvte.withdraw(model, layer=2), lambda: dyvte.withdraw(model, layer=[1, 3, 0])):
        torch._dynamo.reset()
        counters.clear()
        with context():
            eager = generate(model, inputs, steps=6)
            compiled = generate(model, inputs, steps=6, cache_implementation="static", compile_config=config)
        assert torch.equal(compiled, eager)
        if ONE_DECODE_GRAPH:  # older generate() recompiles its decoding step (3 graphs on 5.19), tokens still equal
            assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------- in-place layouts
@pytest.mark.parametrize("cache", [None, "static"])
def test_decode_layouts_grow_in_place(llava, cache):
    """The cache layout of each group of layers is written in place: a static cache's never moves, a dynamic
    cache's is reallocated O(log N) times over N steps (doubling), never once per step."""
    model, inputs = llava
    steps = 24
    pointers: dict[tuple[bool, ...], set[int]] = {}
    lengths: dict[tuple[bool, ...], list[int]] = {}
    with dyvte.withdraw(model, layer=[1, 3, 0]) as handle:

        def record(module, args, kwargs, output):
            for key, group in handle._layouts.groups.items():
                pointers.setdefault(key, set()).add(group.cols.data_ptr())
                lengths.setdefault(key, []).append(group.length)
            return output

        hook = model.register_forward_hook(record, with_kwargs=True)
        try:
            generate(model, inputs, steps=steps, cache_implementation=cache)
        finally:
            hook.remove()
    assert len(pointers) == 3  # rows leave at layers 0, 1 and 3: three groups of layers
    for key, seen in lengths.items():
        assert seen == list(range(seen[0], seen[0] + steps + 1))  # one slot per step
        limit = 1 if cache == "static" else 1 + (seen[-1] // seen[0]).bit_length()  # doubling
        assert len(pointers[key]) <= limit, (key, seen[0], seen[-1], len(pointers[key]))


# ------------------------------------------------------------------------------------------ every mechanism
@pytest.mark.parametrize("cache", [None, "static"])
def test_host_syncs_are_those_of_every_family(tiny, cache):
    family, model, processor = tiny
    inputs = encode(processor, family)
    for layer, prefill in ((1, 1), ([1, 3, 0], 1), (resolve(model).num_layers, 0)):
        with dyvte.withdraw(model, layer=layer):
            assert count_syncs(model, inputs, cache_implementation=cache) == [prefill] + [0] * STEPS, layer


# ----------------------------------------------------------------------------------------------- DeepStack
def test_static_cache_after_mixed_exits_equals_dynamic(deepstack):
    family, model, processor = deepstack
    inputs = encode(processor, family)
    ids = resolve(model).visual_ids.tolist()
    runs = []
    for kwargs in ({}, {"cache_implementation": "static"}, {"use_cache": False}):
        with dyvte.withdraw(model, layer=[1, 3, 0]), torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, suppress_tokens=ids, **kwargs)
        runs.append(out[:, -NEW_TOKENS:])
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


# --------------------------------------------------------------------------------------- linear attention
def test_static_cache_holds_linear_attention_states(hybrid):
    """Linear-attention states are fixed-size: a static cache holds them as a dynamic one does."""
    _, model, _, inputs = hybrid
    heads = random_heads(model, head_size=None)
    for context in (
        lambda: dyvte.withdraw(model, layer=2),
        lambda: dyvte.withdraw(model, layer=[1, 3, 0]),
        lambda: dyvte.withdraw(model, heads=heads, threshold=0.5),
    ):
        with context():
            dynamic = greedy(model, inputs)
            static = greedy(model, inputs, cache_implementation="static")
            again = greedy(model, inputs, cache_implementation="static")
        assert torch.equal(static, dynamic) and torch.equal(again, static)
