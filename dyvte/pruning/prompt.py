"""The prompt the LLM receives after pruning before it: the placeholders of pruned entries dropped.

Used by :class:`dyvte.pruning.before_llm.Pruning`. In a new sequence the kept tokens are packed to the right (rows
re-padded on the left, as ``generate`` expects), ``position_ids`` count only the kept tokens (consecutive positions,
as if the pruned placeholders had never been there), and every other per-token tensor (``labels``,
``token_type_ids``, ``visual_mask``...) is gathered alike. A decode step maps the caller's full-length mask and
positions onto the shortened prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dyvte.engine.compat import ATTENTION_MASK, INPUT_IDS, POSITION_IDS
from dyvte.engine.layout import pack_right, take
from dyvte.pruning.scoring import PruningError

__all__ = ["ShortPrompt", "continue_prompt", "pad_id", "shorten_prompt"]


@dataclass
class ShortPrompt:
    """What the LLM received in a new sequence.

    Attributes:
        kept_columns: ``(B, T')`` the original column of each slot (``-1``: padding), ``None`` when nothing was pruned.
        dropped: ``(B,)`` pruned columns per row.
        fed_tokens: ``(B,)`` non-padding tokens per row the LLM received (on the host).
        fed_visual: ``(B,)`` visual tokens per row the LLM received (on the host).
    """

    kept_columns: torch.Tensor | None
    dropped: torch.Tensor
    fed_tokens: torch.Tensor
    fed_visual: torch.Tensor


def pad_id(config: Any, image_id: int) -> int:
    """The id written into the padding slots of a shortened prompt: the model's pad id, never the image id."""
    for cfg in (config, config.get_text_config()):
        pad = getattr(cfg, "pad_token_id", None)
        if pad is not None and pad != image_id:
            return int(pad)
    return 0 if image_id != 0 else 1


def shorten_prompt(
    kwargs: dict, input_ids: torch.Tensor, keep: torch.Tensor, placeholder: torch.Tensor, pad_id: int
) -> ShortPrompt:
    """Drop the ``~keep`` columns of a new sequence from the top-level call's ``kwargs`` (updated in place).

    Args:
        kwargs: the call's keyword arguments.
        input_ids: ``(B, T)`` the call's ids.
        keep: ``(B, T)`` bool, False on the placeholders of pruned entries.
        placeholder: ``(B, T)`` bool, every visual placeholder.
        pad_id: the id written into padding slots.
    """
    batch, num_tokens = input_ids.shape
    mask = kwargs.get(ATTENTION_MASK)
    valid = mask.bool() if isinstance(mask, torch.Tensor) else torch.ones_like(keep)  # (B, T)
    pruned = ~keep  # (B, T) placeholders of pruned image entries
    dropped = pruned.sum(1)  # (B,)
    if not bool(pruned.any()):
        return ShortPrompt(None, dropped, valid.sum(1).cpu(), (placeholder & valid).sum(1).cpu())
    idx = pack_right(keep & valid)  # (B, T'): padding columns go too, rows are re-padded on the left
    slot_ok = idx >= 0
    kwargs[INPUT_IDS] = take(input_ids, idx, 1).masked_fill(~slot_ok, pad_id)
    kwargs[ATTENTION_MASK] = slot_ok.long() if mask is None else take(mask, idx, 1) * slot_ok
    position_ids = kwargs.get(POSITION_IDS)
    if position_ids is None:  # the shortened prompt's own positions (the model would count padding slots)
        kwargs[POSITION_IDS] = (slot_ok.long().cumsum(1) - 1).clamp(min=0)
    elif position_ids.shape == (batch, num_tokens):
        shifted = position_ids - pruned.long().cumsum(1)  # a kept token moves back by the pruned before it
        kwargs[POSITION_IDS] = take(shifted, idx, 1).masked_fill(~slot_ok, 0)
    else:
        raise PruningError(f"position_ids of shape {tuple(position_ids.shape)} are not supported under pruning")
    for key, value in list(kwargs.items()):
        if key in (INPUT_IDS, ATTENTION_MASK, POSITION_IDS) or not isinstance(value, torch.Tensor):
            continue
        if value.shape[:2] == (batch, num_tokens):  # labels, token_type_ids, visual_mask, ...
            pad = ~slot_ok.view(*idx.shape, *[1] * (value.dim() - 2))
            kwargs[key] = take(value, idx, 1).masked_fill(pad, -100 if key == "labels" else 0)
    return ShortPrompt(idx, dropped, slot_ok.sum(1).cpu(), (take(placeholder, idx, 1) & slot_ok).sum(1).cpu())


def continue_prompt(kwargs: dict, short: ShortPrompt | None, prompt_len: int) -> dict:
    """A decode step after a pruned prefill: the caller's full-length 2-D mask and positions mapped onto the
    shortened prompt (``short``: the prefill's, ``None`` when nothing was pruned; ``prompt_len``: its T)."""
    if short is None or short.kept_columns is None:
        return kwargs
    idx = short.kept_columns
    mask = kwargs.get(ATTENTION_MASK)
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        if mask.shape[1] < prompt_len:
            raise PruningError(f"attention_mask has {mask.shape[1]} columns, fewer than the prompt's {prompt_len}")
        kwargs[ATTENTION_MASK] = torch.cat([take(mask[:, :prompt_len], idx, 1) * (idx >= 0), mask[:, prompt_len:]], 1)
    position_ids = kwargs.get(POSITION_IDS)
    if isinstance(position_ids, torch.Tensor):
        kwargs[POSITION_IDS] = position_ids - short.dropped[:, None]  # same device: no copy, no sync
    return kwargs
