"""The state of one call of the top-level model under withdrawal, and the cache layouts kept between calls.

:class:`ForwardState` is what the engine (:mod:`dyvte.engine.withdrawal`) builds in the top-level pre-hook (from the
call's arguments: :func:`read_tokens`, :func:`read_valid`) and the layer hooks read and update: an exit repacks its
layout (:meth:`ForwardState.withdraw`), the layers' inputs follow it (:mod:`dyvte.engine.masks`,
:mod:`dyvte.engine.deepstack`). An exit policy sees only its read-only :class:`dyvte.engine.policy.PolicyView`.
:class:`CacheLayouts` outlives the call: the cache the calls filled and, per group of layers sharing one exit set, a
:class:`GroupLayout` of which original column each KV-cache slot holds.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dyvte.engine.compat import INPUT_IDS, INPUTS_EMBEDS, cache_capacity, cache_length_host, cache_resets
from dyvte.engine.grouping import RowGroup, row_index
from dyvte.engine.layout import compose, pack_right, take
from dyvte.engine.policy import PolicyView

__all__ = [
    "VISUAL_MASK",
    "CacheLayouts",
    "ForwardState",
    "GroupLayout",
    "WithdrawalError",
    "read_tokens",
    "read_valid",
]

#: the keyword argument of a model call (or of ``generate``) that names its visual positions, for ``inputs_embeds``
VISUAL_MASK = "visual_mask"


class WithdrawalError(RuntimeError):
    """Withdrawal cannot proceed on these inputs or this state (the message says why)."""


class GroupLayout:
    """Which original column each KV-cache slot of a group of layers holds, in buffers grown in place.

    A group is the layers that share one exit set (the rows withdrawn so far). ``cols``/``valid`` are ``(B, cap)``;
    the first ``length`` slots are committed, later ones are unused (``-1`` / ``False``).
    """

    def __init__(self, batch: int, capacity: int, device: torch.device, fixed: bool = False) -> None:
        self.cols = torch.full((batch, capacity), -1, dtype=torch.long, device=device)  # (B, cap)
        self.valid = torch.zeros((batch, capacity), dtype=torch.bool, device=device)  # (B, cap)
        self.length = 0  # committed slots, on the host
        self.cursor = torch.zeros((), dtype=torch.long, device=device)  # the same count on the device
        self.fixed = fixed  # a static cache's capacity: never grows (the decode step reads no host count)

    def ensure(self, capacity: int) -> None:
        """Make room for ``capacity`` slots (doubling, so appending is amortised O(1))."""
        old = self.cols.shape[1]
        if capacity <= old:
            return
        new = max(capacity, 2 * old)
        cols = self.cols.new_full((self.cols.shape[0], new), -1)
        valid = self.valid.new_zeros((self.valid.shape[0], new))
        cols[:, :old], valid[:, :old] = self.cols, self.valid
        self.cols, self.valid = cols, valid

    def write(self, cols: torch.Tensor, valid: torch.Tensor) -> None:
        """Write this call's slots (``(B, W)`` each) after the committed ones, in place (at the device cursor)."""
        if not self.fixed:
            self.ensure(self.length + cols.shape[1])
        slots = self.cursor + torch.arange(cols.shape[1], device=cols.device)  # (W,)
        self.cols.index_copy_(1, slots, cols)
        self.valid.index_copy_(1, slots, valid)

    def commit(self, width: int) -> None:
        """Count this call's ``width`` slots as cached (host and device counts)."""
        self.length += width
        self.cursor.fill_(self.length)  # a fill from a host scalar: no copy

    def repeat_rows(self, times: int) -> None:
        """Repeat every row ``times`` times (row ``b`` becomes rows ``b * times .. b * times + times - 1``)."""
        self.cols = self.cols.repeat_interleave(times, 0)
        self.valid = self.valid.repeat_interleave(times, 0)


