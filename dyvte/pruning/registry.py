"""The registry of pruning methods: ``dyvte.prune(model, method=name)`` builds the registered method ``name``.

A registration may carry a :class:`dyvte.utils.syntax.MethodSyntax`; the evaluation harness then runs the method from
method strings (``name:R``) and names its table rows. :func:`dyvte.pruning.prune.scorer_method` makes a method before
the LLM from a :class:`dyvte.pruning.scoring.PatchScorer`, with that syntax.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dyvte.pruning.scoring import PatchScorer
from dyvte.utils.syntax import MethodSyntax

__all__ = ["PRUNING_METHODS", "PruningMethod", "register_pruning"]


@dataclass(frozen=True)
class PruningMethod:
    """A registered pruning method: ``build(model, keep=, ratio=, layer=, seed=)`` returns its handle.

    ``syntax`` lets the evaluation harness run it from method strings (``name:R``) and name its table rows; methods
    before the LLM may stand left of ``+`` in a composition (``fastervlm:0.75+heads:DIR``).
    """

    name: str
    stage: str  # "before": the LLM receives a shorter prompt; "inside": an exit policy of the engine
    build: Callable[..., Any]
    scorer: PatchScorer | None = None  # methods before the LLM: how patches are scored
    syntax: MethodSyntax | None = None


PRUNING_METHODS: dict[str, PruningMethod] = {}
"""Registered pruning methods by name (``dyvte.prune(model, method=name, ...)``)."""


def register_pruning(method: PruningMethod) -> PruningMethod:
    """Register a pruning method under its name; returns it unchanged.

    Raises:
        ValueError: another method has that name.
    """
    if PRUNING_METHODS.get(method.name, method) is not method:
        raise ValueError(f"a pruning method named {method.name!r} is already registered")
    PRUNING_METHODS[method.name] = method
    return method
