"""FastV (arXiv 2403.06764): at layer K keep only the visual tokens the last prompt token attended to most at K-1.

An exit policy of the engine (:mod:`dyvte.engine.withdrawal`): every row leaves at K (planned on the host), and its
droppable
set is narrowed to the low-ranked visual tokens, so the engine does the dropping (kept tokens keep their original
rotary positions; masks and KV cache of layers >= K hold the kept tokens only, for every family). The ranking is
computed in a forward pre-hook on layer K-1 from that layer's own input: ``input_layernorm``, ``q_proj`` for the
row's last token, ``k_proj`` for every token, ``q_norm`` / ``k_norm`` when the attention has them, the rotary
``position_embeddings`` the layer receives (rotate-half or GLM's interleaved pairs, on the first ``cos.shape[-1]``
channels: partial rotary), the layer's scaling (and logit soft-capping), softmax over the causal,
valid keys (inside the layer's sliding window when it has one), then the mean over heads. This is one query row per
sample, so SDPA keeps running in every layer.

Without a KV cache ``generate`` feeds prompt + generated tokens as a new sequence at every step; FastV ranks by the
last *prompt* token, so a cache-less call (``use_cache=False``) whose ``input_ids`` extend those of the previous
ranked call (same rows, same prefix) reuses that ranking: the result equals generation with the cache. Calls with a
cache always rank anew (a multi-turn prompt that extends an earlier one is ranked by its own last token).
Recomputing would give the same scores: the prefix's states do not depend on later tokens.

Rounding: a row with ``n`` visual tokens keeps ``max(1, floor((1 - R) * n + 0.5))`` of them (round half up, at
least one); a row without visual tokens keeps nothing to prune.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dyvte.engine.compat import HIDDEN_STATES, POSITION_EMBEDDINGS, USE_CACHE
from dyvte.engine.policy import ExitPolicy, PolicyView, register_policy
from dyvte.engine.registry import AttentionNames, ModelSpec, UnsupportedModelError
from dyvte.engine.withdrawal import Withdrawal, WithdrawalError, active_withdrawal
from dyvte.utils.threads import PerThread

DEFAULT_NAMES = AttentionNames()

__all__ = ["FastV", "FastVRanking", "kept_count", "last_token_attention"]


def kept_count(num: torch.Tensor, ratio: float) -> torch.Tensor:
    """Tokens kept out of ``num`` when a fraction ``ratio`` is pruned: round half up, at least 1 (0 if ``num`` is 0).

    Args:
        num: token counts, any shape, integer.
        ratio: fraction pruned, in ``[0, 1)``.

    Returns:
        The kept counts, same shape, long.
    """
    num = torch.as_tensor(num, dtype=torch.long)
    kept = torch.floor(num.double() * (1.0 - ratio) + 0.5).long()
    return torch.minimum(kept.clamp(min=1), num)


def _kept_on_host(num: int, ratio: float) -> int:
    """:func:`kept_count` of one host int (the same double arithmetic, no tensor)."""
    return min(max(1, math.floor(num * (1.0 - ratio) + 0.5)), num)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """GLM's interleaved rotation: each pair ``(x0, x1)`` becomes ``(-x1, x0)``."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


