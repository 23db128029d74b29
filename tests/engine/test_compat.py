"""dyvte.engine.compat: every transformers name is resolved once (on every family of the table), both cache
spellings work, unknown names fail loudly, static caches are accepted and other cache layers refused by name, and
DeepStack calls that no longer fit are named."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
import transformers
from packaging.version import Version
from torch import nn

import dyvte
from dyvte.engine.compat import (
    CACHE_NAMES,
    CompatibilityError,
    attn_implementation,
    cache_in,
    cache_out,
    call_names,
    check_cache,
    check_deepstack,
    hidden_states_of,
    logits_of,
)
from dyvte.engine.registry import resolve

from ..families import MODEL_TYPES, representatives
from ..tiny_models import make_batch, make_tiny

RENAMED_CACHE = Version("5.24.0")  # transformers 5.24 renamed past_key_values -> cache
INSTALLED = Version(transformers.__version__)
ROWS = [[(32, 32)], [(32, 32), (32, 32)]]


@pytest.fixture(scope="module")
def llava():
    model, processor = make_tiny("llava")
    return model, dict(make_batch(processor, "llava", ROWS))


@pytest.fixture(scope="module", params=representatives("deepstack"))
def deepstack(request):
    model, processor = make_tiny(request.param)
    return request.param, model, processor


def encode(processor, family: str) -> dict:
    return dict(make_batch(processor, family, [[(32, 32)], [(48, 32), (32, 32)], []]))


@pytest.mark.parametrize("family", MODEL_TYPES)
def test_names_follow_the_installed_release(family):
    model, _ = make_tiny(family)
    names = resolve(model).names
    expected = "cache" if INSTALLED >= RENAMED_CACHE else "past_key_values"
    assert names.cache == expected and names.layer_cache == expected
    assert expected in inspect.signature(model.forward).parameters


class _Layer(nn.Module):
    def forward(self, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None, cache=None):
        return hidden_states


class _Model(nn.Module):
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, kv=None):
        return input_ids


class _OldLayer(nn.Module):
    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None):
        return hidden_states


class _OldModel(nn.Module):
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, past_key_values=None):
        return input_ids


def test_unknown_cache_name_is_an_error_not_none():
    with pytest.raises(CompatibilityError, match=r"_Model.forward takes none of .*'cache', 'past_key_values'"):
        call_names(_Model(), _Layer())
    with pytest.raises(
        CompatibilityError, match=r"_OldLayer.forward takes no argument named \['position_embeddings'\]"
    ):
        call_names(_OldModel(), _OldLayer())

    class _NoEmbeds(nn.Module):
        def forward(self, input_ids=None, attention_mask=None, cache=None):
            return input_ids

    with pytest.raises(CompatibilityError, match=r"_NoEmbeds.forward takes no argument named \['inputs_embeds'\]"):
        call_names(_NoEmbeds(), _Layer())


def test_cache_in_reads_both_spellings():
    cache = object()
    for name in CACHE_NAMES:
        for given in CACHE_NAMES:
            assert cache_in({given: cache, "input_ids": 1}, name) is cache
        assert cache_in({"input_ids": 1}, name) is None


def test_cache_out_on_real_outputs(llava):
    model, inputs = llava
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        no_cache = model(**inputs, use_cache=False)
    cache = cache_out(out, resolve(model).names.cache)
    assert cache is not None and cache.get_seq_length() == inputs["input_ids"].shape[1]
    assert cache_out(no_cache) is None
    assert cache_out(out.to_tuple()) is None


def test_attn_implementation_is_read_not_guessed():
    config = transformers.LlamaConfig(num_hidden_layers=1)
    config._attn_implementation = "sdpa"
    assert attn_implementation(config) == "sdpa"

    class Bare:
        pass

    with pytest.raises(CompatibilityError, match="_attn_implementation"):
        attn_implementation(Bare())


@pytest.mark.skipif(INSTALLED < RENAMED_CACHE, reason="the deprecated spelling exists from transformers 5.24 on")
def test_deprecated_spelling_from_the_caller_still_decodes(llava):
    """A user on 5.24 who still passes ``past_key_values=`` gets the same step as with ``cache=``."""
    model, inputs = llava
    steps = []
    for name in CACHE_NAMES:
        with dyvte.withdraw(model, layer=1), torch.no_grad():
            cache = cache_out(model(**inputs, use_cache=True))
            mask = torch.cat([inputs["attention_mask"], inputs["attention_mask"][:, -1:]], 1)
            step = model(input_ids=inputs["input_ids"][:, -1:], attention_mask=mask, use_cache=True, **{name: cache})
            steps.append(step.logits)
    assert torch.equal(steps[0], steps[1])


@pytest.mark.parametrize("family", representatives("plain", "sliding_window"))
def test_static_cache_is_accepted_and_other_layers_are_refused_naming_the_cause(family):
    """Static (pre-allocated) caches work under withdrawal and pruning (each layer fills its own slots; equality
    with the dynamic cache is tests/engine/test_serving.py's); a cache of another layer kind is refused by name."""
    model, processor = make_tiny(family)
    inputs = dict(make_batch(processor, family, ROWS))
    base = model.generate(**inputs, max_new_tokens=2, do_sample=False, cache_implementation="static")
    assert base.shape[1] == inputs["input_ids"].shape[1] + 2  # static caches work without dyvte
    with dyvte.withdraw(model, layer=1):
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, cache_implementation="static")
    assert out.shape == base.shape
    assert not model._forward_pre_hooks and "create_masks_for_generate" not in vars(model)  # nothing left behind
    if family == "llava":
        with dyvte.prune(model, "random", keep=4):
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False, cache_implementation="static")
        assert out.shape == base.shape

    class QuantizedLayer:  # stands for any layer kind that cannot hold its own length
        pass

    class OddCache:
        layers = [QuantizedLayer()]

    assert "OddCache with QuantizedLayer layers cannot be used" in check_cache(OddCache())
    with dyvte.withdraw(model, layer=1):  # the default dynamic cache still works afterwards
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape == base.shape


