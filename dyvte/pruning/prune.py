"""Visual-token pruning: FasterVLM ([CLS] attention, before the LLM), FastV (inside the LLM) and a random baseline.

``dyvte.prune(model, method=...)`` is the one entry point:

* ``"fastervlm"`` (arXiv 2412.01818): each view's patches are scored by the vision encoder's attention from the
  [CLS] query at the layer whose output the MLLM reads (``vision_feature_layer``; mean over heads) and the top ones
  are kept, in their original order. Encoders without a [CLS] token fall back to the mean attention each patch
  receives (mean over queries and heads) -- a weaker score: it rewards patches every patch looks at (often
  background "sink" patches) rather than what a global summary token gathered.
* ``"random"``: a seeded random subset of the same size per view (the honest baseline).
* ``"fastv"`` (arXiv 2403.06764, ``layer=K``): see :mod:`dyvte.policies.fastv`.

FasterVLM and random prune *before* the LLM, which then sees a shorter prompt (consecutive positions, as if the
pruned placeholders had never been there). Mechanism, all hooks on the unmodified model:

* ``get_image_features`` of the base model is wrapped (an instance attribute, removed with the handle). It is the
  single entry of both paths: ``generate`` calls it before prefill, a plain forward through the pre-hook below. The
  wrapper switches on a forward pre-hook on the scoring encoder layer, which recomputes that layer's q/k from its
  own input (no eager switch, no ``output_attentions``), then drops the pruned entries from ``pooler_output`` and
  records which ones it kept on the output object.
* A forward pre-hook on the top-level model (``prepend=True``, so it runs before any withdrawal hook) drops the
  placeholders of pruned entries from ``input_ids`` and every other per-token tensor (``attention_mask``,
  ``labels``, ``token_type_ids``...), renumbers ``position_ids``, and remembers the kept columns per row; in decode
  steps it shrinks the growing 2-D ``attention_mask`` and shifts ``position_ids`` the same way, so the KV cache and
  ``generate`` stay consistent.

Views: LLaVA-1.5 has one view per image. LLaVA-NeXT packs a base view and an unpadded crop grid with one newline
token per grid row; each view (the base view, each grid crop) is pruned on its own, the packed features are pruned
per image after the model's own packing (we locate every packed entry by running the model's ``pack_image_features``
on patch indices) and newline tokens are always kept, so the row structure the newlines encode survives.

Video frames (Video-LLaVA, registry ``video_features="frames"``): ``get_video_features`` is wrapped the same way;
each frame is a view ranked by its own [CLS] attention in the video tower, and its [CLS] feature (which Video-LLaVA
feeds the LLM) stays. Other families' videos are refused under pruning; encoders without a [CLS] token are refused
at ``prune()`` (docs/design.md §2).

Budgets: ``ratio=R`` keeps ``max(1, floor((1 - R) * n + 0.5))`` of a view's ``n`` patches; ``keep=k`` keeps ``k``
of a full view's ``N`` patches, i.e. ``max(1, floor(n * k / N + 0.5))`` of an unpadded crop's ``n``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dyvte.engine.registry import unwrap
from dyvte.policies.fastv import FastV
from dyvte.pruning.before_llm import Pruning
from dyvte.pruning.registry import PRUNING_METHODS, PruningMethod, register_pruning
from dyvte.pruning.scoring import PatchScorer, PruningError, fastervlm_scores, random_scores
from dyvte.utils.syntax import ArgumentError, MethodSyntax, int_in, items, pruned_fraction

__all__ = [
    "PRUNING_METHODS",
    "PatchScorer",
    "Pruning",
    "PruningError",
    "PruningMethod",
    "prune",
    "register_pruning",
    "scorer_method",
]


def scorer_method(name: str, scorer: PatchScorer) -> PruningMethod:
    """A pruning method before the LLM that keeps the top patches of each view by ``scorer``."""

    def build(
        model: nn.Module,
        *,
        keep: int | None = None,
        ratio: float | None = None,
        layer: int | None = None,
        seed: int = 0,
    ) -> Pruning:
        if layer is not None:
            raise TypeError(f"layer= is FastV's argument; method={name!r} prunes before the LLM")
        return Pruning(model, name, keep=keep, ratio=ratio, seed=seed, scorer=scorer)

    syntax = MethodSyntax(
        form=f"{name}:R[,R...] (R the fraction of visual tokens pruned, in [0, 1))",
        short=f"{name}:R",
        parse=lambda argument, num_layers: [{"ratio": pruned_fraction(r)} for r in items(argument, "ratio R")],
        name=lambda options: f"{name} {_budget(options)}",
    )
    return PruningMethod(name, "before", build, scorer, syntax)


def _budget(options: dict[str, Any]) -> str:
    ratio_ = options.get("ratio")
    return f"R={ratio_:g}" if ratio_ is not None else f"keep={options.get('keep')}"


def prune(
    model: nn.Module,
    method: str = "fastervlm",
    *,
    keep: int | None = None,
    ratio: float | None = None,
    layer: int | None = None,
    seed: int = 0,
) -> Pruning | FastV:
    """Prune visual tokens: FasterVLM or random before the LLM, or FastV inside it.

    Usable as a context manager or kept as a handle (``handle.remove()`` restores the model). ``fastervlm`` /
    ``random`` nest with :func:`dyvte.withdraw` (either order)::

        with dyvte.prune(model, method="fastervlm", ratio=0.75), dyvte.withdraw(model, layer=16):
            out = model.generate(**inputs)

    Args:
        model: a supported transformers model (``fastervlm`` / ``random``: LLaVA-1.5, LLaVA-NeXT, LLaVA-NeXT-Video's
            images, Video-LLaVA's images and video frames; ``fastv``: every
            family of ``dyvte.supported_model_types()``).
        method: ``"fastervlm"``, ``"random"`` or ``"fastv"``.
        keep: patches kept per image view (``fastervlm`` / ``random``), in ``[1, N]``.
        ratio: fraction of visual tokens pruned, in ``[0, 1)`` (``fastv`` needs it).
        layer: FastV's layer K >= 1: tokens are ranked by layer K-1's attention and dropped from layer K on.
        seed: seed of the random subset (``random``).

    Returns:
        The :class:`Pruning` handle, or a :class:`dyvte.policies.fastv.FastV` withdrawal handle for ``fastv``.
    """
    model = unwrap(model)
    entry = PRUNING_METHODS.get(method)
    if entry is None:
        raise ValueError(f"unknown pruning method {method!r}; use one of {', '.join(sorted(PRUNING_METHODS))}")
    return entry.build(model, keep=keep, ratio=ratio, layer=layer, seed=seed)


def _fastv(
    model: nn.Module, *, keep: int | None = None, ratio: float | None = None, layer: int | None = None, seed: int = 0
) -> FastV:
    if keep is not None or ratio is None or layer is None:
        raise TypeError("method='fastv' needs layer=K and ratio=R (not keep=)")
    return FastV(model, layer=layer, ratio=ratio)


register_pruning(scorer_method("fastervlm", PatchScorer(uses_attention=True, score=fastervlm_scores)))
register_pruning(scorer_method("random", PatchScorer(uses_attention=False, score=random_scores)))


def _parse_fastv(argument: str, num_layers: int) -> list[dict[str, Any]]:
    """``fastv:K:R[,R...]`` (K in [1, L])."""
    layer, _, ratios = argument.partition(":")
    if not ratios.strip():
        raise ArgumentError("FastV needs a layer K and ratios R")
    k = int_in(layer.strip(), 1, num_layers, "layer K")
    return [{"layer": k, "ratio": pruned_fraction(r)} for r in items(ratios, "ratio R")]


FASTV_SYNTAX = MethodSyntax(
    form="fastv:K:R[,R...] (K an int in [1, L], R the fraction of visual tokens pruned, in [0, 1))",
    short="fastv:K:R",
    parse=_parse_fastv,
    name=lambda options: f"fastv K={options['layer']} {_budget(options)}",
)
register_pruning(PruningMethod("fastv", "inside", _fastv, syntax=FASTV_SYNTAX))
