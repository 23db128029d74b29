"""A decoder layer's inputs over the current layout: attention masks, rotary tables, position ids (docs/design.md §4).

Once a row has left, every hooked layer receives, in place of what the model built for the full sequence, inputs over
the call's current layout (:attr:`dyvte.engine.state.ForwardState.idx`): a mask built from the *original* columns of
its query slots and of the key slots of its group's cache layout (:class:`dyvte.engine.state.CacheLayouts`), the
rotary tables and position ids gathered to the kept tokens (so rotary positions are the original ones), and, for a
linear-attention layer (Qwen3.5), the 2-D validity of the slots. Nothing here reads device memory on the host.
"""

from __future__ import annotations

from typing import Any

import torch

from dyvte.engine.compat import (
    ATTENTION_MASK,
    POSITION_EMBEDDINGS,
    POSITION_IDS,
    cache_key_view,
    cache_layer,
    cache_length,
)
from dyvte.engine.layout import slot_mask, take
from dyvte.engine.registry import ModelSpec
from dyvte.engine.state import CacheLayouts, ForwardState, WithdrawalError

__all__ = ["LayerInputs", "add_own_pairs"]


class LayerInputs:
    """Builds the inputs of the hooked decoder layers over the current layout of a call.

    Args:
        spec: the resolved model.
        layouts: the handle's cache layouts (the layers' masks write this call's slots into them).
        keeps_visual: some visual tokens stay after an exit (the policy's ``keeps_visual``): exited rows keep the
            model's own attention pairs among their kept tokens in a prefill.
    """

    def __init__(self, spec: ModelSpec, layouts: CacheLayouts, keeps_visual: bool) -> None:
        self.spec = spec
        self.layouts = layouts
        self.keeps_visual = keeps_visual

    def is_linear(self, index: int) -> bool:
        """Whether decoder layer ``index`` is a linear-attention (recurrent) layer (Qwen3.5's Gated DeltaNet)."""
        linear = self.spec.linear_attention
        return bool(linear) and linear[index]

    def rewrite(self, index: int, fwd: ForwardState, kwargs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        """Layer ``index``'s keyword arguments with its mask, rotary tables and position ids over the current layout
        (a copy of ``kwargs``; ``dtype``: the hidden states' dtype)."""
        kwargs = dict(kwargs)
        if self.is_linear(index):
            kwargs[ATTENTION_MASK] = self.linear_mask(fwd, dtype)
        else:
            kwargs[ATTENTION_MASK] = self.mask(
                index, fwd, kwargs.get(self.spec.names.layer_cache), dtype, kwargs.get(ATTENTION_MASK)
            )
        if fwd.idx is not None:
            kwargs[POSITION_EMBEDDINGS] = self.rotary(fwd, kwargs.get(POSITION_EMBEDDINGS))
            position_ids = kwargs.get(POSITION_IDS)
            if isinstance(position_ids, torch.Tensor) and position_ids.shape[-1] == fwd.num_tokens:
                kwargs[POSITION_IDS] = take(position_ids, fwd.idx, -1)
        return kwargs

    def linear_mask(self, fwd: ForwardState, dtype: torch.dtype) -> torch.Tensor:
        """The 2-D padding mask of a linear-attention layer over the current layout: ``(B, T')``, 1 on valid slots.

        A Gated DeltaNet layer multiplies its input by this mask (transformers' ``apply_mask_to_padding_states``), so
        padding slots enter its convolution and recurrence as zeros and leave its state untouched: the layer then
        processes exactly the kept sequence of each row (docs/design.md, "Withdrawal on linear-attention layers").
        Memoised per layout; no host read.
        """
        memo = ("linear", fwd.key, dtype)
        mask = fwd.masks.get(memo)
        if mask is None:
            _, valid = fwd.slots()
            mask = fwd.masks[memo] = valid.to(dtype)
        return mask

    def mask(
        self, index: int, fwd: ForwardState, cache: Any, dtype: torch.dtype, own: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The mask of layer ``index`` over the current layout; ``own`` is the one the model built for it."""
        layer_cache, _ = cache_layer(cache, index)
        group = self.layouts.group(fwd, cache)
        window = self.spec.sliding_window[index]
        if group.fixed and not getattr(layer_cache, "is_sliding", False):
            # a pre-allocated full layer attends to all its slots: no host count is read, so a compiled decode
            # step sees the same Python values at every step
            first, length = 0, group.cols.shape[1]
        else:
            first, length = cache_key_view(layer_cache, group.length, fwd.written[fwd.key])
        memo = (window, first, length, own is None, None if own is None else own.shape[-1])
        if memo in fwd.masks:
            return fwd.masks[memo]
        if not group.fixed:
            past = group.length
            if past and layer_cache is not None:
                cached = cache_length(layer_cache)
                if isinstance(cached, int) and cached != past:  # a dynamic layer's length is on the host
                    raise WithdrawalError(
                        f"KV cache of layer {index} holds {cached} tokens where this withdrawal "
                        f"put {past}: the cache was modified outside dyvte"
                    )
            group.ensure(first + length)
        k_cols, k_valid = group.cols[:, first : first + length], group.valid[:, first : first + length]
        if not fwd.new_sequence and fwd.attention_2d is not None:  # the caller's mask decides which past columns count
            k_valid = k_valid & fwd.attention_2d.gather(1, k_cols.clamp(min=0)).bool()
        q_cols, q_valid = fwd.slots()
        mask = slot_mask(q_cols, q_valid, k_cols, k_valid, window=window, kind=fwd.kind, dtype=dtype)
        if self.keeps_visual and fwd.new_sequence and fwd.idx is not None and isinstance(own, torch.Tensor):
            mask = add_own_pairs(fwd, mask, own)
        if not all(fwd.exited) and isinstance(own, torch.Tensor):
            # rows still holding every token have the identity layout: keep the model's own mask for them, which
            # may be more than causal (Gemma3 lets image tokens attend to each other both ways)
            if own.shape[-2:] != mask.shape[-2:]:
                raise WithdrawalError(f"layer {index}: the model's mask {tuple(own.shape)} does not fit the layout")
            staying = ~fwd.exited_rows
            mask = torch.where(staying[:, None, None, None], own.expand(mask.shape[0], *own.shape[1:]), mask)
        fwd.masks[memo] = mask
        return mask

    def rotary(self, fwd: ForwardState, rotary: Any) -> Any:
        """The layer's ``position_embeddings`` (``(cos, sin)``) gathered to the current layout, memoised per table."""
        if rotary is None:
            return None
        memo = id(rotary[0])
        if memo not in fwd.rotary:
            fwd.rotary[memo] = tuple(take(t, fwd.idx, -2) for t in rotary)  # (B, T', d) each
        return fwd.rotary[memo]


def add_own_pairs(fwd: ForwardState, mask: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Let exited rows keep the model's own query-key pairs among their kept tokens (a prefill).

    When visual tokens stay after an exit (FastV), the model's mask may be more than causal among them (Gemma3:
    image tokens attend to each other both ways). Restricted to the kept tokens, the model's own prefill mask is
    exactly what the full model allows them; OR-ing it in changes nothing where the model is causal.
    """
    num_tokens = fwd.num_tokens
    if own.shape[-2:] != (num_tokens, num_tokens):
        return mask
    allowed = own if own.dtype == torch.bool else own == 0  # an additive mask attends where it adds 0
    allowed = allowed.expand(fwd.batch, *own.shape[1:])[:, 0]  # (B, T, T)
    slots, ok = fwd.idx.clamp(min=0), fwd.idx >= 0  # (B, T')
    rows = allowed.gather(1, slots[:, :, None].expand(-1, -1, num_tokens))  # (B, T', T)
    pairs = rows.gather(2, slots[:, None, :].expand(-1, slots.shape[1], -1))  # (B, T', T')
    extra = (pairs & ok[:, :, None] & ok[:, None, :] & fwd.exited_rows[:, None, None])[:, None]  # (B, 1, T', T')
    extra = torch.nn.functional.pad(extra, (0, mask.shape[-1] - extra.shape[-1]))  # a prefill: keys from slot 0
    if mask.dtype == torch.bool:
        return mask | extra
    return mask.masked_fill(extra, 0.0)
