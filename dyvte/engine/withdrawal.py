"""The withdrawal engine: hooks, layouts, masks and the KV cache, for any exit policy (docs/design.md §1, §4).

Layer-index convention (used everywhere in dyvte): **exit layer K** means layers ``0..K-1`` see every token and layers
``K..L-1`` see only the kept tokens. ``K = 0`` withdraws before the first layer (text-only decoder), ``K = L`` never
withdraws. An exit head attached to layer ``k`` reads the output of layer ``k``; when it fires, the exit layer is
``k + 1``.

Mechanism: forward pre-hooks (with kwargs) on the unmodified HF modules. A hook on the top-level model reads the
visual positions from ``input_ids`` (or an explicit ``visual_mask``) and the 2-D attention mask; a hook on every
decoder layer from the policy's first possible exit on replaces ``hidden_states`` (gathered to the kept tokens),
``attention_mask`` (causal/padding/sliding over kept tokens, built from their *original* columns),
``position_embeddings`` and ``position_ids`` (gathered, so rotary positions are the original ones). The KV cache of
layers >= K therefore holds kept tokens only; the handle remembers, per group of layers sharing an exit set, which
original column each cache slot holds, in buffers extended in place (O(1) per decode step), so decode steps get
correct masks, with dynamic and static (pre-allocated) caches alike.

What is kept at an exit, per row: every token the policy does not drop whose attention-mask entry is 1, plus the
row's final token in any case (the next-token logits are read there). Padding columns are dropped with the visual
tokens, so a ragged batch shrinks to its longest kept row.

Host syncs (docs/design.md §4, "Hot path"): every decision about shapes is made on the host. A new sequence reads
one small ``(B, 3)`` count tensor in the top-level hook, before any layer of the call is queued (the shortened width is
data-dependent); a run-time policy reads its ``(B,)`` decision once per layer where a row is still in. A decode
step reads nothing.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dyvte.engine.compat import (
    ATTENTION_MASK,
    DEEPSTACK_EMBEDS,
    DEEPSTACK_MASK,
    HIDDEN_STATES,
    INPUT_IDS,
    INPUTS_EMBEDS,
    POSITION_EMBEDDINGS,
    POSITION_IDS,
    USE_CACHE,
    cache_capacity,
    cache_in,
    cache_key_view,
    cache_layer,
    cache_length,
    cache_length_host,
    cache_out,
    cache_repeat_rows,
    cache_resets,
    check_cache,
    keep_2d_masks,
    logits_of,
    seal_cache,
)
from dyvte.engine.grouping import RowGroup, row_index, wrap_forward
from dyvte.engine.layout import compose, pack_right, slot_mask, take
from dyvte.engine.policy import ExitPolicy
from dyvte.engine.registry import ModelSpec, resolve

__all__ = ["ForwardState", "Withdrawal", "WithdrawalError", "HANDLE_ATTR", "active_withdrawal"]

logger = logging.getLogger(__name__)

HANDLE_ATTR = "_dyvte_withdrawal"  # the top-level model's attribute naming its active withdrawal
PRUNING_ATTR = "_dyvte_pruning"  # ... and its active pruning before the LLM (which shortens the 2-D mask itself)


class WithdrawalError(RuntimeError):
    """Withdrawal cannot proceed on these inputs or this state (the message says why)."""


def active_withdrawal(model: nn.Module) -> Withdrawal | None:
    """The withdrawal handle active on ``model`` (the top-level model), or ``None``."""
    return getattr(model, HANDLE_ATTR, None)


class _GroupLayout:
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


@dataclass
class ForwardState:
    """State of one call of the top-level model, shared by the engine and the exit policy.

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


