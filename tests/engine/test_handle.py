"""dyvte.engine.handle: every withdrawal, exit-heads withdrawal, FastV and pruning handle satisfies the
:class:`~dyvte.engine.handle.Handle` protocol the evaluation harness reads."""

from __future__ import annotations

import pytest
import torch

import dyvte
from dyvte.engine.handle import Handle
from dyvte.policies.fastv import FastVRanking

from ..tiny_models import make_batch, make_tiny, random_heads

ROWS = [[(32, 32)], [(48, 32), (32, 32)], []]  # B = 3: one image / two images / text only (ragged, left-padded)


@pytest.fixture(scope="module")
def llava():
    model, processor = make_tiny("llava", num_layers=8)
    return model, dict(make_batch(processor, "llava", ROWS))


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
