"""The five invariants of docs/design.md §5 for static withdrawal, on tiny random models of every supported family.

Every family of ``tests/families.py`` (:data:`MODEL_TYPES`): never withdrawing is the unmodified model, withdrawal at
every K equals the masking oracle (the compacted one on linear-attention layers), ``generate`` with the cache equals
``generate`` without it, a left-padded ragged batch equals its rows alone (one K, and a K per row), ``remove()``
restores the model, and the prefill's cache holds what ``prefill_kv_bytes`` says; seeded sampling with the cache
equals sampling without it, and in bf16 K = L is the unmodified model and greedy decoding with the cache equals it
without (docs/guide.md, "Guarantees": cache invariants run on every family).

What the engine does for one mechanism, on its representative: DeepStack (the features it adds reach the logits,
M-RoPE tables follow the kept tokens, ``remove()`` takes its hooks away) and linear attention (the compacted oracle
is not the masking one; the recurrent states after a withdrawn prefill are those of the kept sequence).
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import dyvte
from dyvte.engine.compat import cache_out
from dyvte.engine.registry import resolve
from dyvte.eval.benchmark import kv_cache_bytes

from ..families import MODEL_TYPES, representatives
from ..oracle import check_layers_equal_rows_alone, compacted_oracle_logits, oracle_logits, visual_mask
from ..tiny_models import QWEN3_DEEPSTACK, greedy, make_batch, make_tiny

ROWS = [[(32, 32)], [(48, 32), (32, 32)], []]  # one image / two images of different sizes / text only
NEW_TOKENS = 4
TOL = 2e-6  # fp32; measured max |diff| ~1e-7 (different GEMM shapes round differently)


def encode(processor, family: str, rows, only: int | None = None) -> dict:
    """The left-padded batch of ``rows``, or row ``only`` of it alone, from the family's real processor."""
    if only is None:
        return dict(make_batch(processor, family, rows))
    return dict(make_batch(processor, family, [rows[only]], row_ids=[only]))


@pytest.fixture(scope="module", params=MODEL_TYPES)
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
    return request.param, model, processor, encode(processor, request.param, ROWS)


def test_rows_are_ragged(tiny):
    family, model, processor = tiny
    inputs = encode(processor, family, ROWS)
    counts = visual_mask(model, inputs["input_ids"]).sum(1).tolist()
    assert counts[2] == 0 and counts[0] > 0 and counts[1] > 0 and counts[1] != counts[0]
    assert (inputs["attention_mask"] == 0).any()  # left padding present


def test_never_withdraw_is_identity(tiny):
    family, model, processor = tiny
    inputs = encode(processor, family, ROWS)
    with torch.no_grad():
        base = model(**inputs).logits
    base_tokens = greedy(model, inputs)
    with dyvte.withdraw(model, layer=resolve(model).num_layers) as handle, torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)
        assert torch.equal(greedy(model, inputs), base_tokens)
        assert handle.output_positions is None


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_withdrawal_equals_masking_oracle(tiny, attn):
    family, _, processor = tiny
    model, _ = make_tiny(family, attn=attn)
    inputs = encode(processor, family, ROWS)
    kept = ~visual_mask(model, inputs["input_ids"]) & inputs["attention_mask"].bool()  # (B, T)
    # a recurrent (linear-attention) layer cannot "not attend" to a token: on such a model withdrawal is defined by
    # the compacted oracle (layers >= K run on the kept tokens alone; docs/design.md, "Withdrawal on
    # linear-attention layers (Qwen3.5)")
    oracle = compacted_oracle_logits if any(resolve(model).linear_attention) else oracle_logits
    for layer in range(resolve(model).num_layers):
        reference = oracle(model, inputs, layer)
        with dyvte.withdraw(model, layer=layer) as handle, torch.no_grad():
            out = model(**inputs).logits  # (B, T_kept, V)
            mapped = handle.to_input_positions(out, float("nan"))
        assert out.shape[1] < inputs["input_ids"].shape[1]
        assert not mapped[kept].isnan().any(), "a kept text position has no output"
        diff = (mapped[kept] - reference[kept]).abs().max().item()
        assert diff <= TOL, f"{family}/{attn} K={layer}: max |withdrawn - oracle| = {diff:.2e}"


@pytest.mark.parametrize("layer", [0, 2])
def test_generate_with_cache_equals_without(tiny, layer):
    family, model, processor = tiny
    inputs = encode(processor, family, ROWS)
    with dyvte.withdraw(model, layer=layer):
        cached = greedy(model, inputs, use_cache=True)
        uncached = greedy(model, inputs, use_cache=False)
    assert torch.equal(cached, uncached)


