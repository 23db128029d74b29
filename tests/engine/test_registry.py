"""dyvte.engine.registry: the families it knows, the one table of families the tests know, and what an entry's fields
make the engine do (visual placeholder ids, linear-attention layers, DeepStack).

The test families are ``tests/families.py``'s: a family is its registry entry plus one entry in that table, and
:func:`test_the_families_table_covers_exactly_the_supported_families` keeps the two the same.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dyvte
from dyvte.engine import registry
from dyvte.engine.registry import resolve

from ..families import MECHANISMS, MODEL_TYPES, OTHER_TAGS, TABLE, family, representative, representatives, with_tag
from ..tiny_models import make_batch, make_tiny

ROWS = [[(32, 32)], [(48, 32), (32, 32)], []]


def encode(processor, family: str) -> dict:
    return dict(make_batch(processor, family, ROWS))


@pytest.fixture(scope="module")
def tiny():
    return make_tiny("llava")


@pytest.fixture(scope="module", params=with_tag("linear_attention"))
def hybrid(request):
    model, processor = make_tiny(request.param)
    return request.param, model, processor, encode(processor, request.param)


@pytest.fixture(scope="module", params=representatives("deepstack"))
def deepstack(request):
    model, processor = make_tiny(request.param)
    return request.param, model, processor


def test_the_families_table_covers_exactly_the_supported_families():
    """A family added to the registry needs its one entry in tests/families.py (and nothing else in the tests)."""
    assert sorted(MODEL_TYPES) == dyvte.supported_model_types() == sorted(registry.REGISTRY)
    assert len(set(MODEL_TYPES)) == len(TABLE)
    for entry in TABLE:
        assert family(entry.model_type) is entry
        assert entry.tags and entry.tags <= set(MECHANISMS) | OTHER_TAGS, entry.model_type
        assert (entry.prune_refusal is None) == (registry.REGISTRY[entry.model_type].image_features is not None)
    assert sorted(representative(m) for m in MECHANISMS) == sorted(f for f in MODEL_TYPES if family(f).represents)
    assert representatives() == [f for f in MODEL_TYPES if family(f).represents]  # one each, in table order
    for mechanism in MECHANISMS:  # a representative carries the mechanism it stands for
        assert mechanism in family(representative(mechanism)).tags
    assert with_tag("deepstack") == [f for f in MODEL_TYPES if registry.REGISTRY[f].deepstack]
    with pytest.raises(ValueError, match="unknown family 'nope'"):
        family("nope")


def test_unsupported_model_names_the_supported_families():
    model = LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=50)
    )
    with pytest.raises(dyvte.UnsupportedModelError, match="llava, llava_next.*qwen2_vl"):
        dyvte.withdraw(model, layer=1)
    assert not model._forward_pre_hooks


def test_model_without_visual_token_id_is_refused(tiny):
    model, _ = tiny
    old = model.config.image_token_id
    model.config.image_token_id = None
    try:
        with pytest.raises(dyvte.UnsupportedModelError, match="image_token_id"):
            dyvte.withdraw(model, layer=1)
    finally:
        model.config.image_token_id = old


def test_the_tiny_models_are_hybrid(hybrid):
    _, model, _, _ = hybrid
    spec = resolve(model)
    assert spec.linear_attention == [True, True, True, False]  # the 3:1 pattern of the real models
    assert spec.family.gated_query


def test_without_deepstack_handling_an_early_exit_breaks(deepstack, monkeypatch):
    """The model adds its features through a (B, T) mask: after an exit inside the DeepStack range the hidden states
    are shorter and its own injection fails. The registry's ``deepstack`` flag is what makes the engine apply them."""
    family, model, processor = deepstack
    inputs = encode(processor, family)
    plain = dataclasses.replace(registry.REGISTRY[family], deepstack=False)
    monkeypatch.setitem(registry.REGISTRY, family, plain)
    with dyvte.withdraw(model, layer=1), torch.no_grad(), pytest.raises((RuntimeError, IndexError)):
        model(**inputs)
