"""Pure tensor functions for token layouts: packing kept tokens, gathering along the token axis, attention masks.

A *layout* maps the slots of a (possibly shortened) sequence to token indices of the full input: ``idx`` of shape
``(B, T')`` holds, per row, the indices of the kept tokens in their original order, right-aligned (left padding,
as ``generate`` expects), with ``-1`` in the padding slots.
"""

from __future__ import annotations

import torch

__all__ = ["pack_right", "take", "compose", "slot_mask"]


def pack_right(keep: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Right-aligned indices of the kept tokens of each row.

    Args:
        keep: ``(B, T)`` bool, True for tokens that stay.
        width: the layout width ``T'`` when the caller knows it on the host (then no host sync happens); it must be
            at least ``max_b keep[b].sum()`` (extra slots are left padding). ``None``: read it from ``keep`` (one sync).

    Returns:
        ``(B, T')`` long with ``T' = max_b keep[b].sum()`` (or ``width``): the kept indices in order, ``-1`` in left
        padding slots.
    """
    counts = keep.sum(dim=1)  # (B,)
    if width is None:
        width = int(counts.max()) if keep.numel() else 0
    batch, num_tokens = keep.shape
    rank = keep.long().cumsum(dim=1) - 1  # (B, T) rank among the row's kept tokens
    slot = rank + (width - counts)[:, None]  # (B, T) right-aligned slot of each kept token
    slot = torch.where(keep, slot, width)  # dropped tokens land in a spare column, cut off below
    idx = torch.full((batch, width + 1), -1, dtype=torch.long, device=keep.device)
    cols = torch.arange(num_tokens, device=keep.device).expand(batch, -1)
    idx.scatter_(1, slot, cols)  # kept slots are distinct; the spare column takes any of the dropped ones
    return idx[:, :width]


def compose(outer: torch.Tensor | None, inner: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Express a layout over token indices as slots of an earlier layout.

    Args:
        outer: ``(B, T_o)`` the earlier layout (``None`` = identity over the ``num_tokens`` tokens).
        inner: ``(B, T_i)`` token indices (``-1`` pad), each present in ``outer``.
        num_tokens: number of tokens ``T`` the layouts index into.

    Returns:
        ``(B, T_i)``: for each slot of ``inner``, the slot of ``outer`` holding the same token (``-1`` for pads).
    """
    if outer is None:
        return inner
    inverse = torch.full((outer.shape[0], num_tokens + 1), -1, dtype=torch.long, device=outer.device)
    slots = torch.arange(outer.shape[1], device=outer.device).expand_as(outer)
    inverse.scatter_(1, torch.where(outer >= 0, outer, num_tokens), slots)  # pads land in the spare column
    inverse[:, num_tokens] = -1
    return inverse.gather(1, torch.where(inner >= 0, inner, num_tokens))


def take(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather the slots of a layout along a token axis whose batch axis is ``dim - 1``.

    The batch axis of ``x`` may have size 1 (broadcast, as rotary tables often do). Padding slots (``-1``) take
    token 0's values; callers mask them.

    Args:
        x: tensor with a token axis ``dim`` and a batch axis ``dim - 1``.
        idx: ``(B, T')`` layout.
        dim: the token axis of ``x``.

    Returns:
        ``x`` with its batch axis expanded to ``B`` and its token axis replaced by the ``T'`` slots.
    """
    dim = dim % x.dim()
    batch, width = idx.shape
    shape = list(x.shape)
    shape[dim - 1] = batch
    x = x.expand(*shape)
    view = [1] * x.dim()
    view[dim - 1], view[dim] = batch, width
    out_shape = shape.copy()
    out_shape[dim] = width
    index = idx.clamp(min=0).view(view).expand(*out_shape)
    return x.gather(dim, index)


def slot_mask(
    q_cols: torch.Tensor,
    q_valid: torch.Tensor,
    k_cols: torch.Tensor,
    k_valid: torch.Tensor,
    *,
    window: int | None,
    kind: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Causal + padding (+ sliding-window) mask between query and key slots identified by original columns.

    Columns are indices in the full (never withdrawn) sequence, so causality and sliding windows mean exactly what
    they mean for the unmodified model. Always an explicit mask, the query slots anywhere among the keys.

    The engine's hot path: nothing is read back to the host (so the mask is never dropped for SDPA's implicit causal
    one, which would need a read), and no host position is used (an invalid query finds its own key slot by its
    column), so a compiled decode step does not depend on the step.

    Args:
        q_cols, q_valid: ``(B, Tq)`` original column / validity of each query slot (``-1``: a padding slot).
        k_cols, k_valid: ``(B, Tk)`` original column / validity of each key slot (unused cache slots: ``-1``,
            invalid); every query slot is among the key slots.
        window: sliding-window width, or ``None``.
        kind: ``"sdpa"`` (bool, True = attend) or ``"eager"`` (additive, ``dtype``).
        dtype: dtype of the additive mask.

    Returns:
        ``(B, 1, Tq, Tk)`` mask. An invalid query attends to the key slots of its own column only (padding slots:
        every ``-1`` slot), so its softmax stays finite.
    """
    diff = q_cols[:, :, None] - k_cols[:, None, :]  # (B, Tq, Tk)
    allowed = k_valid[:, None, :] & (diff >= 0)
    if window is not None:
        allowed &= diff < window
    allowed |= ~q_valid[:, :, None] & (diff == 0)
    if kind == "sdpa":
        return allowed[:, None]
    if kind == "eager":
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
    raise ValueError(f"unsupported mask kind {kind!r}")