class CacheLayouts:
    """What a handle knows, between calls, of the KV cache its calls filled.

    Attributes:
        groups: exit set -> the :class:`GroupLayout` of the layers that share it (replaced by :meth:`repeat_rows`).
        columns: the original columns the cache holds (the next call's past).
    """

    def __init__(self) -> None:
        self.groups: dict[tuple[bool, ...], GroupLayout] = {}
        self.columns = 0
        self._ref: weakref.ref | None = None  # the cache the last call returned (by identity)
        self._resets = 0  # its reset count then (generate resets and reuses a static cache)
        # every live cache whose latest sequence some row withdrew from (held weakly: a cache dropped by its caller
        # is freed and leaves this mapping), by identity
        self._withdrawn: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()

    def withdrawn_caches(self) -> list[Any]:
        """The caches, still alive, that calls under this handle filled with a withdrawn layout (layers >= K hold only
        the kept tokens): the last one and every earlier one (e.g. of an earlier ``generate`` in the same block)."""
        return list(self._withdrawn.values())

    def forget(self) -> None:
        """Forget every cache and layout (the handle is removed)."""
        self.groups.clear()
        self._withdrawn.clear()
        self._ref = None

    @property
    def cache(self) -> Any:
        """The cache the last call kept, or ``None`` (none, or it is gone)."""
        return self._ref() if self._ref is not None else None

    def is_new_sequence(self, cache: Any) -> bool:
        """Whether a call with ``cache`` starts a sequence, without reading device memory for a known cache.

        Raises:
            WithdrawalError: ``cache`` is not empty and not the one the last call kept.
        """
        if cache is None:
            return True
        known = self.cache
        resets = cache_resets(cache)
        if known is cache:
            return resets != self._resets  # generate() resets and reuses a static cache: a new prompt
        if cache_length_host(cache) == 0:  # a cache never seen: a fresh one is empty (read on the host)
            return True
        if self._withdrawn.get(id(cache)) is cache:
            raise WithdrawalError(
                "this KV cache was filled by an earlier sequence under this withdrawal handle: a handle continues only "
                "the cache of its latest call (it keeps one cache layout). Decode each sequence before starting the "
                "next one, or prefill this one again."
            )
        raise WithdrawalError(
            "the KV cache passed in was not produced under this withdrawal handle: its layers >= K hold a "
            "different token set. Prefill and decode under the same `withdraw(...)`."
        )

    def group(self, fwd: ForwardState, cache: Any) -> GroupLayout:
        """The current group's layout, with this call's slots written after its committed ones (once per call).

        Raises:
            WithdrawalError: a decode step withdraws a set of rows its prefill never withdrew.
        """
        key = fwd.key
        group = self.groups.get(key)
        if group is None:
            if not fwd.new_sequence:
                raise WithdrawalError(
                    "this decode step withdraws a set of rows the prefill never withdrew: the cache layout is unknown"
                )
            width = fwd.num_tokens if fwd.idx is None else fwd.width
            capacity = cache_capacity(cache)  # every layer pre-allocated to the same length, else None
            fixed = capacity is not None and capacity >= width
            group = GroupLayout(fwd.batch, max(width, capacity or 0), fwd.valid.device, fixed=fixed)
            self.groups[key] = group
        if key not in fwd.written:
            cols, valid = fwd.slots()
            group.write(cols, valid)
            fwd.written[key] = cols.shape[1]
        return group

    def commit(self, fwd: ForwardState, cache: Any) -> None:
        """After a call: count the slots it wrote and remember the ``cache`` it returned; forget everything when it
        kept none (no ``cache``, or ``use_cache=False``)."""
        if cache is not None and fwd.use_cache:
            for key, width in fwd.written.items():
                self.groups[key].commit(width)
            self._ref = weakref.ref(cache)
            self._resets = cache_resets(cache)
            self.columns = fwd.past + fwd.num_tokens
            if self.groups:  # some row withdrew: the cache needs this handle's layouts to be continued
                self._withdrawn[id(cache)] = cache
            else:  # a full-length sequence (again: generate may reuse a cache for a new prompt)
                self._withdrawn.pop(id(cache), None)
        else:
            self.groups.clear()
            self._ref = None

    def repeat_rows(self, times: int) -> None:
        """Repeat every row of every layout ``times`` times (row ``b`` becomes rows ``b * times ..``)."""
        groups = {}
        for key, group in self.groups.items():  # an exit set names its rows: repeat its entries too
            group.repeat_rows(times)
            groups[tuple(out for out in key for _ in range(times))] = group
        self.groups = groups


