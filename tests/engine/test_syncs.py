"""Engine v2 (docs/design.md §4-§5): host syncs per call, static cache = dynamic cache, in-place layouts, new policies.

Host syncs are counted by :class:`dyvte.engine.syncs.SyncCounter` (a ``TorchFunctionMode``): every call of a reading
function (``item``, ``tolist``, ``__bool__``, ``cpu``, ``nonzero``, ...), boolean-mask indexing, and every
host-to-device copy whose innermost caller outside torch is the ``dyvte`` package, i.e. dyvte itself (hooks,
policies, FastV's ranking) and not transformers or ``generate``.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version

import dyvte
from dyvte.engine.handle import Handle
from dyvte.engine.policy import POLICIES, ExitPolicy, register_policy
from dyvte.engine.registry import resolve
from dyvte.engine.syncs import SyncCounter
from dyvte.policies.fastv import FastVRanking
from dyvte.pruning.prune import PRUNING_METHODS, PatchScorer, register_pruning, scorer_method

from .tiny_models import make_batch, make_tiny, random_heads

ROWS = [[(32, 32)], [(48, 32), (32, 32)], []]  # B = 3: one image / two images / text only (ragged, left-padded)
NUM_LAYERS = 8
STEPS = 4  # decode steps after the prefill


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


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
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
            for key, group in handle._layouts.items():
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


# ------------------------------------------------------------------------------------------------- extension
class EveryRowAtTheMiddle(ExitPolicy):
    """A new policy in one class: every row leaves at layer L // 2 (planned on the host)."""

    def planned_exits(self, state):
        return [self.spec.num_layers // 2] * state.batch

    def earliest_exit(self) -> int:
        return self.spec.num_layers // 2


class LeaveWhenImagesAreLong(ExitPolicy):
    """A run-time policy: a row leaves at ``layer`` if it holds more than ``tokens`` visual tokens."""

    def __init__(self, layer: int, tokens: int) -> None:
        self.at, self.tokens = layer, tokens

    def decide(self, layer, hidden, state):
        return (state.visual & state.valid).sum(1) > self.tokens if layer == self.at else state.valid[:, 0] & False


def test_a_new_policy_is_one_class_and_one_registration(llava):
    model, inputs = llava
    register_policy("middle", lambda model: EveryRowAtTheMiddle())
    register_policy("long_images", lambda model, at, tokens: LeaveWhenImagesAreLong(at, tokens))
    try:
        with dyvte.withdraw(model, layer=NUM_LAYERS // 2), torch.no_grad():
            reference = model(**inputs).logits
        with dyvte.withdraw(model, policy="middle") as handle, torch.no_grad():
            assert torch.equal(model(**inputs).logits, reference)
        assert handle.exit_layers.tolist() == [NUM_LAYERS // 2] * 3
        with dyvte.withdraw(model, policy="long_images", at=2, tokens=20) as handle, torch.no_grad():
            model(**inputs)
        assert handle.exit_layers.tolist() == [NUM_LAYERS, 2, NUM_LAYERS]  # only row 1 has two images (32 tokens)
        with dyvte.withdraw(model, policy=EveryRowAtTheMiddle()) as handle, torch.no_grad():  # or an instance
            assert torch.equal(model(**inputs).logits, reference)
    finally:
        POLICIES.pop("middle")
        POLICIES.pop("long_images")
    with pytest.raises(ValueError, match="unknown exit policy 'middle'"):
        dyvte.withdraw(model, policy="middle")
    with pytest.raises(TypeError, match="options go with policy"):
        dyvte.withdraw(model, layer=1, tokens=3)


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


def test_every_handle_satisfies_the_handle_protocol(llava):
    model, inputs = llava
    contexts = [
        lambda: dyvte.withdraw(model, layer=2),
        lambda: dyvte.withdraw(model, heads=random_heads(model)),
        lambda: dyvte.prune(model, "fastv", layer=2, ratio=0.5),
        lambda: dyvte.prune(model, "random", keep=4),
    ]
    for context in contexts:
        with context() as handle, torch.no_grad():
            model(**inputs)
        assert isinstance(handle, Handle)
        assert (handle.exit_layers is None) == isinstance(handle, dyvte.Pruning)
        assert (handle.fed_tokens is None) != isinstance(handle, dyvte.Pruning)
        fastv = isinstance(getattr(handle, "policy", None), FastVRanking)
        assert (handle.visual_after is None) != fastv