def test_ragged_batch_equals_rows_alone(tiny):
    family, model, processor = tiny
    inputs = encode(processor, family, ROWS)
    with dyvte.withdraw(model, layer=2) as handle:
        with torch.no_grad():
            last = model(**inputs).logits[:, -1]  # (B, V) next-token logits
        batch_tokens = greedy(model, inputs)
        assert handle.exit_layers.tolist() == [2, 2, 2]
        for row in range(len(ROWS)):
            alone = encode(processor, family, ROWS, only=row)
            with torch.no_grad():
                torch.testing.assert_close(model(**alone).logits[:, -1], last[row : row + 1], atol=1e-5, rtol=1e-5)
            assert torch.equal(greedy(model, alone), batch_tokens[row : row + 1]), f"{family}: row {row} differs"


def test_remove_restores_the_model(tiny):
    family, model, processor = tiny
    inputs = encode(processor, family, ROWS)
    spec = resolve(model)
    with torch.no_grad():
        base = model(**inputs).logits
    handle = dyvte.withdraw(model, layer=1)
    with torch.no_grad():
        assert model(**inputs).logits.shape != base.shape
    handle.remove()
    handle.remove()  # idempotent
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert all(not layer._forward_pre_hooks for layer in spec.layers)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)


def test_sampling_with_cache_equals_without(tiny):
    """Seeded sampling (fp32): the KV cache under withdrawal changes no sampled token."""
    family, model, processor = tiny
    inputs = encode(processor, family, ROWS)
    ids = resolve(model).visual_ids.tolist()
    runs = []
    with dyvte.withdraw(model, layer=2):
        for use_cache in (True, False):
            torch.manual_seed(0)
            kwargs = {"do_sample": True, "top_k": 20, "suppress_tokens": ids, "use_cache": use_cache}
            runs.append(model.generate(**inputs, max_new_tokens=NEW_TOKENS, **kwargs)[:, -NEW_TOKENS:])
    assert torch.equal(*runs)