@dataclass
class ForwardState:
    """State of one call of the top-level model, kept by the engine (a policy reads :meth:`view`).

    Host fields are plain Python values (no tensor read is needed to use them); device fields are tensors.

    Attributes:
        batch: B.
        num_tokens: T, tokens of this call.
        past: P, columns already in the cache before this call.
        visual: ``(B, T)`` bool, visual tokens of this call.
        valid: ``(B, T)`` bool, attention-mask entry of each token.
        attention_2d: ``(B, P + T)`` the caller's 2-D mask, or ``None``.
        kind: ``"sdpa"`` or ``"eager"``.
        new_sequence: no cache, or an empty one (a prefill).
        input_ids: ``(B, T)`` the call's ids, or ``None`` (``inputs_embeds``).
        use_cache: the call keeps a KV cache.
        exited: host, per row: withdrawn so far in this call.
        idx: ``(B, T')`` the current layout (``None`` = identity), ``width`` its T'.
        key: the exit set of the current layout (``None`` until a row leaves).
        kept: host, per row: tokens a leaving row keeps (``None`` when this call cannot shorten a row).
        plan: host, layer -> rows leaving there (``None``: the policy decides at run time).
        cols: ``(T,)`` the original column of each of the call's tokens, on the device (layer hooks read it instead
            of ``past``, so a compiled decode step depends on no host count).
        exited_rows: ``(B,)`` bool on the device, mirroring ``exited`` (``None`` until a row leaves).
        written: host, exit set -> slots of its group's cache layout written in this call.
        masks, rotary: this layout's layer masks and gathered rotary tables, memoised (cleared at each exit).
        labels: ``(B, T)`` the caller's labels, taken out of the call (the loss is computed on the kept positions).
        groups: host, exit set -> the groups of rows its layers run as (``None``: the whole batch at once).
        deepstack: DeepStack families: the model's ``(B, T)`` visual-position mask, each position's ``(B, T)`` row
            in the features, and the per-layer features (``(N_visual, D)`` each, in the mask's row-major order) that
            the engine adds after the first layers (``None`` when the call has none).
    """

    batch: int
    num_tokens: int
    past: int
    visual: torch.Tensor
    valid: torch.Tensor
    attention_2d: torch.Tensor | None
    kind: str
    new_sequence: bool
    input_ids: torch.Tensor | None
    use_cache: bool
    exited: list[bool]
    idx: torch.Tensor | None = None
    width: int = 0
    key: tuple[bool, ...] | None = None
    kept: list[int] | None = None
    plan: dict[int, list[int]] | None = None
    cols: torch.Tensor | None = None
    exited_rows: torch.Tensor | None = None
    written: dict[tuple[bool, ...], int] = field(default_factory=dict)  # group -> slots written in this call
    masks: dict[Any, torch.Tensor | None] = field(default_factory=dict)
    rotary: dict[Any, Any] = field(default_factory=dict)
    labels: torch.Tensor | None = None
    groups: dict[tuple[bool, ...], list[RowGroup] | None] = field(default_factory=dict)  # exit set -> row groups
    deepstack: tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]] | None = None

    def view(self) -> PolicyView:
        """What an exit policy may read of this call, in the current layout (host work only, no tensor copy)."""
        return PolicyView(
            batch=self.batch,
            num_tokens=self.num_tokens,
            new_sequence=self.new_sequence,
            input_ids=self.input_ids,
            visual=self.visual,
            valid=self.valid,
            idx=self.idx,
        )

    def token_counts(self) -> list[list[int]]:
        """Per row ``[text, visual, final_extra]``: valid non-visual tokens, valid visual tokens, and 1 when the final
        token is padding or visual (it stays anyway). The one host read of a call that can shorten rows."""
        valid, visual = self.valid, self.visual
        extra = ~valid[:, -1] | visual[:, -1]  # (B,) the final token stays even if padding or visual
        stats = torch.stack([(valid & ~visual).sum(1), (valid & visual).sum(1), extra.long()], 1)  # (B, 3)
        return stats.tolist()

    def withdraw(self, hidden: torch.Tensor, rows: list[int], droppable: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Withdraw ``rows``: drop their droppable and padding tokens from ``hidden`` (in the current layout).

        Args:
            hidden: ``(B, T_cur, D)`` the hidden states in the current layout.
            rows: the rows leaving now.
            droppable: returns the policy's ``(B, T)`` droppable tokens (called only when a row gets shorter).

        Returns:
            ``(B, T', D)`` the hidden states in the new layout (``hidden`` itself when no row gets shorter).
        """
        if self.exited_rows is None:
            self.exited_rows = torch.zeros(self.batch, dtype=torch.bool, device=hidden.device)
        for row in rows:  # a fill per row: no host-to-device copy (which would sync on an accelerator)
            self.exited[row] = True
            self.exited_rows[row] = True
        num_tokens = self.num_tokens
        kept = self.kept
        if kept is not None and any(kept[row] < num_tokens for row in rows):  # decided on the host
            drop = (droppable() | ~self.valid) & self.exited_rows[:, None]  # (B, T)
            drop[:, -1] = False  # the final token always stays: the next-token logits are read there
            width = max(kept[row] if self.exited[row] else num_tokens for row in range(self.batch))
            idx = pack_right(~drop, width)  # (B, T')
            hidden = take(hidden, compose(self.idx, idx, num_tokens), 1)
            self.idx, self.width = idx, width
        self.key = tuple(self.exited)
        self.masks.clear()
        self.rotary.clear()
        return hidden

    def slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Original columns and validity of this call's slots in the current layout: two ``(B, T')`` tensors."""
        idx = self.idx
        if idx is None:  # no host int is read: a compiled decode step does not specialise on the position
            return self.cols.expand(self.batch, -1), self.valid
        return torch.where(idx >= 0, idx + self.past, -1), (idx >= 0) & self.valid.gather(1, idx.clamp(min=0))

    def row_groups(self, enabled: bool) -> list[RowGroup] | None:
        """The groups of rows the current layer runs as, or ``None`` to run the whole batch at once.

        Grouped only when ``enabled`` (the handle's ``grouped``, and no visual token stays after an exit: FastV's
        kept visual tokens keep the model's own pairs, one group), in a prefill (a new sequence: the cache layer is
        empty, see :mod:`dyvte.engine.grouping`) where some rows left and some are still in, when the rows that left
        are narrower than the combined layout. Host work only; memoised per exit set.
        """
        key = self.key
        if key in self.groups:
            return self.groups[key]
        groups = None
        kept = self.kept
        if enabled and self.new_sequence and self.idx is not None and kept is not None and not all(self.exited):
            left = [row for row in range(self.batch) if self.exited[row]]
            narrow = max(kept[row] for row in left)  # the rows that left fit in the last `narrow` slots
            if left and narrow < self.width:
                device = self.idx.device
                staying = [row for row in range(self.batch) if not self.exited[row]]
                groups = [
                    RowGroup(row_index(staying, device), 0),
                    RowGroup(row_index(left, device), self.width - narrow),
                ]
        self.groups[key] = groups
        return groups


def read_tokens(
    args: tuple, kwargs: dict[str, Any], visual_ids: Callable[[torch.device], torch.Tensor]
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The call's ``input_ids`` (``None`` for ``inputs_embeds``) and ``(B, T)`` bool visual tokens.

    Consumes ``kwargs["visual_mask"]`` (the caller's visual positions, for ``inputs_embeds``; given to ``generate``,
    the withdrawal hands it to the prefill call); else the visual tokens are the ``input_ids`` among
    ``visual_ids(device)``, the placeholder ids on the ids' device.

    Raises:
        WithdrawalError: no ``input_ids`` nor ``inputs_embeds``, a misshapen ``visual_mask``, or ``inputs_embeds``
            without one.
    """
    visual_mask = kwargs.pop(VISUAL_MASK, None)
    input_ids = kwargs.get(INPUT_IDS, args[0] if args else None)
    embeds = kwargs.get(INPUTS_EMBEDS)
    if input_ids is not None:
        batch, num_tokens = input_ids.shape
        device = input_ids.device
    elif embeds is not None:
        batch, num_tokens = embeds.shape[:2]
        device = embeds.device
    else:
        raise WithdrawalError("withdrawal needs input_ids or inputs_embeds")
    if visual_mask is not None:
        if visual_mask.shape != (batch, num_tokens):
            raise WithdrawalError(
                f"visual_mask has shape {tuple(visual_mask.shape)}, expected "
                f"{(batch, num_tokens)} (one entry per input token)"
            )
        visual = visual_mask.to(device=device, dtype=torch.bool)
    elif input_ids is not None:
        visual = torch.isin(input_ids, visual_ids(device))
    else:
        raise WithdrawalError(
            "inputs_embeds without input_ids: dyvte cannot tell which positions are visual. Pass "
            f"{VISUAL_MASK}=<(B, T) bool tensor, True at the visual positions> to the model call or to generate "
            "(model(inputs_embeds=..., visual_mask=...) or model.generate(inputs_embeds=..., visual_mask=...); the "
            "withdrawal consumes it)."
        )
    return input_ids, visual


def read_valid(attention_2d: Any, visual: torch.Tensor, past: int, past_cache: Any) -> torch.Tensor:
    """``(B, T)`` bool, the attention-mask entry of each of the call's tokens.

    Args:
        attention_2d: the caller's ``attention_mask``: ``(B, past + T)``, or ``None`` (every token counts). In a
            decode step with a pre-allocated cache it may be right-padded to the cache's length (see
            :func:`dyvte.engine.compat.keep_2d_masks`).
        visual: ``(B, T)`` the call's visual tokens (for its shape and device).
        past: columns already in the cache.
        past_cache: the cache the call continues, or ``None`` in a new sequence.

    Raises:
        WithdrawalError: the mask is not 2-D or does not have ``past + T`` columns.
    """
    batch, num_tokens = visual.shape
    if isinstance(attention_2d, torch.Tensor) and attention_2d.dim() == 2:
        padded = past_cache is not None and attention_2d.shape[1] == cache_capacity(past_cache)  # see keep_2d_masks
        if attention_2d.shape != (batch, past + num_tokens) and not (padded and attention_2d.shape[0] == batch):
            raise WithdrawalError(
                f"attention_mask has shape {tuple(attention_2d.shape)}, expected "
                f"{(batch, past + num_tokens)} (past {past} + current {num_tokens} columns)"
            )
        return attention_2d[:, past : past + num_tokens].bool()
    if attention_2d is None:
        return torch.ones(batch, num_tokens, dtype=torch.bool, device=visual.device)
    shape = tuple(attention_2d.shape) if isinstance(attention_2d, torch.Tensor) else type(attention_2d).__name__
    raise WithdrawalError(
        f"withdrawal needs the 2-D padding attention_mask (batch, columns) or none, got {shape}: dyvte "
        "builds each layer's mask itself from the tokens that remain; pass the processor's 2-D mask"
    )
