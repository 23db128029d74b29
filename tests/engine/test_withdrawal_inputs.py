"""Withdrawal on unusual and bad inputs: clear errors, nothing lost, and the loss / inputs_embeds paths.

The engine's checks of its inputs (docs/robustness.md, "Models, exit layers, caches"): nested withdrawals, mismatched
placeholders, ``inputs_embeds``, masks and caches it did not produce; the exit-layer arguments are
``tests/policies/test_policies.py``'s, an unsupported model ``tests/engine/test_registry.py``'s.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import dyvte
from dyvte.engine.compat import cache_out
from dyvte.engine.registry import resolve

from ..oracle import oracle_logits, visual_mask
from ..tiny_models import make_batch, make_tiny

ROWS = [[(32, 32)], [(32, 32), (32, 32)], []]


@pytest.fixture(scope="module")
def llava():
    model, processor = make_tiny("llava")
    return model, dict(make_batch(processor, "llava", ROWS))


def test_nested_withdrawal_is_refused_and_the_first_survives(llava):
    model, inputs = llava
    with dyvte.withdraw(model, layer=1):
        with pytest.raises(dyvte.WithdrawalError, match="already has an active"):
            dyvte.withdraw(model, layer=2)
        with torch.no_grad():
            out = model(**inputs).logits
        assert out.shape[1] < inputs["input_ids"].shape[1]
    with dyvte.withdraw(model, layer=2):  # after removal a new one is fine
        pass


def test_placeholder_count_mismatch_surfaces_transformers_error(llava):
    model, inputs = llava
    broken = dict(inputs)
    ids = inputs["input_ids"].clone()
    ids[2, -1] = resolve(model).visual_ids[0]  # one placeholder more than there are image features
    broken["input_ids"] = ids
    with dyvte.withdraw(model, layer=1), pytest.raises(ValueError, match="Image features and image tokens"):
        model(**broken)


def test_inputs_embeds_need_an_explicit_visual_mask(llava):
    model, inputs = llava
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    embeds = model.get_input_embeddings()(ids)
    with dyvte.withdraw(model, layer=1), torch.no_grad():
        with pytest.raises(dyvte.WithdrawalError, match="visual_mask"):
            model(inputs_embeds=embeds, attention_mask=mask)
        with pytest.raises(dyvte.WithdrawalError, match="shape"):
            model(inputs_embeds=embeds, attention_mask=mask, visual_mask=visual_mask(model, ids)[:, 1:])
        from_embeds = model(inputs_embeds=embeds, attention_mask=mask, visual_mask=visual_mask(model, ids)).logits
        from_ids = model(input_ids=ids, attention_mask=mask).logits  # same placeholder embeddings, no pixels
    assert torch.equal(from_embeds, from_ids)


def _merged_embeds(model, inputs: dict) -> torch.Tensor:
    """The ``inputs_embeds`` the text decoder receives from ``model(**inputs)``: text embeddings with the image
    features in place of the placeholders (what a caller computing its own embeddings passes)."""
    seen = []
    hook = resolve(model).decoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return seen[0]


def test_generate_from_inputs_embeds_with_a_visual_mask_equals_generate_from_ids(llava):
    """`generate(inputs_embeds=..., visual_mask=...)`, the spelling dyvte's error suggests (was: `model_kwargs are
    not used by the model: ['visual_mask']`), gives the input_ids path's tokens and the masking oracle's logits."""
    model, inputs = llava
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    embeds, visual = _merged_embeds(model, inputs), visual_mask(model, ids)
    kwargs = {"max_new_tokens": 3, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}
    with dyvte.withdraw(model, layer=1), torch.no_grad():
        with pytest.raises(dyvte.WithdrawalError, match=r"model\.generate\(inputs_embeds=\.\.\., visual_mask=\.\.\.\)"):
            model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        from_embeds = model.generate(inputs_embeds=embeds, attention_mask=mask, visual_mask=visual, **kwargs)
        from_ids = model.generate(**inputs, **kwargs)
    assert torch.equal(from_embeds.sequences, from_ids.sequences[:, ids.shape[1] :])
    for got, want in zip(from_embeds.logits, from_ids.logits, strict=True):
        assert (got - want).abs().max() <= 1e-5
    oracle = oracle_logits(model, inputs, 1)[:, -1]  # the first new token: every layer >= 1 blind to visual keys
    assert (from_embeds.logits[0] - oracle).abs().max() <= 1e-5
    assert "generate" not in vars(model)  # the model is as before the block
    with pytest.raises(ValueError, match="visual_mask"), torch.no_grad():  # and generate refuses it again
        model.generate(inputs_embeds=embeds, attention_mask=mask, visual_mask=visual, max_new_tokens=1)


def test_foreign_cache_is_refused(llava):
    model, inputs = llava
    with torch.no_grad():
        cache = cache_out(model(**inputs, use_cache=True))  # built without withdrawal
        step = {
            "input_ids": inputs["input_ids"][:, -1:],
            resolve(model).names.cache: cache,
            "attention_mask": torch.cat([inputs["attention_mask"], inputs["attention_mask"][:, -1:]], 1),
        }
        with dyvte.withdraw(model, layer=1), pytest.raises(dyvte.WithdrawalError, match="not produced under"):
            model(**step)


def test_attention_mask_of_wrong_width_is_refused(llava):
    model, inputs = llava
    with dyvte.withdraw(model, layer=1), pytest.raises(dyvte.WithdrawalError, match="attention_mask"):
        model(**{**inputs, "attention_mask": inputs["attention_mask"][:, 1:]})


def test_loss_on_kept_positions_equals_oracle_cross_entropy(llava):
    model, inputs = llava
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -3:] = inputs["input_ids"][:, -3:]  # answer-like targets: the last three text tokens
    reference = oracle_logits(model, inputs, 2)  # (B, T, V)
    expected = torch.nn.functional.cross_entropy(reference[:, -4:-1].flatten(0, 1), labels[:, -3:].flatten())
    with dyvte.withdraw(model, layer=2), torch.no_grad():
        out = model(**inputs, labels=labels)
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)


def test_output_positions_map_back_to_the_input(llava):
    model, inputs = llava
    with dyvte.withdraw(model, layer=1) as handle, torch.no_grad():
        out = model(**inputs).logits
    positions = handle.output_positions  # (B, T_out)
    assert positions.shape == out.shape[:2]
    kept = ~visual_mask(model, inputs["input_ids"]) & inputs["attention_mask"].bool()
    for row in range(positions.shape[0]):
        real = positions[row][positions[row] >= 0]
        assert real.tolist() == kept[row].nonzero().flatten().tolist()  # in order, right-aligned
        assert positions[row, -1] == inputs["input_ids"].shape[1] - 1  # the final token is always kept


# ---------------------------------------------------------------------------------------------- the KV cache
def test_withdrawn_cache_used_after_its_handle_is_refused(llava):
    """A cache prefilled under withdraw and decoded after the `with` block says what to do (not a shape error)."""
    model, inputs = llava
    with dyvte.withdraw(model, layer=1), torch.no_grad():
        cache = cache_out(model(**inputs, use_cache=True))
    step = {
        "input_ids": inputs["input_ids"][:, -1:],
        "attention_mask": torch.cat([inputs["attention_mask"], inputs["attention_mask"][:, -1:]], 1),
        resolve(model).names.cache: cache,
    }
    with pytest.raises(dyvte.WithdrawalError, match="filled under dyvte.withdraw.*same handle"), torch.no_grad():
        model(**step)
    with torch.no_grad():  # the model itself is untouched: a fresh prefill and decode step work
        fresh = cache_out(model(**inputs, use_cache=True))
        step[resolve(model).names.cache] = fresh
        assert model(**step).logits.shape[:2] == (len(ROWS), 1)


def _continue(model, inputs: dict, generated, cache) -> dict:
    """One decode step after ``generate``: its last token, the padded batch's mask grown by the new columns."""
    mask = inputs["attention_mask"]
    grown = generated.shape[1] - inputs["input_ids"].shape[1]  # columns generate appended (the last not yet cached)
    mask = torch.cat([mask, mask.new_ones(mask.shape[0], grown)], 1)
    return {"input_ids": generated[:, -1:], "attention_mask": mask, resolve(model).names.cache: cache}


def test_every_cache_filled_in_the_block_is_refused_after_it(llava):
    """Two generate calls in one `with` block: the first one's cache, continued after the block on the padded batch,
    is refused with the same error as the last one's (was `The size of tensor a (13) must match ... (49)`); inside
    the block it is refused as an earlier sequence (the handle keeps the layout of its latest cache only)."""
    model, inputs = llava
    kwargs = {"max_new_tokens": 2, "do_sample": False, "return_dict_in_generate": True}
    with dyvte.withdraw(model, layer=1), torch.no_grad():
        first = model.generate(**inputs, **kwargs)
        second = model.generate(**inputs, **kwargs)
        with pytest.raises(dyvte.WithdrawalError, match="earlier sequence under this withdrawal handle"):
            model(**_continue(model, inputs, first.sequences, cache_out(first)))
    for out in (first, second):
        with pytest.raises(dyvte.WithdrawalError, match="filled under dyvte.withdraw.*same handle"), torch.no_grad():
            model(**_continue(model, inputs, out.sequences, cache_out(out)))
    with torch.no_grad():  # the model is untouched: without withdrawal, a fresh generate continues step by step
        fresh = model.generate(**inputs, **kwargs)
        assert model(**_continue(model, inputs, fresh.sequences, cache_out(fresh))).logits.shape[:2] == (len(ROWS), 1)


def test_the_handle_holds_its_caches_weakly(llava):
    """A cache the caller drops inside the block is freed there (the handle keeps weak references only)."""
    model, inputs = llava
    with dyvte.withdraw(model, layer=1), torch.no_grad():
        gone = weakref.ref(cache_out(model(**inputs, use_cache=True)))
        gc.collect()
        assert gone() is None


def test_full_length_cache_is_not_sealed(llava):
    """A handle that withdrew nothing (K = L) leaves an ordinary cache that decodes after the block."""
    model, inputs = llava
    with dyvte.withdraw(model, layer=resolve(model).num_layers), torch.no_grad():
        cache = cache_out(model(**inputs, use_cache=True))
    assert not getattr(cache, "_dyvte_sealed", False)


def test_a_4d_attention_mask_is_refused_naming_its_shape(llava):
    model, inputs = llava
    tokens = inputs["input_ids"].shape[1]
    mask = torch.ones(len(ROWS), 1, tokens, tokens)
    with dyvte.withdraw(model, layer=1), pytest.raises(dyvte.WithdrawalError, match=r"2-D padding.*\(3, 1, \d+, \d+\)"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], attention_mask=mask)