class Withdrawal:
    """Handle of an active withdrawal on one model; a context manager. See :func:`dyvte.withdraw`.

    Attributes:
        spec: the resolved model pieces.
        policy: the :class:`dyvte.engine.policy.ExitPolicy` deciding the exits.
        exit_layers: ``(B,)`` long, the exit layer of each row in the last new sequence (prefill); ``L`` = never.
        output_positions: ``(B, T_out)`` long, for the last call: the input position of each output slot
            (``-1`` for padding slots), or ``None`` when the output has the input's positions.
        fed_tokens, fed_visual: ``None`` (the LLM receives the whole prompt; pruning handles set them).
    """

    fed_tokens: torch.Tensor | None = None
    fed_visual: torch.Tensor | None = None
    grouped: bool = True
    """Run the layers after a mixed exit once per group of rows, each at its own width (docs/design.md §4,
    "Grouped execution"); ``False`` runs them on the whole batch at its widest row's width (same outputs)."""

    def __init__(self, model: nn.Module, policy: ExitPolicy) -> None:
        """Hook ``model`` (the top-level model) with ``policy``; :func:`dyvte.withdraw` builds both from its
        arguments."""
        if not isinstance(policy, ExitPolicy):
            raise TypeError(
                f"Withdrawal needs an ExitPolicy, got {type(policy).__name__} (use dyvte.withdraw(model, layer=K))"
            )
        self.spec: ModelSpec = resolve(model)
        self.policy = policy
        policy.bind(self.spec)
        self.exit_layers: torch.Tensor | None = None
        self.output_positions: torch.Tensor | None = None
        self._fwd: ForwardState | None = None
        self._exits: list[int] = []  # host: each row's exit layer in the last new sequence
        self._plan: dict[int, list[int]] = {}  # host: layer -> rows leaving there, for continuations
        self._exits_planned = True  # the last new sequence's exits were planned on the host
        self._layouts: dict[tuple[bool, ...], _GroupLayout] = {}
        self._cache_ref: weakref.ref | None = None
        self._cache_resets = 0
        self._columns = 0
        self._last_tokens = 0
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._ids_on: dict[torch.device, torch.Tensor] = {}
        device = getattr(self.spec.model, "device", None)
        if isinstance(device, torch.device):  # copied here, not in the first prefill
            self._visual_ids(device)
        self._undo_masks: Any = None
        self._unwrap: list[Any] = []  # undoes of the wrapped layer forwards
        self._pending: tuple[nn.Module, list[RowGroup]] | None = None  # groups of the layer call about to run
        self._attach()

    # ----------------------------------------------------------------------------------------------- lifecycle
    @property
    def model(self) -> nn.Module:
        """The hooked top-level model."""
        return self.spec.model

    @property
    def layer(self) -> int | None:
        """The static exit layer K (``None`` when a per-row or run-time policy decides)."""
        return self.policy.layer

    @property
    def earliest_exit(self) -> int:
        """The smallest layer at which a row may leave (layers before it are never hooked)."""
        return self.policy.earliest_exit()

    @property
    def state(self) -> ForwardState | None:
        """The state of the top-level call in progress (``None`` between calls)."""
        return self._fwd

    @property
    def visual_after(self) -> torch.Tensor | None:
        """``(B,)`` visual tokens per row that stay after the exit (FastV), or ``None``."""
        return self.policy.visual_after

    def _attach(self) -> None:
        top = self.spec.model
        if active_withdrawal(top) is not None:
            raise WithdrawalError(
                "this model already has an active dyvte withdrawal; remove it (handle.remove() or leave its "
                "`with` block) before withdrawing again"
            )
        # the top-level hooks keep the host bookkeeping (counts, plans, the cache's identity): under torch.compile
        # they run eagerly, so the compiled decode step never reads a host count that changes from step to step
        pre, post = torch.compiler.disable(self._pre_forward), torch.compiler.disable(self._post_forward)
        self._hooks.append(top.register_forward_pre_hook(pre, with_kwargs=True))
        self._hooks.append(top.register_forward_hook(post, with_kwargs=True))
        for index in range(self.earliest_exit, self.spec.num_layers):
            hook = self._make_layer_hook(index)
            self._hooks.append(self.spec.layers[index].register_forward_pre_hook(hook, with_kwargs=True))
        if self.spec.family.deepstack:  # docs/design.md §4, "DeepStack"
            self._hooks.append(self.spec.decoder.register_forward_pre_hook(self._take_deepstack, with_kwargs=True))
            for index in range(self.spec.deepstack_layers):  # only the layers after which features are added
                self._hooks.append(self.spec.layers[index].register_forward_hook(self._make_deepstack_hook(index)))
        self._hooks.extend(self.policy.attach(self))
        if self.policy.layer is None:  # rows may leave at different layers: their layers may run grouped
            for index in range(self.earliest_exit, self.spec.num_layers):
                layer = self.spec.layers[index]
                self._unwrap.append(wrap_forward(layer, self._take_groups, self.spec.names.layer_cache))
        # static caches: generate passes the 2-D mask (padded to the cache in decode steps), not 4-D ones
        self._undo_masks = keep_2d_masks(top, pad=lambda: getattr(top, PRUNING_ATTR, None) is None)
        setattr(top, HANDLE_ATTR, self)

    def remove(self) -> None:
        """Remove every hook; the model is exactly as before. Safe to call twice."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for undo in self._unwrap:
            undo()
        self._unwrap.clear()
        self._pending = None
        if self._undo_masks is not None:
            self._undo_masks()
            self._undo_masks = None
        top = self.spec.model
        if active_withdrawal(top) is self:
            delattr(top, HANDLE_ATTR)
        self._fwd = None
        if self._layouts:  # some row withdrew: the cache it filled is unusable without this handle
            seal_cache(
                self._cache_ref() if self._cache_ref is not None else None,
                WithdrawalError(
                    "this KV cache was filled under dyvte.withdraw (layers >= K hold only the kept tokens) and its "
                    "handle has been removed: decode under the same handle (inside its `with` block, or before "
                    "handle.remove()), or prefill again without withdrawal"
                ),
            )
        self._layouts.clear()

    def __enter__(self) -> Withdrawal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ---------------------------------------------------------------------------------------------- top hooks
    def _visual_ids(self, device: torch.device) -> torch.Tensor:
        """The visual placeholder ids on ``device``, copied once per device (a copy per call would sync)."""
        ids = self._ids_on.get(device)
        if ids is None:
            ids = self._ids_on[device] = self.spec.visual_ids.to(device)
        return ids

    def _is_new_sequence(self, cache: Any) -> bool:
        """Whether a call with ``cache`` starts a sequence, without reading device memory for a known cache."""
        if cache is None:
            return True
        known = self._cache_ref() if self._cache_ref is not None else None
        resets = cache_resets(cache)
        if known is cache:
            return resets != self._cache_resets  # generate() resets and reuses a static cache: a new prompt
        if cache_length_host(cache) == 0:  # a cache never seen: a fresh one is empty (read on the host)
            return True
        raise WithdrawalError(
            "the KV cache passed in was not produced under this withdrawal handle: its layers >= K hold a "
            "different token set. Prefill and decode under the same `withdraw(...)`."
        )

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        visual_mask = kwargs.pop("visual_mask", None)
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
            visual = torch.isin(input_ids, self._visual_ids(device))
        else:
            raise WithdrawalError(
                "inputs_embeds without input_ids: dyvte cannot tell which positions are visual. Pass "
                "visual_mask=<(B, T) bool tensor> to the model call (the withdrawal hook consumes it)."
            )
        past_cache = cache_in(kwargs, self.spec.names.cache)
        new_sequence = self._is_new_sequence(past_cache)
        if new_sequence and past_cache is not None and (reason := check_cache(past_cache)) is not None:
            raise WithdrawalError(f"withdrawal: {reason}")
        past = 0 if new_sequence else self._columns
        attention_2d = kwargs.get(ATTENTION_MASK)
        if isinstance(attention_2d, torch.Tensor) and attention_2d.dim() == 2:
            padded = not new_sequence and attention_2d.shape[1] == cache_capacity(past_cache)  # see keep_2d_masks
            if attention_2d.shape != (batch, past + num_tokens) and not (padded and attention_2d.shape[0] == batch):
                raise WithdrawalError(
                    f"attention_mask has shape {tuple(attention_2d.shape)}, expected "
                    f"{(batch, past + num_tokens)} (past {past} + current {num_tokens} columns)"
                )
            valid = attention_2d[:, past : past + num_tokens].bool()
        elif attention_2d is None:
            valid = torch.ones(batch, num_tokens, dtype=torch.bool, device=device)
        else:
            shape = tuple(attention_2d.shape) if isinstance(attention_2d, torch.Tensor) else type(attention_2d).__name__
            raise WithdrawalError(
                f"withdrawal needs the 2-D padding attention_mask (batch, columns) or none, got {shape}: dyvte "
                "builds each layer's mask itself from the tokens that remain; pass the processor's 2-D mask"
            )
        kind = self.spec.attn_implementation_now()
        if kind not in ("sdpa", "eager"):
            raise WithdrawalError(f"attention implementation {kind!r} is not supported; use 'sdpa' or 'eager'")
        if not new_sequence and len(self._exits) != batch:
            raise WithdrawalError("batch size changed between prefill and decode")
        fwd = ForwardState(
            batch=batch,
            num_tokens=num_tokens,
            past=past,
            visual=visual,
            valid=valid,
            attention_2d=attention_2d,
            kind=kind,
            new_sequence=new_sequence,
            input_ids=input_ids,
            use_cache=kwargs.get(USE_CACHE) is not False,
            exited=[False] * batch,
            cols=torch.arange(past, past + num_tokens, device=device),
        )
        self.policy.start(fwd, kwargs)
        if new_sequence:
            self._layouts.clear()
            self._exits, self._plan = self._plan_exits(fwd)
        fwd.plan = self._plan if (not new_sequence or self._exits_planned) else None  # None: decide at run time
        if self._may_shorten(fwd):
            fwd.kept = self._kept_counts(fwd)
        if "labels" in kwargs and kwargs["labels"] is not None and self.earliest_exit < self.spec.num_layers:
            fwd.labels = kwargs.pop("labels")  # the loss is computed on the kept positions in _post_forward
        self._fwd = fwd
        return args, kwargs

    def _plan_exits(self, fwd: ForwardState) -> tuple[list[int], dict[int, list[int]]]:
        """Each row's exit layer (host) and the rows leaving at each layer, for a new sequence."""
        num_layers = self.spec.num_layers
        planned = self.policy.planned_exits(fwd)
        self._exits_planned = planned is not None
        if planned is None:
            return [num_layers] * fwd.batch, {}
        if len(planned) != fwd.batch:
            raise WithdrawalError(f"the exit policy planned {len(planned)} rows, the batch has {fwd.batch}")
        plan: dict[int, list[int]] = {}
        for row, layer in enumerate(planned):
            if layer < num_layers:
                plan.setdefault(layer, []).append(row)
        return list(planned), plan

    def _may_shorten(self, fwd: ForwardState) -> bool:
        """Whether a row can lose tokens in this call (else no count is read)."""
        if fwd.num_tokens == 1:
            return False  # a decode step: the final token always stays
        if fwd.new_sequence and not self._exits_planned:
            return self.earliest_exit < self.spec.num_layers
        return bool(fwd.plan)

    def _kept_counts(self, fwd: ForwardState) -> list[int]:
        """Per row, the tokens a leaving row keeps: the one host read of a call that can shorten rows."""
        valid, visual = fwd.valid, fwd.visual
        extra = ~valid[:, -1] | visual[:, -1]  # (B,) the final token stays even if padding or visual
        stats = torch.stack([(valid & ~visual).sum(1), (valid & visual).sum(1), extra.long()], 1)  # (B, 3)
        return self.policy.kept_tokens(stats.tolist(), fwd)

    def _post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        fwd, self._fwd = self._fwd, None
        self._pending = None
        if fwd is None:
            return output
        self.output_positions = fwd.idx
        self._last_tokens = fwd.num_tokens
        if fwd.new_sequence:
            self.exit_layers = torch.tensor(self._exits, dtype=torch.long)
            if not self._exits_planned:  # run-time exits are fixed now: continuations replay them
                self._plan = {}
                for row, layer in enumerate(self._exits):
                    if layer < self.spec.num_layers:
                        self._plan.setdefault(layer, []).append(row)
        cache = cache_out(output, self.spec.names.cache)
        if cache is not None and fwd.use_cache:
            for key, width in fwd.written.items():
                self._layouts[key].commit(width)
            self._cache_ref = weakref.ref(cache)
            self._cache_resets = cache_resets(cache)
            self._columns = fwd.past + fwd.num_tokens
        else:
            self._layouts.clear()
            self._cache_ref = None
        if fwd.labels is not None:
            output["loss"] = self._loss(logits_of(output), fwd.labels)
        return output

    # ----------------------------------------------------------------------------------------------- DeepStack
    def _take_deepstack(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Text-decoder pre-hook (DeepStack families): take the visual features it would add after its first
        layers out of its call; the layer hooks add them to the visual tokens still present instead.

        The decoder adds ``features[j]`` to the hidden states at its visual positions after layer ``j`` with a
        ``(B, T)`` mask, which no longer fits once a row has withdrawn its visual tokens (docs/design.md §4).
        """
        embeds = kwargs.get(DEEPSTACK_EMBEDS)
        fwd = self._fwd
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

    def _make_deepstack_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            fwd = self._fwd
            if fwd is None or fwd.deepstack is None or index >= len(fwd.deepstack[2]):
                return None
            if isinstance(output, torch.Tensor):
                return self._add_deepstack(fwd, output, *fwd.deepstack, index)
            return (self._add_deepstack(fwd, output[0], *fwd.deepstack, index), *output[1:])

        return hook

    def _add_deepstack(
        self,
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

    # --------------------------------------------------------------------------------------------- layer hooks
    def _make_layer_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            out = self._pre_layer(index, args, kwargs)
            fwd = self._fwd
            # a recurrent layer's state has no per-group capture: it runs on the whole batch (the same outputs)
            grouped = fwd is not None and fwd.key is not None and not self._is_linear(index)
            groups = self._row_groups(fwd) if grouped else None
            self._pending = None if groups is None else (module, groups)  # collected by the wrapped forward
            return out

        return hook

    def _take_groups(self, module: nn.Module) -> list[RowGroup] | None:
        """The groups the pre-hook of ``module`` left for its call (consumed), or ``None``."""
        pending = self._pending
        if pending is None or pending[0] is not module:
            return None
        self._pending = None
        return pending[1]

    def _row_groups(self, fwd: ForwardState) -> list[RowGroup] | None:
        """The groups of rows the current layer runs as, or ``None`` to run the whole batch at once.

        Grouped only in a prefill (a new sequence: the cache layer is empty, see :mod:`dyvte.engine.grouping`) where
        some
        rows left and some are still in, when the rows that left are narrower than the combined layout. Host work
        only; memoised per exit set.
        """
        key = fwd.key
        if key in fwd.groups:
            return fwd.groups[key]
        groups = None
        kept = fwd.kept
        if self.grouped and fwd.new_sequence and fwd.idx is not None and kept is not None and not all(fwd.exited):
            if not self.policy.keeps_visual:  # FastV's kept visual tokens keep the model's own pairs: one group
                left = [row for row in range(fwd.batch) if fwd.exited[row]]
                narrow = max(kept[row] for row in left)  # the rows that left fit in the last `narrow` slots
                if left and narrow < fwd.width:
                    device = fwd.idx.device
                    staying = [row for row in range(fwd.batch) if not fwd.exited[row]]
                    groups = [
                        RowGroup(row_index(staying, device), 0),
                        RowGroup(row_index(left, device), fwd.width - narrow),
                    ]
        fwd.groups[key] = groups
        return groups

    def _leaving(self, index: int, hidden: torch.Tensor, fwd: ForwardState) -> list[int]:
        """Rows leaving at layer ``index`` in this call (host; no tensor work where no row can leave)."""
        if fwd.plan is not None:
            return fwd.plan.get(index, [])
        if all(fwd.exited):
            return []
        decision = self.policy.decide(index, hidden, fwd).tolist()  # the one read of a run-time layer
        rows = [row for row in range(fwd.batch) if decision[row] and not fwd.exited[row]]
        for row in rows:
            self._exits[row] = index
        return rows

    def _pre_layer(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        fwd = self._fwd
        if fwd is None:
            raise WithdrawalError(
                "a hooked decoder layer ran outside a call of the top-level model; call the "
                "model returned by from_pretrained (forward or generate)"
            )
        hidden = args[0] if args else kwargs[HIDDEN_STATES]  # (B, T_cur, D)
        rows = self._leaving(index, hidden, fwd)
        if rows:
            hidden = self._exit(fwd, hidden, rows)
        if fwd.key is None:
            return None  # no row has left yet: the model's own mask and positions are right
        kwargs = dict(kwargs)
        if self._is_linear(index):
            kwargs[ATTENTION_MASK] = self._linear_mask(fwd, hidden.dtype)
        else:
            kwargs[ATTENTION_MASK] = self._mask(
                index, fwd, kwargs.get(self.spec.names.layer_cache), hidden.dtype, kwargs.get(ATTENTION_MASK)
            )
        if fwd.idx is not None:
            kwargs[POSITION_EMBEDDINGS] = self._rotary(fwd, kwargs.get(POSITION_EMBEDDINGS))
            position_ids = kwargs.get(POSITION_IDS)
            if isinstance(position_ids, torch.Tensor) and position_ids.shape[-1] == fwd.num_tokens:
                kwargs[POSITION_IDS] = take(position_ids, fwd.idx, -1)
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs[HIDDEN_STATES] = hidden
        return args, kwargs

    def _is_linear(self, index: int) -> bool:
        """Whether decoder layer ``index`` is a linear-attention (recurrent) layer (Qwen3.5's Gated DeltaNet)."""
        linear = self.spec.linear_attention
        return bool(linear) and linear[index]

    def _linear_mask(self, fwd: ForwardState, dtype: torch.dtype) -> torch.Tensor:
        """The 2-D padding mask of a linear-attention layer over the current layout: ``(B, T')``, 1 on valid slots.

        A Gated DeltaNet layer multiplies its input by this mask (transformers' ``apply_mask_to_padding_states``), so
        padding slots enter its convolution and recurrence as zeros and leave its state untouched: the layer then
        processes exactly the kept sequence of each row (docs/design.md, "Withdrawal on linear-attention layers").
        Memoised per layout; no host read.
        """
        memo = ("linear", fwd.key, dtype)
        mask = fwd.masks.get(memo)
        if mask is None:
            _, valid = self._slots(fwd)
            mask = fwd.masks[memo] = valid.to(dtype)
        return mask

    def _exit(self, fwd: ForwardState, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Withdraw ``rows``: drop their droppable and padding tokens from ``hidden`` (in the current layout)."""
        if fwd.exited_rows is None:
            fwd.exited_rows = torch.zeros(fwd.batch, dtype=torch.bool, device=hidden.device)
        for row in rows:  # a fill per row: no host-to-device copy (which would sync on an accelerator)
            fwd.exited[row] = True
            fwd.exited_rows[row] = True
        num_tokens = fwd.num_tokens
        kept = fwd.kept
        if kept is not None and any(kept[row] < num_tokens for row in rows):  # decided on the host
            drop = (self.policy.droppable(fwd) | ~fwd.valid) & fwd.exited_rows[:, None]  # (B, T)
            drop[:, -1] = False  # the final token always stays: the next-token logits are read there
            width = max(kept[row] if fwd.exited[row] else num_tokens for row in range(fwd.batch))
            idx = pack_right(~drop, width)  # (B, T')
            hidden = take(hidden, compose(fwd.idx, idx, num_tokens), 1)
            fwd.idx, fwd.width = idx, width
        fwd.key = tuple(fwd.exited)
        fwd.masks.clear()
        fwd.rotary.clear()
        return hidden

    def _slots(self, fwd: ForwardState) -> tuple[torch.Tensor, torch.Tensor]:
        """Original columns and validity of this call's slots in the current layout: two ``(B, T')`` tensors."""
        idx = fwd.idx
        if idx is None:  # no host int is read: a compiled decode step does not specialise on the position
            return fwd.cols.expand(fwd.batch, -1), fwd.valid
        return torch.where(idx >= 0, idx + fwd.past, -1), (idx >= 0) & fwd.valid.gather(1, idx.clamp(min=0))

    def _group(self, fwd: ForwardState, cache: Any) -> _GroupLayout:
        """The current group's layout, with this call's slots written after its committed ones (once per call)."""
        key = fwd.key
        group = self._layouts.get(key)
        if group is None:
            if not fwd.new_sequence:
                raise WithdrawalError(
                    "this decode step withdraws a set of rows the prefill never withdrew: the cache layout is unknown"
                )
            width = fwd.num_tokens if fwd.idx is None else fwd.width
            capacity = cache_capacity(cache)  # every layer pre-allocated to the same length, else None
            fixed = capacity is not None and capacity >= width
            group = _GroupLayout(fwd.batch, max(width, capacity or 0), fwd.valid.device, fixed=fixed)
            self._layouts[key] = group
        if key not in fwd.written:
            cols, valid = self._slots(fwd)
            group.write(cols, valid)
            fwd.written[key] = cols.shape[1]
        return group

    def _mask(
        self, index: int, fwd: ForwardState, cache: Any, dtype: torch.dtype, own: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The mask of layer ``index`` over the current layout; ``own`` is the one the model built for it."""
        layer_cache, _ = cache_layer(cache, index)
        group = self._group(fwd, cache)
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
        q_cols, q_valid = self._slots(fwd)
        mask = slot_mask(q_cols, q_valid, k_cols, k_valid, window=window, kind=fwd.kind, dtype=dtype)
        if self.policy.keeps_visual and fwd.new_sequence and fwd.idx is not None and isinstance(own, torch.Tensor):
            mask = self._add_own_pairs(fwd, mask, own)
        if not all(fwd.exited) and isinstance(own, torch.Tensor):
            # rows still holding every token have the identity layout: keep the model's own mask for them, which
            # may be more than causal (Gemma3 lets image tokens attend to each other both ways)
            if own.shape[-2:] != mask.shape[-2:]:
                raise WithdrawalError(f"layer {index}: the model's mask {tuple(own.shape)} does not fit the layout")
            staying = ~fwd.exited_rows
            mask = torch.where(staying[:, None, None, None], own.expand(mask.shape[0], *own.shape[1:]), mask)
        fwd.masks[memo] = mask
        return mask

    def _add_own_pairs(self, fwd: ForwardState, mask: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
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

    def _rotary(self, fwd: ForwardState, rotary: Any) -> Any:
        if rotary is None:
            return None
        memo = id(rotary[0])
        if memo not in fwd.rotary:
            fwd.rotary[memo] = tuple(take(t, fwd.idx, -2) for t in rotary)  # (B, T', d) each
        return fwd.rotary[memo]

    def repeat_rows(self, cache: Any, times: int) -> None:
        """Repeat every row of a cache prefilled under this handle ``times`` times, in place (row ``b`` becomes rows
        ``b * times .. b * times + times - 1``), with the handle's cache layouts and exits, so later decode steps run
        a batch ``times`` as large. Benchmarks use it to decode large batches without prefilling every row.

        Raises:
            WithdrawalError: ``cache`` is not the cache of this handle's last call, or ``times`` < 1.
        """
        if times < 1:
            raise WithdrawalError(f"repeat_rows needs times >= 1, got {times}")
        if self._cache_ref is None or self._cache_ref() is not cache:
            raise WithdrawalError("repeat_rows needs the cache this handle's last call returned")
        cache_repeat_rows(cache, times)
        layouts = {}
        for key, group in self._layouts.items():  # an exit set names its rows: repeat its entries too
            group.cols = group.cols.repeat_interleave(times, 0)
            group.valid = group.valid.repeat_interleave(times, 0)
            layouts[tuple(out for out in key for _ in range(times))] = group
        self._layouts = layouts
        self._exits = [layer for layer in self._exits for _ in range(times)]
        self._plan = {}
        for row, layer in enumerate(self._exits):
            if layer < self.spec.num_layers:
                self._plan.setdefault(layer, []).append(row)
        if self.exit_layers is not None:
            self.exit_layers = self.exit_layers.repeat_interleave(times)

    # ------------------------------------------------------------------------------------------------ outputs
    def to_input_positions(self, x: torch.Tensor, fill_value: float = 0.0) -> torch.Tensor:
        """Scatter a per-slot output of the last call back onto the input's token positions.

        Args:
            x: ``(B, T_x, ...)`` e.g. logits; its ``T_x`` slots are the *last* ``T_x`` output slots (as with
                ``logits_to_keep``).
            fill_value: value at input positions that have no output (withdrawn tokens).

        Returns:
            ``(B, T, ...)`` with ``T`` the input length of the last call.
        """
        if self.output_positions is None:
            return x
        pos = self.output_positions[:, -x.shape[1] :].to(x.device)  # (B, T_x)
        num_tokens = self._last_tokens
        out = x.new_full((x.shape[0], num_tokens + 1, *x.shape[2:]), fill_value)
        target = torch.where(pos >= 0, pos, num_tokens)  # padding slots go to a spare row
        out.index_put_((torch.arange(x.shape[0], device=x.device)[:, None], target), x)
        return out[:, :num_tokens]

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy on the kept positions (a position predicts the *input's* next token)."""
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]  # (B, T) target of each position
        idx = self.output_positions
        if idx is not None:
            idx = idx[:, -logits.shape[1] :]
            shifted = torch.where(idx >= 0, shifted.gather(1, idx.clamp(min=0)), -100)
        else:
            shifted = shifted[:, -logits.shape[1] :]
        return torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), shifted.flatten().to(logits.device), ignore_index=-100
        )
