"""The withdrawal engine's handle: hooks, the top-level call, exits and outputs, for any exit policy (docs/design.md
§1, §4).

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

The engine's pieces: :class:`Withdrawal` here (attach/remove, the top-level pre/post hooks, which rows leave at each
layer, outputs); :mod:`dyvte.engine.state` (the per-call :class:`~dyvte.engine.state.ForwardState`, the exit that
repacks it, and the cache layouts kept between calls); :mod:`dyvte.engine.masks` (a layer's mask, rotary tables and
position ids over the current layout); :mod:`dyvte.engine.grouping` (grouped execution after a mixed exit);
:mod:`dyvte.engine.deepstack` (Qwen3-VL's DeepStack features). A policy sees only a
:class:`dyvte.engine.policy.PolicyView`.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch import nn

from dyvte.engine.compat import (
    ATTENTION_MASK,
    HIDDEN_STATES,
    USE_CACHE,
    cache_in,
    cache_out,
    cache_repeat_rows,
    check_cache,
    generate_taking,
    keep_2d_masks,
    logits_of,
    seal_cache,
)
from dyvte.engine.deepstack import attach_deepstack
from dyvte.engine.grouping import Handoff, wrap_forward
from dyvte.engine.masks import LayerInputs
from dyvte.engine.policy import ExitPolicy, PolicyView
from dyvte.engine.registry import ModelSpec, resolve
from dyvte.engine.state import VISUAL_MASK, CacheLayouts, ForwardState, WithdrawalError, read_tokens, read_valid
from dyvte.utils.threads import PerThread

__all__ = ["Withdrawal", "WithdrawalError", "HANDLE_ATTR", "PRUNING_ATTR", "active_withdrawal"]

HANDLE_ATTR = "_dyvte_withdrawal"  # the top-level model's attribute naming its active withdrawal
PRUNING_ATTR = "_dyvte_pruning"  # ... and its active pruning before the LLM (which shortens the 2-D mask itself)


def active_withdrawal(model: nn.Module) -> Withdrawal | None:
    """The withdrawal handle active on ``model`` (the top-level model), or ``None``."""
    return getattr(model, HANDLE_ATTR, None)


def exit_plan(exits: list[int], num_layers: int) -> dict[int, list[int]]:
    """Layer -> the rows leaving there, from each row's exit layer (``num_layers``: never leaves)."""
    plan: dict[int, list[int]] = {}
    for row, layer in enumerate(exits):
        if layer < num_layers:
            plan.setdefault(layer, []).append(row)
    return plan


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

    # per-call state, kept per thread (docs/design.md §4, "Threads"): threads calling the model under one handle each
    # run their own prefill and decode steps, with their own exits and cache layouts
    exit_layers = PerThread()
    output_positions = PerThread()
    _fwd = PerThread()  # the call in progress
    _exits = PerThread(factory=lambda self: [])  # host: each row's exit layer in the last new sequence
    _plan = PerThread(factory=lambda self: {})  # host: layer -> rows leaving there, for continuations
    _exits_planned = PerThread(True)  # the last new sequence's exits were planned on the host
    _layouts = PerThread(factory=lambda self: self._new_layouts())  # the cache the calls filled, its layouts
    _inputs = PerThread(factory=lambda self: LayerInputs(self.spec, self._layouts, self.policy.keeps_visual))
    _last_tokens = PerThread(0)
    _prompt_visual = PerThread()  # generate(..., visual_mask=...): for its prefill

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
        # every thread's cache layouts (weakly: a finished thread's go with it), sealed when the handle is removed
        self._all_layouts: weakref.WeakSet[CacheLayouts] = weakref.WeakSet()
        self._all_lock = threading.Lock()
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._ids_on: dict[torch.device, torch.Tensor] = {}
        device = getattr(self.spec.model, "device", None)
        if isinstance(device, torch.device):  # copied here, not in the first prefill
            self._visual_ids(device)
        self._undo_masks: Any = None
        self._undo_generate: Any = None
        self._unwrap: list[Any] = []  # undoes of the wrapped layer forwards
        self._handoff = Handoff()  # the groups of the layer call about to run
        self._attach()

    # ----------------------------------------------------------------------------------------------- lifecycle
    @property
    def model(self) -> nn.Module:
        """The hooked top-level model."""
        return self.spec.model

    def _new_layouts(self) -> CacheLayouts:
        """A thread's first cache layouts, registered so that :meth:`remove` seals its caches too."""
        layouts = CacheLayouts()
        with self._all_lock:
            self._all_layouts.add(layouts)
        return layouts

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
    def policy_view(self) -> PolicyView | None:
        """What the policy may read of the call in progress, in its current layout (``None`` between calls); a
        policy's own hooks read it (FastV's ranking at layer K-1)."""
        return None if self._fwd is None else self._fwd.view()

    @property
    def visual_after(self) -> torch.Tensor | None:
        """``(B,)`` visual tokens per row that stay after the exit (FastV), or ``None``."""
        return self.policy.visual_after

    @property
    def shift_monitor(self) -> Any:
        """The policy's score monitor (learned exits: :class:`dyvte.policies.shift.ScoreMonitor`), or ``None``."""
        return self.policy.shift_monitor

    def shift_report(self, alpha: float = 0.01) -> Any:
        """Whether the exit scores seen so far by this handle look like the calibration records' (learned exits:
        a :class:`dyvte.policies.shift.ShiftReport` per head, with ``shifted`` at false-alarm rate ``alpha``);
        ``None`` for a policy with nothing to check. Reads the scores kept on the device (host syncs here, never in
        the forward)."""
        return self.policy.shift_report(alpha)

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
            self._hooks.extend(attach_deepstack(self.spec, lambda: self._fwd))
        self._hooks.extend(self.policy.attach(self))
        if self.policy.layer is None:  # rows may leave at different layers: their layers may run grouped
            for index in range(self.earliest_exit, self.spec.num_layers):
                layer = self.spec.layers[index]
                self._unwrap.append(wrap_forward(layer, self._handoff.take, self.spec.names.layer_cache))
        # static caches: generate passes the 2-D mask (padded to the cache in decode steps), not 4-D ones
        self._undo_masks = keep_2d_masks(top, pad=lambda: getattr(top, PRUNING_ATTR, None) is None)
        # generate(inputs_embeds=..., visual_mask=...): generate refuses a keyword its forward does not declare
        self._undo_generate = generate_taking(top, VISUAL_MASK, self._hold_prompt_visual)
        setattr(top, HANDLE_ATTR, self)

    def remove(self) -> None:
        """Remove every hook; the model is exactly as before. Safe to call twice."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for undo in self._unwrap:
            undo()
        self._unwrap.clear()
        self._handoff.clear()
        for undo in (self._undo_masks, self._undo_generate):
            if undo is not None:
                undo()
        self._undo_masks = self._undo_generate = None
        top = self.spec.model
        if active_withdrawal(top) is self:
            delattr(top, HANDLE_ATTR)
        self._fwd = None
        self._prompt_visual = None
        # every cache some row withdrew from (the last one and earlier ones, e.g. of an earlier generate in the
        # block) is unusable without this handle's layouts: the unhooked model would fail deep inside attention
        error = WithdrawalError(
            "this KV cache was filled under dyvte.withdraw (layers >= K hold only the kept tokens) and its handle has "
            "been removed: decode under the same handle (inside its `with` block, before its next prefill, or "
            "before handle.remove()), or prefill again without withdrawal"
        )
        with self._all_lock:
            every = list(self._all_layouts)
        for layouts in every:  # every thread's: a cache filled in another thread is as unusable
            for cache in layouts.withdrawn_caches():
                seal_cache(cache, error)
            layouts.forget()

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

    def _hold_prompt_visual(self, mask: torch.Tensor | None) -> None:
        """Keep the ``visual_mask`` given to ``generate`` for its first call, the prefill (``None``: it ended)."""
        self._prompt_visual = mask

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self._prompt_visual is not None:  # generate's first call is its prefill; decode steps read their ids
            kwargs.setdefault(VISUAL_MASK, self._prompt_visual)
            self._prompt_visual = None
        input_ids, visual = read_tokens(args, kwargs, self._visual_ids)
        batch, num_tokens = visual.shape
        past_cache = cache_in(kwargs, self.spec.names.cache)
        new_sequence = self._layouts.is_new_sequence(past_cache)
        if new_sequence and past_cache is not None and (reason := check_cache(past_cache)) is not None:
            raise WithdrawalError(f"withdrawal: {reason}")
        past = 0 if new_sequence else self._layouts.columns
        attention_2d = kwargs.get(ATTENTION_MASK)
        valid = read_valid(attention_2d, visual, past, None if new_sequence else past_cache)
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
            cols=torch.arange(past, past + num_tokens, device=visual.device),
        )
        self.policy.start(fwd.view(), kwargs)
        if new_sequence:
            self._layouts.groups.clear()
            self._exits, self._plan = self._plan_exits(fwd)
        fwd.plan = self._plan if (not new_sequence or self._exits_planned) else None  # None: decide at run time
        if self._may_shorten(fwd):  # per row, the tokens a leaving row keeps
            fwd.kept = self.policy.kept_tokens(fwd.token_counts(), fwd.view())
        if "labels" in kwargs and kwargs["labels"] is not None and self.earliest_exit < self.spec.num_layers:
            fwd.labels = kwargs.pop("labels")  # the loss is computed on the kept positions in _post_forward
        self._fwd = fwd
        return args, kwargs

    def _plan_exits(self, fwd: ForwardState) -> tuple[list[int], dict[int, list[int]]]:
        """Each row's exit layer (host) and the rows leaving at each layer, for a new sequence."""
        num_layers = self.spec.num_layers
        planned = self.policy.planned_exits(fwd.view())
        self._exits_planned = planned is not None
        if planned is None:
            return [num_layers] * fwd.batch, {}
        if len(planned) != fwd.batch:
            raise WithdrawalError(f"the exit policy planned {len(planned)} rows, the batch has {fwd.batch}")
        return list(planned), exit_plan(planned, num_layers)

    def _may_shorten(self, fwd: ForwardState) -> bool:
        """Whether a row can lose tokens in this call (else no count is read)."""
        if fwd.num_tokens == 1:
            return False  # a decode step: the final token always stays
        if fwd.new_sequence and not self._exits_planned:
            return self.earliest_exit < self.spec.num_layers
        return bool(fwd.plan)

    def _post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        fwd, self._fwd = self._fwd, None
        self._handoff.clear()
        if fwd is None:
            return output
        self.output_positions = fwd.idx
        self._last_tokens = fwd.num_tokens
        if fwd.new_sequence:
            self.exit_layers = torch.tensor(self._exits, dtype=torch.long)
            if not self._exits_planned:  # run-time exits are fixed now: continuations replay them
                self._plan = exit_plan(self._exits, self.spec.num_layers)
        self._layouts.commit(fwd, cache_out(output, self.spec.names.cache))
        if fwd.labels is not None:
            output["loss"] = kept_loss(logits_of(output), fwd.labels, self.output_positions)
        return output

    # --------------------------------------------------------------------------------------------- layer hooks
    def _make_layer_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            out = self._pre_layer(index, args, kwargs)
            fwd = self._fwd
            # a recurrent layer's state has no per-group capture: it runs on the whole batch (the same outputs)
            grouped = fwd is not None and fwd.key is not None and not self._inputs.is_linear(index)
            groups = fwd.row_groups(self.grouped and not self.policy.keeps_visual) if grouped else None
            self._handoff.put(module, groups)  # collected by the wrapped forward
            return out

        return hook

    def _leaving(self, index: int, hidden: torch.Tensor, fwd: ForwardState) -> list[int]:
        """Rows leaving at layer ``index`` in this call (host; no tensor work where no row can leave)."""
        if fwd.plan is not None:
            return fwd.plan.get(index, [])
        if all(fwd.exited):
            return []
        decision = self.policy.decide(index, hidden, fwd.view()).tolist()  # the one read of a run-time layer
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
            hidden = fwd.withdraw(hidden, rows, lambda: self.policy.droppable(fwd.view()))
        if fwd.key is None:
            return None  # no row has left yet: the model's own mask and positions are right
        kwargs = self._inputs.rewrite(index, fwd, kwargs, hidden.dtype)
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs[HIDDEN_STATES] = hidden
        return args, kwargs

    def repeat_rows(self, cache: Any, times: int) -> None:
        """Repeat every row of a cache prefilled under this handle ``times`` times, in place (row ``b`` becomes rows
        ``b * times .. b * times + times - 1``), with the handle's cache layouts and exits, so later decode steps run
        a batch ``times`` as large. Benchmarks use it to decode large batches without prefilling every row.

        Raises:
            WithdrawalError: ``cache`` is not the cache of this handle's last call, or ``times`` < 1.
        """
        if times < 1:
            raise WithdrawalError(f"repeat_rows needs times >= 1, got {times}")
        if cache is None or self._layouts.cache is not cache:
            raise WithdrawalError("repeat_rows needs the cache this handle's last call returned")
        cache_repeat_rows(cache, times)
        self._layouts.repeat_rows(times)
        self._exits = [layer for layer in self._exits for _ in range(times)]
        self._plan = exit_plan(self._exits, self.spec.num_layers)
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


def kept_loss(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """Mean next-token cross-entropy on the kept positions (a position predicts the *input's* next token).

    Args:
        logits: ``(B, T_x, V)`` the last ``T_x`` output slots' logits.
        labels: ``(B, T)`` the input's labels (``-100``: ignored).
        positions: ``(B, T_out)`` the input position of each output slot (``-1``: padding), or ``None`` when the
            output has the input's positions.
    """
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]  # (B, T) target of each position
    idx = positions
    if idx is not None:
        idx = idx[:, -logits.shape[1] :]
        shifted = torch.where(idx >= 0, shifted.gather(1, idx.clamp(min=0)), -100)
    else:
        shifted = shifted[:, -logits.shape[1] :]
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), shifted.flatten().to(logits.device), ignore_index=-100
    )
