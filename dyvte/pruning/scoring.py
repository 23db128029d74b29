"""Scoring before the LLM: how FasterVLM and the random baseline rank a view's patches, and which ones stay.

FasterVLM (arXiv 2412.01818) scores each view's patches by the vision encoder's attention from the [CLS] query at
the layer whose output the MLLM reads (``vision_feature_layer``; mean over heads), recomputed from that layer's input
(no eager switch, no ``output_attentions``). Encoders without a [CLS] token fall back to the mean attention each
patch receives (mean over queries and heads) -- a weaker score: it rewards patches every patch looks at (often
background "sink" patches) rather than what a global summary token gathered. The random baseline draws seeded
scores. The top entries of each view stay, in their original order.

Budgets: ``ratio=R`` keeps ``max(1, floor((1 - R) * n + 0.5))`` of a view's ``n`` patches; ``keep=k`` keeps ``k``
of a full view's ``N`` patches, i.e. ``max(1, floor(n * k / N + 0.5))`` of an unpadded crop's ``n``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dyvte.engine.registry import FEATURE_LAYOUTS, REGISTRY, VisionNames, _get_path
from dyvte.policies.fastv import kept_count

__all__ = [
    "KEPT_ATTR",
    "Modality",
    "PatchScorer",
    "PruningError",
    "check_budget",
    "fastervlm_scores",
    "keep_mask",
    "random_scores",
    "refusal",
    "supported_types",
    "token_id",
    "vision_attention",
]

VISION_NAMES = VisionNames()
KEPT_ATTR = "_dyvte_kept"  # set on get_image_features' output: per image, (n_i,) bool kept entries


class PruningError(RuntimeError):
    """Pruning cannot proceed on these inputs or this state (the message says why)."""


def supported_types() -> list[str]:
    """The model types whose image features can be pruned before the LLM."""
    return sorted(t for t, f in REGISTRY.items() if f.image_features is not None)


@dataclass(frozen=True)
class PatchScorer:
    """How a pruning method before the LLM scores the vision encoder's tokens; the top ones of each view stay.

    Attributes:
        uses_attention: the scores need the attention of the encoder layer the MLLM reads (recomputed from that
            layer's input by a pre-hook; FasterVLM's [CLS] attention, or the mean attention without a [CLS] token).
        score: ``score(attention, total, seed) -> (total,)`` float64 scores over the flat encoder tokens
            (``view * S + token``) of one ``get_image_features`` call; ``attention`` is ``(total,)`` float32 when
            ``uses_attention``, else ``None``.
    """

    uses_attention: bool
    score: Callable[[torch.Tensor | None, int, int], torch.Tensor]


class Modality:
    """One kind of visual input a pruning handle prunes: images, or video frames.

    Attributes:
        key: ``"image"`` / ``"video"`` (the ``mm_encoder_outputs`` key, and ``get_<key>_features``).
        token_id: its placeholder id in ``input_ids``.
        layout: the family's :data:`dyvte.engine.registry.FEATURE_LAYOUTS` entry for it.
        offset: feature entry ``p`` of a view is encoder token ``p + offset`` (for the ``"views"`` layout).
        original / signature: the base model's unwrapped feature method; wrapper: the handle's wrapper of it.
    """

    def __init__(self, key: str, token_id: int, layout: str, offset: int, base: nn.Module) -> None:
        self.key, self.token_id, self.offset = key, int(token_id), offset
        self.layout = FEATURE_LAYOUTS[layout]
        self.getter = f"get_{key}_features"
        self.original = getattr(base, self.getter)
        self.signature = inspect.signature(self.original)
        self.wrapper: Callable[..., Any] | None = None


def token_id(config: Any, key: str) -> int:
    """The placeholder id of ``key`` (``"image"`` / ``"video"``) in a multimodal config."""
    value = getattr(config, f"{key}_token_id", None)
    return int(value if value is not None else getattr(config, f"{key}_token_index"))


def refusal(model: nn.Module, family: Any) -> str:
    """Why a family without a feature layout cannot be pruned before the LLM (its encoder's [CLS], if it lacks one)."""
    tower = _get_path(model, family.vision_path)
    names = family.vision
    vision = getattr(tower, names.inner, tower)
    if getattr(getattr(vision, "embeddings", None), names.class_embedding, None) is None:
        return (
            f"its vision encoder ({type(vision).__name__}) has no [CLS] token, whose attention FasterVLM ranks "
            "patches by"
        )
    return "its image features are not laid out as patches of views dyvte can prune"


def vision_attention(
    layer: nn.Module, hidden: torch.Tensor, cls: bool, names: VisionNames = VISION_NAMES
) -> torch.Tensor:
    """Attention scores of one CLIP/SigLIP-style encoder layer, recomputed from its input.

    Args:
        layer: the encoder layer (``layer_norm1``, ``self_attn`` with ``q_proj`` / ``k_proj``).
        hidden: ``(V, S, D)`` the layer's input hidden states, one row per view.
        cls: score by the [CLS] (first) query's attention; otherwise by the mean attention each key receives.

    Returns:
        ``(V, S)`` float32: per key, the mean over heads (and, without [CLS], over queries).
    """
    attn = getattr(layer, names.attention)
    views, length, _ = hidden.shape
    heads, head_dim = getattr(attn, names.heads), getattr(attn, names.head_dim)
    scale = getattr(attn, names.scale, None) or attn.scaling
    x = getattr(layer, names.norm)(hidden)
    k = getattr(attn, names.key)(x).view(views, length, heads, head_dim).transpose(1, 2)  # (V, H, S, hd)
    q = getattr(attn, names.query)(x[:, :1] if cls else x).view(views, -1, heads, head_dim).transpose(1, 2)
    probs = ((q @ k.transpose(-1, -2)).float() * scale).softmax(-1)  # (V, H, Q, S), Q = 1 or S
    return probs.mean(dim=(1, 2))


def check_budget(keep: int | None, ratio: float | None, view_tokens: int) -> tuple[int | None, float | None]:
    """The budget ``(keep, ratio)`` after checking that exactly one is given and in range."""
    if (keep is None) == (ratio is None):
        raise TypeError("pass exactly one of keep= (tokens kept per view) or ratio= (fraction pruned)")
    if keep is not None:
        if isinstance(keep, bool) or not isinstance(keep, int):
            raise TypeError(f"keep must be an int, got {keep!r}")
        if not 1 <= keep <= view_tokens:
            raise ValueError(f"keep={keep} is out of range: each image view has {view_tokens} tokens, keep 1..that")
        return keep, None
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio (the fraction pruned) must be in [0, 1), got {ratio!r}")
    return None, float(ratio)


def keep_mask(
    sources: torch.Tensor, scores: torch.Tensor, seq_len: int, keep: int | None, ratio: float | None, view_tokens: int
) -> torch.Tensor:
    """``(n,)`` bool: the top entries of each view of one image by ``scores``; newline entries (-1) stay.

    Args:
        sources: ``(n,)`` the flat encoder-token index (view * S + token) of each feature entry, -1 for entries that
            always stay (LLaVA-NeXT's newlines).
        scores: ``(V * S,)`` the scorer's scores of the encoder tokens.
        seq_len: S, encoder tokens per view.
        keep / ratio: the budget (one of them): patches kept per full view, or the fraction pruned.
        view_tokens: N, feature entries of a full view.
    """
    kept = sources < 0
    views = torch.where(kept, -1, sources // seq_len)
    for view in views.unique().tolist():
        if view < 0:
            continue
        members = (views == view).nonzero().flatten()  # (n_v,) entries of this view, in order
        count = members.numel()
        if keep is not None:
            budget = max(1, min(count, (2 * count * keep + view_tokens) // (2 * view_tokens)))
        else:
            budget = int(kept_count(torch.tensor(count), ratio))
        view_scores = scores[sources[members]].to(torch.float64)
        top = view_scores.argsort(descending=True, stable=True)[:budget]
        kept[members[top]] = True
    return kept


def fastervlm_scores(attention: torch.Tensor | None, total: int, seed: int) -> torch.Tensor:
    """FasterVLM: the [CLS] attention (the mean attention without a [CLS] token), as float64 scores."""
    return attention.to(torch.float64)  # the [CLS] attention (the mean attention without a [CLS] token)


def random_scores(attention: torch.Tensor | None, total: int, seed: int) -> torch.Tensor:
    """The random baseline: seeded uniform scores."""
    return torch.rand(max(total, 1), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
