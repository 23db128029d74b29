"""Grouped execution of a decoder layer after a mixed exit (docs/design.md §4, "Grouped execution").

When rows of one batch leave at different layers, the engine's combined layout has the width of its widest row: a
row still in holds every token, so a layer run on the whole batch costs as much for the rows that left as for the
ones still in. Grouped execution runs such a layer once per *group* of rows at the group's own width instead:

- the rows still in, on the whole combined width (slots ``0 .. W-1``);
- the rows that left, on the last ``w`` slots only (the layout is right-aligned, so a row that left holds its kept
  tokens in its last ``kept[row] <= w`` slots; the slots before are padding).

Each group's call gets the rows and slot window of the combined ``hidden_states``, mask, rotary tables and position
ids, and a :class:`dyvte.engine.compat.CaptureCache` in place of the KV cache. Only a new sequence (a prefill, whose
cache is empty: its keys are exactly this call's slots) runs grouped, so the captured keys and values are all a group's
attention needs. They are then scattered into the combined layout (zeros in the slots a group did not run, which the
masks hide) and written to the real cache in one ``update`` per layer: the cache ends up with the layout the ungrouped
call writes, so decode steps and later calls run unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dyvte.engine.compat import ATTENTION_MASK, HIDDEN_STATES, POSITION_EMBEDDINGS, POSITION_IDS, CaptureCache
from dyvte.utils.threads import PerThread

__all__ = ["Handoff", "RowGroup", "row_index", "run_grouped", "wrap_forward"]


@dataclass(frozen=True)
class RowGroup:
    """Rows of the batch that run one layer together, and the first slot of their window.

    Attributes:
        rows: ``(B_g,)`` long on the device, the rows' batch indices.
        start: host; the group runs on combined slots ``start .. W-1``.
    """

    rows: torch.Tensor
    start: int


def row_index(rows: list[int], device: torch.device) -> torch.Tensor:
    """``(len(rows),)`` long on ``device`` holding ``rows``, written element by element from host ints (a fill per
    element, no host-to-device copy: a copy from pageable memory would sync on an accelerator)."""
    index = torch.empty(len(rows), dtype=torch.long, device=device)
    for slot, row in enumerate(rows):
        index[slot] = row
    return index


def _rows(x: torch.Tensor, rows: torch.Tensor, axis: int) -> torch.Tensor:
    """``x``'s ``rows`` along ``axis``; a broadcast axis (size 1) stays as it is."""
    return x if x.shape[axis] == 1 else x.index_select(axis, rows)


def _group_kwargs(kwargs: dict[str, Any], group: RowGroup, width: int, cache_name: str) -> dict[str, Any]:
    """The keyword arguments of one group's call: rows and slots ``start .. width-1`` of every per-token tensor."""
    rows, start = group.rows, group.start
    sub = dict(kwargs)
    mask = kwargs.get(ATTENTION_MASK)
    if isinstance(mask, torch.Tensor):  # (B, 1, W, K), K >= W; a prefill's own keys are slots 0 .. W-1
        sub[ATTENTION_MASK] = _rows(mask, rows, 0)[:, :, start:, start:width]
    rotary = kwargs.get(POSITION_EMBEDDINGS)
    if isinstance(rotary, tuple):  # (cos, sin), each (B, W, d)
        sub[POSITION_EMBEDDINGS] = tuple(_rows(t, rows, -3)[..., start:, :] for t in rotary)
    positions = kwargs.get(POSITION_IDS)
    if isinstance(positions, torch.Tensor) and positions.shape[-1] == width:  # (..., B, W)
        sub[POSITION_IDS] = _rows(positions, rows, -2)[..., start:]
    if kwargs.get(cache_name) is not None:
        sub[cache_name] = CaptureCache()
    return sub