_ROTATIONS = {"half": _rotate_half, "interleaved": _rotate_pairs}


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``x`` (partial rotary leaves the rest as they are)."""
    width = cos.shape[-1]
    rotated, rest = x[..., :width], x[..., width:]
    rotated = rotated * cos + _ROTATIONS[style](rotated) * sin
    return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated


def last_token_attention(
    layer: nn.Module,
    hidden: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
    allowed: torch.Tensor,
    query: torch.Tensor | None = None,
    names: AttentionNames = DEFAULT_NAMES,
    gated_query: bool = False,
) -> torch.Tensor:
    """Attention the last token (or each row's ``query`` slot) pays every token in one decoder layer, mean over heads.

    Args:
        layer: an HF decoder layer (its pieces named by ``names``: by default ``input_layernorm`` and ``self_attn``
            with ``q_proj`` / ``k_proj``; the family's names are in :data:`dyvte.engine.registry.REGISTRY`).
        hidden: ``(B, T, D)`` the layer's input hidden states.
        rotary: the layer's ``position_embeddings`` ``(cos, sin)``, each ``(B or 1, T, head_dim)``.
        allowed: ``(B, T)`` bool, keys the query token may attend to.
        query: ``(B,)`` slot of each row's query token (default: the last slot).
        names: the family's attention names.
        gated_query: ``q_proj`` outputs, per head, the query then an output gate (Qwen3.5): only the query is used.

    Returns:
        ``(B, T)`` float32 attention probabilities (0 on disallowed keys).
    """
    attn = getattr(layer, names.attention)
    batch, num_tokens, _ = hidden.shape
    head_dim = getattr(attn, names.head_dim)
    x = getattr(layer, names.norm)(hidden)
    if query is None:
        query = torch.full((batch,), num_tokens - 1, dtype=torch.long, device=hidden.device)
    rows = torch.arange(batch, device=hidden.device)
    q_proj, k_proj = getattr(attn, names.query), getattr(attn, names.key)
    q = q_proj(x[rows, query][:, None])  # (B, 1, H * hd), or (B, 1, H * 2 hd) with the output gate
    if gated_query:
        q = q.view(batch, 1, -1, 2 * head_dim)[..., :head_dim]  # each head's query, without its gate
    q = q.reshape(batch, 1, -1, head_dim).transpose(1, 2)  # (B, H, 1, hd)
    k = k_proj(x).view(batch, num_tokens, -1, head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
    if getattr(attn, names.query_norm, None) is not None:
        q, k = getattr(attn, names.query_norm)(q), getattr(attn, names.key_norm)(k)
    cos, sin = (t[:, None] for t in rotary)  # (B or 1, 1, T, hd)
    cos_q = cos.expand(batch, -1, -1, -1)[rows, :, query][:, :, None]  # (B, 1, 1, hd)
    sin_q = sin.expand(batch, -1, -1, -1)[rows, :, query][:, :, None]
    q = _apply_rotary(q, cos_q, sin_q, names.rotary)
    k = _apply_rotary(k, cos, sin, names.rotary)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA: (B, H, T, hd)
    logits = (q @ k.transpose(-1, -2)).squeeze(2).float() * getattr(attn, names.scaling)  # (B, H, T)
    cap = getattr(attn, names.softcap, None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return logits.softmax(-1).mean(1)  # (B, T)


class FastVRanking(ExitPolicy):
    """FastV's exit policy: every row leaves at ``layer`` K, dropping all but its top-ranked visual tokens.

    Attributes:
        ratio: fraction R of each row's visual tokens pruned at layer K.
        kept_visual: ``(B, T)`` bool, for the last new sequence: the visual tokens that stay after layer K-1.
        visual_after: ``(B,)`` long, visual tokens per row that stay in layers ``>= K`` (for ``prefill_flops``).
        scores: ``(B, T)`` float32, the last prompt token's attention at layer K-1 (mean over heads).
    """

    keeps_visual = True  # the kept visual tokens keep the model's own attention among themselves

    # per-call state, per calling thread (docs/design.md §4, "Threads")
    kept_visual = PerThread()
    _visual_after = PerThread()
    scores = PerThread()
    _input_ids = PerThread()  # input_ids of the current call
    _prompt_ids = PerThread()  # (B, T_p) input_ids of the last ranked call
    _cacheless = PerThread(False)  # the current call runs without a KV cache

    def __init__(self, layer: int, ratio: float) -> None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
            raise ValueError(f"FastV ratio R (fraction of visual tokens pruned) must be in [0, 1), got {ratio!r}")
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"FastV layer K must be an int >= 1, got {layer!r}")
        if layer == 0:
            raise ValueError(
                "FastV needs K >= 1: it ranks visual tokens by the attention of layer K-1 (for pruning before the "
                "first layer use dyvte.prune(model, method='fastervlm' or 'random'))"
            )
        self._k = layer
        self.ratio = float(ratio)
        self._handle: Withdrawal | None = None

    def bind(self, spec: ModelSpec) -> None:
        super().bind(spec)
        if not 0 <= self._k <= spec.num_layers:
            raise ValueError(
                f"layer K={self._k} is out of range: this model has L={spec.num_layers} decoder layers, "
                f"so K must be in [0, {spec.num_layers}] (K = {spec.num_layers} never withdraws)"
            )
        linear = spec.linear_attention
        if linear and self._k < spec.num_layers and linear[self._k - 1]:
            full = [index + 1 for index, is_linear in enumerate(linear) if not is_linear]
            raise UnsupportedModelError(
                f"FastV ranks visual tokens by the attention of layer K-1, but layer {self._k - 1} of this "
                f"{spec.model_type} model is a linear-attention (Gated DeltaNet) layer, which has no attention "
                f"weights: choose K with a full-attention layer K-1, i.e. K in {full}"
            )

    @property
    def layer(self) -> int:
        return self._k

    @property
    def visual_after(self) -> torch.Tensor | None:
        return self._visual_after

    def earliest_exit(self) -> int:
        return self._k

    def attach(self, handle: Withdrawal) -> list[torch.utils.hooks.RemovableHandle]:
        self._handle = handle
        if self._k >= self.spec.num_layers:
            return []
        scorer = self.spec.layers[self._k - 1]
        return [scorer.register_forward_pre_hook(self._rank, with_kwargs=True)]

    def start(self, view: PolicyView, kwargs: dict[str, Any]) -> None:
        self._input_ids = view.input_ids
        self._cacheless = kwargs.get(USE_CACHE) is False

    def planned_exits(self, view: PolicyView) -> list[int]:
        return [self._k] * view.batch

    def kept_tokens(self, stats: list[list[int]], view: PolicyView) -> list[int]:
        if not view.new_sequence:
            return super().kept_tokens(stats, view)
        budget = [_kept_on_host(visual, self.ratio) for _, visual, _ in stats]
        self._visual_after = torch.tensor(budget, dtype=torch.long)
        return [text + kept + extra for (text, _, extra), kept in zip(stats, budget, strict=True)]

    def droppable(self, view: PolicyView) -> torch.Tensor:
        if view.new_sequence and self.kept_visual is not None:
            return view.visual & ~self.kept_visual
        return view.visual

    def _extends_prompt(self) -> bool:
        """The current call re-feeds the last ranked prompt plus new tokens (generate without a cache)."""
        ids, prompt = self._input_ids, self._prompt_ids
        if not self._cacheless or ids is None or prompt is None:
            return False
        if ids.shape[0] != prompt.shape[0] or ids.shape[1] <= prompt.shape[1]:
            return False
        return torch.equal(ids[:, : prompt.shape[1]], prompt.to(ids.device))

    def _rank(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook on layer K-1: rank each row's visual tokens by the last token's attention."""
        view = self._handle.policy_view if self._handle is not None else None
        if view is None or not view.new_sequence:
            return None  # decode steps: the kept set was fixed at prefill
        if self._extends_prompt() and self.kept_visual is not None:
            extra = view.num_tokens - self.kept_visual.shape[1]
            self.kept_visual = torch.nn.functional.pad(self.kept_visual, (0, extra), value=False)
            self.scores = torch.nn.functional.pad(self.scores, (0, extra))
            return None
        hidden = args[0] if args else kwargs[HIDDEN_STATES]  # (B, T, D), every token (no row has left yet)
        rotary = kwargs.get(POSITION_EMBEDDINGS)
        if rotary is None:
            raise WithdrawalError("FastV needs the rotary position_embeddings passed to the decoder layers")
        cols = torch.arange(view.num_tokens, device=hidden.device)
        allowed = view.valid.clone()  # (B, T): causal keys of the last token are all tokens; padding hidden
        window = self.spec.sliding_window[self._k - 1]
        if window is not None:
            allowed &= (view.num_tokens - 1 - cols) < window
        with torch.no_grad():
            family = self.spec.family
            scores = last_token_attention(
                module, hidden, rotary, allowed, names=family.attention, gated_query=family.gated_query
            )  # (B, T)
        visual = view.visual & view.valid
        budget = kept_count(visual.sum(1), self.ratio)  # (B,) on the device
        order = torch.where(visual, scores, float("-inf")).argsort(dim=1, descending=True, stable=True)
        rank = order.argsort(dim=1)  # (B, T) rank of each token by score
        self.kept_visual = visual & (rank < budget[:, None])
        self.scores = scores
        self._prompt_ids = None if self._input_ids is None else self._input_ids.clone()
        return None


class FastV(Withdrawal):
    """Handle of an active FastV pruning: the engine with a :class:`FastVRanking` policy.

    Attributes:
        ratio, kept_visual, visual_after, scores: those of the policy (see :class:`FastVRanking`).
    """

    def __init__(self, model: nn.Module, layer: int, ratio: float) -> None:
        policy = FastVRanking(layer, ratio)
        if active_withdrawal(model) is not None:
            raise WithdrawalError(
                "FastV cannot nest with dyvte.withdraw on the same model: both are withdrawals of the same engine. "
                "Remove the active withdrawal first (dyvte.withdraw composes with method='fastervlm' or 'random')."
            )
        super().__init__(model, policy)

    @property
    def ratio(self) -> float:
        """Fraction R of each row's visual tokens pruned at layer K."""
        return self.policy.ratio

    @property
    def kept_visual(self) -> torch.Tensor | None:
        """``(B, T)`` bool, the visual tokens that stay after layer K-1 (last new sequence)."""
        return self.policy.kept_visual

    @property
    def scores(self) -> torch.Tensor | None:
        """``(B, T)`` float32, the last prompt token's attention at layer K-1 (mean over heads)."""
        return self.policy.scores


def _fastv(model: nn.Module, layer: int, ratio: float) -> FastVRanking:
    return FastVRanking(layer, ratio)


register_policy("fastv", _fastv)