def greedy_logits(model, inputs, use_cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens ``(B, N)`` and the raw logits of every step ``(B, N, V)`` (visual ids at -inf, as suppressed)."""
    ids = resolve(model).visual_ids.tolist()
    out = model.generate(
        **inputs,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        suppress_tokens=ids,
        use_cache=use_cache,
        output_logits=True,
        return_dict_in_generate=True,
    )
    logits = torch.stack(out.logits, 1).float()
    logits[..., ids] = float("-inf")
    return out.sequences[:, -NEW_TOKENS:], logits


@pytest.mark.parametrize("family", MODEL_TYPES)
def test_bf16_identity_and_greedy_cache(family):
    """bf16: K = L is the unmodified model bit for bit; greedy with the KV cache equals greedy without it up to bf16
    rounding: the two runs' logits agree within 2 bf16 ulps at every step of their common prefix, and where their
    tokens part, the step was a near-tie within that rounding.

    (Tokens are not compared bit for bit: on CPUs with AMX-BF16 kernels the unhooked tiny smolvlm's own cached and
    uncached greedy runs already part at a near-tie, so no withdrawal can promise more. Seeded *sampling* in bf16 is
    not compared either: the unhooked tiny idefics3's cached and uncached runs already differ.)
    """
    model, processor = make_tiny(family, dtype=torch.bfloat16)
    inputs = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in encode(processor, family, ROWS).items()
    }
    with torch.no_grad():
        base = model(**inputs).logits
    with dyvte.withdraw(model, layer=resolve(model).num_layers), torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)
    with dyvte.withdraw(model, layer=2), torch.no_grad():
        cached, cached_logits = greedy_logits(model, inputs, use_cache=True)
        plain, plain_logits = greedy_logits(model, inputs, use_cache=False)
    finite = torch.isfinite(cached_logits)
    ulp = 2.0 ** (torch.floor(torch.log2(cached_logits[finite].abs().max())) - 7)  # bf16: 8 significant bits
    for row in range(cached.shape[0]):
        parted = (cached[row] != plain[row]).nonzero()
        common = int(parted[0]) + 1 if len(parted) else NEW_TOKENS  # steps fed the same prefix
        torch.testing.assert_close(
            cached_logits[row, :common], plain_logits[row, :common], atol=float(2 * ulp), rtol=0.0
        )
        if len(parted):  # a near-tie: each run's choice scores within rounding of the other's in both runs
            step, a, b = common - 1, cached[row, common - 1], plain[row, common - 1]
            for logits in (cached_logits[row, step], plain_logits[row, step]):
                assert abs(float(logits[a] - logits[b])) <= 2 * ulp, (family, row, step)


def test_per_row_exit_layers_equal_rows_alone(tiny):
    family, model, processor = tiny
    inputs = encode(processor, family, ROWS)

    def alone(row: int) -> dict:
        return encode(processor, family, ROWS, only=row)

    check_layers_equal_rows_alone(model, inputs, alone, [1, 3, 0], greedy)  # every row leaves at its own layer
    with dyvte.withdraw(model, layer=[1, 2]), pytest.raises(dyvte.WithdrawalError, match="2 rows"):
        model(**inputs)


def test_kv_cache_bytes_equal_the_formula(tiny):
    """A real cache after prefill holds exactly what ``prefill_kv_bytes`` says, for every exit layer."""
    family, model, processor = tiny
    inputs = encode(processor, family, ROWS, only=1)  # two images, no padding
    tokens = int(inputs["attention_mask"].sum())
    visual = int(visual_mask(model, inputs["input_ids"]).sum())
    num_layers = resolve(model).num_layers
    for layer in sorted({0, 1, num_layers // 2, num_layers}):
        with dyvte.withdraw(model, layer=layer), torch.no_grad():
            cache = cache_out(model(**inputs, use_cache=True))
        expected = dyvte.prefill_kv_bytes(model.config, tokens, visual, layer, bytes_per_value=4)
        assert kv_cache_bytes(cache) == expected, (family, layer)
    assert dyvte.prefill_kv_bytes(model.config, tokens, visual, 0) < expected  # withdrawal saves memory


# ----------------------------------------------------------------------------------------------- DeepStack
def zero_deepstack(model):
    """Pre-hook on the text decoder that zeroes the DeepStack features (undo with ``.remove()``)."""

    def hook(module, args, kwargs):
        embeds = kwargs.get("deepstack_visual_embeds")
        if embeds is None:
            return None
        return args, {**kwargs, "deepstack_visual_embeds": [torch.zeros_like(e) for e in embeds]}

    return resolve(model).decoder.register_forward_pre_hook(hook, with_kwargs=True)


def test_deepstack_reaches_the_text_logits(deepstack):
    """Zeroing the DeepStack features changes the text logits of the oracle at K = len(DeepStack) (every injection
    lands before the exit) and of the withdrawn run alike, so a lost or misplaced injection fails the oracle test."""
    family, model, processor = deepstack
    inputs = encode(processor, family, ROWS)
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


def test_mrope_tables_are_the_kept_tokens_original_ones(deepstack):
    """Layers >= K get the rows of the full run's (cos, sin) at each kept token's original column: 3-D positions of
    the visual tokens are not renumbered (renumbering would give other tables)."""
    family, model, processor = deepstack
    inputs = encode(processor, family, ROWS)
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


def test_remove_takes_the_deepstack_hooks_away(deepstack):
    family, model, processor = deepstack
    spec = resolve(model)
    assert spec.deepstack_layers == len(QWEN3_DEEPSTACK) < spec.num_layers
    with dyvte.withdraw(model, layer=1):  # the add-back hooks sit only on the layers features are added after
        assert spec.decoder._forward_pre_hooks
        assert [bool(layer._forward_hooks) for layer in spec.layers] == [
            index < len(QWEN3_DEEPSTACK) for index in range(spec.num_layers)
        ]
    assert not spec.decoder._forward_pre_hooks
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in spec.layers)


# --------------------------------------------------------------------------------------- linear attention
def test_compacted_is_not_the_masking_oracle(hybrid):
    """On recurrent layers the definition matters: keys hidden from attention are not tokens removed from the
    recurrence, so the masking oracle (which the other families use) differs from the compacted one."""
    _, model, _, inputs = hybrid
    kept = ~visual_mask(model, inputs["input_ids"]) & inputs["attention_mask"].bool()
    compacted = compacted_oracle_logits(model, inputs, 1)
    with dyvte.withdraw(model, layer=1) as handle, torch.no_grad():
        withdrawn = handle.to_input_positions(model(**inputs).logits, float("nan"))
    assert (withdrawn[kept] - compacted[kept]).abs().max() <= TOL
    assert (oracle_logits(model, inputs, 1)[kept] - compacted[kept]).abs().max() > 1e-3


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_recurrent_states_after_prefill_are_those_of_the_kept_sequence(hybrid, layer):
    """Every linear layer >= K caches the conv and recurrent state of the row's kept tokens alone (left padding
    leaves them untouched), and every full-attention layer >= K the keys of the kept tokens."""
    _, model, _, inputs = hybrid
    spec = resolve(model)
    with dyvte.withdraw(model, layer=layer), torch.no_grad():
        cache = cache_out(model(**inputs, use_cache=True))
    rows = [DynamicCache(config=model.config) for _ in ROWS]
    compacted_oracle_logits(model, inputs, layer, caches=rows)
    for index in range(layer, spec.num_layers):
        got, want = cache.layers[index], [row.layers[index] for row in rows]
        if spec.linear_attention[index]:
            for name in ("conv_states", "recurrent_states"):
                for row, alone in enumerate(want):
                    torch.testing.assert_close(
                        getattr(got, name)[0][row], getattr(alone, name)[0][0], atol=1e-6, rtol=0
                    )
        else:
            for row, alone in enumerate(want):
                width = alone.keys.shape[2]  # right-aligned: the row's kept keys are the last slots
                torch.testing.assert_close(got.keys[row, :, -width:], alone.keys[0], atol=1e-6, rtol=0)