def test_check_cache_accepts_dynamic_caches(llava):
    model, inputs = llava
    with torch.no_grad():
        cache = cache_out(model(**inputs, use_cache=True))
    assert check_cache(cache) is None
    assert "no per-layer storage" in check_cache(object())


def test_no_deprecated_transformers_name_is_read(llava, monkeypatch, recwarn):
    """dyvte's own reads never trip transformers' deprecation shims (greedy with and without cache, pruning)."""
    said: list[str] = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, msg, *a, **k: said.append(str(msg)))
    model, inputs = llava
    for use_cache in (True, False):
        with dyvte.withdraw(model, layer=1):
            model.generate(**inputs, max_new_tokens=2, do_sample=False, use_cache=use_cache)
        with dyvte.prune(model, "random", keep=4):
            model.generate(**inputs, max_new_tokens=2, do_sample=False, use_cache=use_cache)
    assert not [m for m in said if "deprecated" in m]
    assert not [w for w in recwarn if "deprecated" in str(w.message)]


def test_output_fields_are_read_through_compat_and_a_missing_one_is_named():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    logits = torch.zeros(1, 2, 3)
    out = CausalLMOutputWithPast(logits=logits)
    assert logits_of(out) is logits
    with pytest.raises(
        CompatibilityError, match=r"no 'hidden_states' \(call the model with output_hidden_states=True\)"
    ):
        hidden_states_of(out)
    states = (torch.zeros(1, 2, 4),) * 3
    assert hidden_states_of(CausalLMOutputWithPast(logits=logits, hidden_states=states)) is states


def test_deepstack_errors_are_clear(deepstack):
    family, model, processor = deepstack
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
