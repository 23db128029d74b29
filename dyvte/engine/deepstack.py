"""DeepStack under withdrawal (Qwen3-VL, Qwen3-VL-MoE; docs/design.md §4, "DeepStack").

The text decoder of a DeepStack family adds ``features[j]`` to the hidden states at its visual positions after layer
``j`` with a ``(B, T)`` mask, which no longer fits once a row has withdrawn its visual tokens. A pre-hook on the
decoder takes the features out of its call; a forward hook on each of the first layers adds them to the visual tokens
still present, in the current layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dyvte.engine.compat import DEEPSTACK_EMBEDS, DEEPSTACK_MASK
from dyvte.engine.registry import ModelSpec
from dyvte.engine.state import ForwardState, WithdrawalError

__all__ = ["attach_deepstack", "take_deepstack", "add_deepstack"]


def attach_deepstack(
    spec: ModelSpec, current: Callable[[], ForwardState | None]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hook a DeepStack family's decoder and its first layers; ``current()`` is the state of the call in progress.

    Returns:
        The hooks (the decoder's pre-hook, then one forward hook per layer after which features are added).
    """

    def take(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        return take_deepstack(current(), args, kwargs)

    hooks = [spec.decoder.register_forward_pre_hook(take, with_kwargs=True)]
    for index in range(spec.deepstack_layers):  # only the layers after which features are added
        hooks.append(spec.layers[index].register_forward_hook(_add_hook(current, index)))
    return hooks


def _add_hook(current: Callable[[], ForwardState | None], index: int) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        fwd = current()
        if fwd is None or fwd.deepstack is None or index >= len(fwd.deepstack[2]):
            return None
        if isinstance(output, torch.Tensor):
            return add_deepstack(fwd, output, *fwd.deepstack, index)
        return (add_deepstack(fwd, output[0], *fwd.deepstack, index), *output[1:])

    return hook


def take_deepstack(fwd: ForwardState | None, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Text-decoder pre-hook (DeepStack families): take the visual features it would add after its first
    layers out of its call (into ``fwd.deepstack``); the layer hooks add them to the visual tokens still present.

    Raises:
        WithdrawalError: the decoder's visual-position mask does not have one entry per input token.
    """
    embeds = kwargs.get(DEEPSTACK_EMBEDS)
    if embeds is None or fwd is None:
        return None
    mask = kwargs.get(DEEPSTACK_MASK)
    if not isinstance(mask, torch.Tensor) or mask.shape != (fwd.batch, fwd.num_tokens):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else mask
        raise WithdrawalError(
            f"DeepStack: the decoder's {DEEPSTACK_MASK} is {shape}, expected one entry per input token "
            f"{(fwd.batch, fwd.num_tokens)}"
        )
    kwargs = {k: v for k, v in kwargs.items() if k not in (DEEPSTACK_MASK, DEEPSTACK_EMBEDS)}
    mask = mask.bool()
    rank = mask.flatten().cumsum(0).view(mask.shape) - 1  # (B, T) row of each visual position's feature
    fwd.deepstack = (mask, rank, list(embeds))
    return args, kwargs


def add_deepstack(
    fwd: ForwardState,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    rank: torch.Tensor,
    embeds: list[torch.Tensor],
    index: int,
) -> torch.Tensor:
    """``hidden`` (B, T', D) in the current layout plus layer ``index``'s DeepStack features at every visual
    token still present (every one before an exit; FastV's kept ones after it), as the decoder adds them.

    ``mask`` (B, T): the model's visual positions; ``rank`` (B, T): each one's row in ``embeds[index]``.
    Sync-free: every other slot adds an exact zero, so a row that never leaves is the model's own result; a copy
    is made only if a tensor sits on another device or dtype (checked on the host).
    """
    if mask.device != hidden.device:
        mask, rank = mask.to(hidden.device), rank.to(hidden.device)
    if fwd.idx is not None:
        slots = fwd.idx.clamp(min=0)  # (B, T')
        present = (fwd.idx >= 0) & mask.gather(1, slots)
        rank = rank.gather(1, slots)
    else:
        present = mask
    feats = embeds[index]  # (N, D)
    if feats.device != hidden.device or feats.dtype != hidden.dtype:
        feats = feats.to(hidden.device, hidden.dtype)
    feats = torch.cat([feats, feats.new_zeros(1, feats.shape[-1])])  # row N: zero, for every other slot
    return hidden + feats[torch.where(present, rank, feats.shape[0] - 1)]  # (B, T', D)