def run_grouped(
    forward: Any, groups: list[RowGroup], args: tuple, kwargs: dict[str, Any], cache_name: str
) -> torch.Tensor | tuple:
    """Run a decoder layer's ``forward`` once per group and assemble the combined output (and cache entry).

    Args:
        forward: the layer's own forward (bound).
        groups: disjoint groups covering every row.
        args, kwargs: the layer call as the engine's pre-hook left it (combined layout of width ``W``).
        cache_name: the layer's cache argument name (``dyvte.engine.compat.call_names``).

    Returns:
        What the layer returns: ``(B, W, D)`` hidden states (or a tuple with them first), the slots a group did not
        run set to zero.
    """
    hidden = args[0] if args else kwargs[HIDDEN_STATES]  # (B, W, D)
    width = hidden.shape[1]
    cache = kwargs.get(cache_name)
    out = hidden.new_zeros(hidden.shape)  # (B, W, D)
    keys = values = None
    first: Any = None
    layer_call: CaptureCache | None = None
    for group in groups:
        sub = _group_kwargs(kwargs, group, width, cache_name)
        part = hidden.index_select(0, group.rows)[:, group.start :]  # (B_g, W - start, D)
        if args:
            result = forward(part, *args[1:], **sub)
        else:
            result = forward(**{**sub, HIDDEN_STATES: part})
        states = result[0] if isinstance(result, tuple) else result
        out[:, group.start :].index_copy_(0, group.rows, states)
        first = result if first is None else first
        captured = sub.get(cache_name)
        if isinstance(captured, CaptureCache) and captured.keys is not None:
            if keys is None:  # (B, H_kv, W, h) each
                keys = captured.keys.new_zeros(
                    (hidden.shape[0], *captured.keys.shape[1:2], width, captured.keys.shape[-1])
                )
                values = captured.values.new_zeros(
                    (hidden.shape[0], *captured.values.shape[1:2], width, captured.values.shape[-1])
                )
                layer_call = captured
            keys[:, :, group.start :].index_copy_(0, group.rows, captured.keys)
            values[:, :, group.start :].index_copy_(0, group.rows, captured.values)
    if cache is not None and layer_call is not None:
        layer_call.replay(cache, keys, values)
    if isinstance(first, tuple):
        return (out, *first[1:])
    return out


class Handoff:
    """The row groups a layer's pre-hook leaves for the same call of its wrapped forward (:func:`wrap_forward`).

    A forward pre-hook cannot redirect the call it precedes, so it puts the groups here (:meth:`put`) and the
    wrapped forward takes them (:meth:`take`), once; a call of another module finds none.
    """

    _pending = PerThread()  # (module, groups): per thread, each thread's layer call takes its own

    def put(self, module: nn.Module, groups: list[RowGroup] | None) -> None:
        """Leave ``groups`` for the call of ``module`` about to run (``None``: run it on the whole batch)."""
        self._pending = None if groups is None else (module, groups)

    def take(self, module: nn.Module) -> list[RowGroup] | None:
        """The groups left for this call of ``module`` (consumed), or ``None``."""
        pending = self._pending
        if pending is None or pending[0] is not module:
            return None
        self._pending = None
        return pending[1]

    def clear(self) -> None:
        """Drop what was left (the call ended, or the hooks are gone)."""
        self._pending = None


def wrap_forward(
    module: nn.Module, pending: Callable[[nn.Module], list[RowGroup] | None], cache_name: str
) -> Callable[[], None]:
    """Shadow ``module.forward`` (an instance attribute) with one that runs grouped when ``pending(module)`` names
    groups for this call, else the layer's own forward untouched; returns the undo.

    A forward pre-hook cannot redirect the call it precedes (``nn.Module`` looks ``forward`` up before running
    pre-hooks), so the engine's layer pre-hook leaves the groups where this wrapper collects them. A call without
    groups (a decode step, a compiled forward) reads one attribute and calls the own forward. A ``forward`` already
    set on the instance (e.g. by accelerate) is kept and called per group. ``functools.wraps`` keeps the signature
    visible to :func:`dyvte.engine.compat.call_names`.
    """
    previous = vars(module).get("forward")
    own = previous if previous is not None else type(module).forward.__get__(module)

    @functools.wraps(own)
    def forward(*args: Any, **kwargs: Any) -> Any:
        groups = pending(module)
        if groups is None:
            return own(*args, **kwargs)
        return run_grouped(own, groups, args, kwargs, cache_name)

    module.forward = forward

    def undo() -> None:
        if vars(module).get("forward") is not forward:
            return
        if previous is None:
            del module.forward
        else:
            module.forward = previous

    return undo
