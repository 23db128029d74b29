"""Visual-token withdrawal: after decoder layer K-1 the visual tokens leave the residual stream.

Layer-index convention (used everywhere in dyvte): **exit layer K** means layers ``0..K-1`` see every token and layers
``K..L-1`` see only the kept tokens. ``K = 0`` withdraws before the first layer (text-only decoder), ``K = L`` never
withdraws. An exit head attached to layer ``k`` reads the output of layer ``k``; when it fires, the exit layer is
``k + 1``.

Mechanism: forward pre-hooks (with kwargs) on the unmodified HF modules. A hook on the top-level model reads the
visual positions from ``input_ids`` (or an explicit ``visual_mask``) and the 2-D attention mask; a hook on every
decoder layer from the first possible exit on replaces ``hidden_states`` (gathered to the kept tokens),
``attention_mask`` (causal/padding/sliding over kept tokens, built from their *original* columns),
``position_embeddings`` and ``position_ids`` (gathered, so rotary positions are the original ones). The KV cache of
layers >= K therefore holds kept tokens only; the handle remembers which original column each cache slot holds so
decode steps get correct masks.

What is kept at an exit, per row: every non-visual token whose attention-mask entry is 1, plus the row's final
token in any case (the next-token logits are read there). Padding columns are dropped with the visual tokens, so a
ragged batch shrinks to its longest kept row.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .compat import (
    ATTENTION_MASK,
    HIDDEN_STATES,
    INPUT_IDS,
    INPUTS_EMBEDS,
    POSITION_EMBEDDINGS,
    POSITION_IDS,
    USE_CACHE,
    cache_in,
    cache_layer,
    cache_length,
    cache_out,
    check_cache,
    seal_cache,
)
from .layout import build_attention_mask, compose, pack_right, take
from .registry import ModelSpec, resolve, unwrap

__all__ = ["Withdrawal", "withdraw", "WithdrawalError"]

logger = logging.getLogger(__name__)

_HANDLE_ATTR = "_dyvte_withdrawal"


class WithdrawalError(RuntimeError):
    """Withdrawal cannot proceed on these inputs or this state (the message says why)."""


@dataclass
class _CacheLayout:
    """Which original column each KV-cache slot of a group of layers holds (``-1`` for padding slots)."""

    cols: torch.Tensor  # (B, N)
    valid: torch.Tensor  # (B, N) bool


@dataclass
class _Forward:
    """State of one call of the top-level model."""

    batch: int
    num_tokens: int  # T, tokens of this call
    past: int  # P, columns already in the cache before this call
    visual: torch.Tensor  # (B, T) bool
    valid: torch.Tensor  # (B, T) bool, attention-mask entry of each token
    attention_2d: torch.Tensor | None  # (B, P + T) or None
    kind: str  # "sdpa" | "eager"
    new_sequence: bool
    exited: torch.Tensor  # (B,) bool, rows withdrawn so far in this call
    idx: torch.Tensor | None = None  # (B, T') current layout (None = identity)
    key: tuple[bool, ...] | None = None  # which rows are withdrawn in the current layout
    keys_seen: dict[tuple[bool, ...], torch.Tensor | None] = field(default_factory=dict)
    masks: dict[Any, torch.Tensor | None] = field(default_factory=dict)
    rotary: dict[Any, Any] = field(default_factory=dict)
    labels: torch.Tensor | None = None
    exit_set: frozenset[int] = frozenset()  # continuation: the layers some row leaves at (fixed at prefill)


class Withdrawal:
    """Handle of an active withdrawal on one model; a context manager. See :func:`withdraw`.

    Attributes:
        spec: the resolved model pieces.
        layer: the static exit layer K (``None`` when a per-row policy decides).
        exit_layers: ``(B,)`` long, the exit layer of each row in the last new sequence (prefill); ``L`` = never.
        output_positions: ``(B, T_out)`` long, for the last call: the input position of each output slot
            (``-1`` for padding slots), or ``None`` when the output has the input's positions.
    """

    _keeps_visual = False  # some visual tokens stay after an exit (FastV): see _add_own_pairs

    def __init__(self, model: nn.Module, layer: int | Sequence[int] | torch.Tensor | None = None) -> None:
        self.spec: ModelSpec = resolve(model)
        num_layers = self.spec.num_layers
        self._row_layers: torch.Tensor | None = None  # (B,) per-row static exit layers
        layer = _as_layer(layer)
        if isinstance(layer, torch.Tensor):
            rows = layer
            if rows.dim() != 1 or rows.numel() == 0 or rows.is_floating_point() or rows.dtype == torch.bool:
                raise TypeError(f"per-row layers must be a non-empty 1-D sequence of ints, got {rows.tolist()!r}")
            if bool((rows < 0).any()) or bool((rows > num_layers).any()):
                raise ValueError(f"per-row exit layers must be in [0, {num_layers}], got {rows.tolist()}")
            self._row_layers = rows.long().cpu()
            layer = None
        elif layer is not None:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise TypeError(f"layer must be an int in [0, {num_layers}], got {layer!r}")
            if not 0 <= layer <= num_layers:
                raise ValueError(
                    f"layer K={layer} is out of range: this model has L={num_layers} decoder layers, "
                    f"so K must be in [0, {num_layers}] (K = {num_layers} never withdraws)"
                )
        self.layer = layer
        self.exit_layers: torch.Tensor | None = None
        self.output_positions: torch.Tensor | None = None
        self._fwd: _Forward | None = None
        self._layouts: dict[tuple[bool, ...], _CacheLayout] = {}
        self._cache_ref: weakref.ref | None = None
        self._columns = 0
        self._last_tokens = 0
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._attach()

    # ----------------------------------------------------------------------------------------------- lifecycle
    @property
    def model(self) -> nn.Module:
        """The hooked top-level model."""
        return self.spec.model

    @property
    def first_exit(self) -> int:
        """The smallest layer at which a row may leave (layers before it are never hooked)."""
        if self._row_layers is not None:
            return int(self._row_layers.min())
        return self.layer if self.layer is not None else 1

    def _attach(self) -> None:
        top = self.spec.model
        if getattr(top, _HANDLE_ATTR, None) is not None:
            raise WithdrawalError(
                "this model already has an active dyvte withdrawal; remove it (handle.remove() or leave its "
                "`with` block) before withdrawing again"
            )
        self._hooks.append(top.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        self._hooks.append(top.register_forward_hook(self._post_forward, with_kwargs=True))
        for index in range(self.first_exit, self.spec.num_layers):
            hook = self._make_layer_hook(index)
            self._hooks.append(self.spec.layers[index].register_forward_pre_hook(hook, with_kwargs=True))
        setattr(top, _HANDLE_ATTR, self)

    def remove(self) -> None:
        """Remove every hook; the model is exactly as before. Safe to call twice."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        top = self.spec.model
        if getattr(top, _HANDLE_ATTR, None) is self:
            delattr(top, _HANDLE_ATTR)
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

    # --------------------------------------------------------------------------------------------- exit policy
    def _decide(self, layer: int, hidden: torch.Tensor, fwd: _Forward) -> torch.Tensor:
        """Rows that leave at ``layer`` in a new sequence: ``(B,)`` bool. Static: every row at K (or its own K)."""
        if self._row_layers is not None:
            return (self._row_layers == layer).to(hidden.device)
        return torch.full((fwd.batch,), layer == self.layer, dtype=torch.bool, device=hidden.device)

    def _droppable(self, fwd: _Forward) -> torch.Tensor:
        """``(B, T)`` bool: this call's tokens that leave a row when it exits (visual tokens; subclasses narrow it)."""
        return fwd.visual

    def _exiting(self, layer: int, hidden: torch.Tensor, fwd: _Forward) -> torch.Tensor | None:
        """``(B,)`` bool rows leaving at ``layer`` in this call, or ``None`` when none can (no tensor work)."""
        if fwd.new_sequence:
            rows = self._decide(layer, hidden, fwd) & ~fwd.exited
            self.exit_layers = torch.where(rows.cpu(), layer, self.exit_layers)
            return rows
        if layer not in fwd.exit_set:  # decode hot path: a set lookup per layer, no tensor op or host sync
            return None
        return (self.exit_layers == layer).to(hidden.device)  # continuation: exits fixed at prefill

    # ---------------------------------------------------------------------------------------------- top hooks
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
            visual = torch.isin(input_ids, self.spec.visual_ids.to(device))
        else:
            raise WithdrawalError(
                "inputs_embeds without input_ids: dyvte cannot tell which positions are visual. Pass "
                "visual_mask=<(B, T) bool tensor> to the model call (the withdrawal hook consumes it)."
            )
        past_cache = cache_in(kwargs, self.spec.names.cache)
        new_sequence = past_cache is None or cache_length(past_cache) == 0
        if new_sequence and past_cache is not None and (reason := check_cache(past_cache)) is not None:
            raise WithdrawalError(f"withdrawal: {reason}")
        if not new_sequence:
            known = self._cache_ref() if self._cache_ref is not None else None
            if known is not past_cache:
                raise WithdrawalError(
                    "the KV cache passed in was not produced under this withdrawal handle: its layers >= K hold a "
                    "different token set. Prefill and decode under the same `withdraw(...)`."
                )
        past = 0 if new_sequence else self._columns
        attention_2d = kwargs.get(ATTENTION_MASK)
        if isinstance(attention_2d, torch.Tensor) and attention_2d.dim() == 2:
            if attention_2d.shape != (batch, past + num_tokens):
                raise WithdrawalError(
                    f"attention_mask has shape {tuple(attention_2d.shape)}, expected "
                    f"{(batch, past + num_tokens)} (past {past} + current {num_tokens} columns)"
                )
            valid = attention_2d[:, past:].to(device=device, dtype=torch.bool)
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
        if self._row_layers is not None and self._row_layers.shape[0] != batch:
            raise WithdrawalError(
                f"per-row exit layers were given for {self._row_layers.shape[0]} rows, the batch has {batch}"
            )
        if new_sequence:
            self._layouts.clear()
            self.exit_layers = torch.full((batch,), self.spec.num_layers, dtype=torch.long)
        elif self.exit_layers is None or self.exit_layers.shape[0] != batch:
            raise WithdrawalError("batch size changed between prefill and decode")
        fwd = _Forward(
            batch=batch,
            num_tokens=num_tokens,
            past=past,
            visual=visual,
            valid=valid,
            attention_2d=attention_2d,
            kind=kind,
            new_sequence=new_sequence,
            exited=torch.zeros(batch, dtype=torch.bool, device=device),
            exit_set=frozenset() if new_sequence else frozenset(self.exit_layers.tolist()),
        )
        if "labels" in kwargs and kwargs["labels"] is not None and self.first_exit < self.spec.num_layers:
            fwd.labels = kwargs.pop("labels")  # the loss is computed on the kept positions in _post_forward
        self._fwd = fwd
        return args, kwargs

    def _post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        fwd, self._fwd = self._fwd, None
        if fwd is None:
            return output
        self.output_positions = fwd.idx
        self._last_tokens = fwd.num_tokens
        cache = cache_out(output, self.spec.names.cache)
        if cache is not None and kwargs.get(USE_CACHE, True) is not False:
            for key, idx in fwd.keys_seen.items():
                cols, valid = self._current_slots(fwd, idx)
                old = self._layouts.get(key)
                if old is not None:
                    cols, valid = torch.cat([old.cols, cols], 1), torch.cat([old.valid, valid], 1)
                self._layouts[key] = _CacheLayout(cols, valid)
            self._cache_ref = weakref.ref(cache)
            self._columns = fwd.past + fwd.num_tokens
        else:
            self._layouts.clear()
            self._cache_ref = None
        if fwd.labels is not None:
            output["loss"] = self._loss(output.logits, fwd.labels)
        return output

    # --------------------------------------------------------------------------------------------- layer hooks
    def _make_layer_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            return self._pre_layer(index, args, kwargs)

        return hook

    def _pre_layer(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        fwd = self._fwd
        if fwd is None:
            raise WithdrawalError(
                "a hooked decoder layer ran outside a call of the top-level model; call the "
                "model returned by from_pretrained (forward or generate)"
            )
        hidden = args[0] if args else kwargs[HIDDEN_STATES]  # (B, T_cur, D)
        rows = self._exiting(index, hidden, fwd)
        if rows is not None and bool(rows.any()):
            fwd.exited |= rows
            hidden = self._repack(fwd, hidden)
        if fwd.key is None:
            return None  # no row has left yet: the model's own mask and positions are right
        kwargs = dict(kwargs)
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

    def _repack(self, fwd: _Forward, hidden: torch.Tensor) -> torch.Tensor:
        """Drop the exited rows' visual and padding tokens from ``hidden`` (in the current layout)."""
        drop = (self._droppable(fwd) | ~fwd.valid) & fwd.exited[:, None]  # (B, T)
        drop[:, -1] = False  # the final token always stays: the next-token logits are read there
        key = tuple(fwd.exited.tolist())
        if bool(drop.any()):
            idx = pack_right(~drop)  # (B, T')
            hidden = take(hidden, compose(fwd.idx, idx, fwd.num_tokens), 1)
        else:
            idx = fwd.idx
        fwd.idx, fwd.key = idx, key
        fwd.keys_seen[key] = idx
        fwd.masks.clear()
        fwd.rotary.clear()
        return hidden

    def _current_slots(self, fwd: _Forward, idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Original columns and validity of this call's slots in layout ``idx``: two ``(B, T')`` tensors."""
        device = fwd.valid.device
        if idx is None:
            idx = torch.arange(fwd.num_tokens, device=device).expand(fwd.batch, -1)
        cols = torch.where(idx >= 0, idx + fwd.past, -1)
        valid = (idx >= 0) & fwd.valid.gather(1, idx.clamp(min=0))
        return cols, valid

    def _mask(
        self, index: int, fwd: _Forward, cache: Any, dtype: torch.dtype, own: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The mask of layer ``index`` over the current layout; ``own`` is the one the model built for it."""
        layer_cache, cache_window = cache_layer(cache, index)
        window = self.spec.sliding_window[index]
        memo = (window, cache_window, layer_cache is None, id(own))
        if memo in fwd.masks:
            return fwd.masks[memo]
        q_cols, q_valid = self._current_slots(fwd, fwd.idx)
        k_cols, k_valid = q_cols, q_valid
        past = self._layouts.get(fwd.key) if not fwd.new_sequence else None
        if past is not None and layer_cache is not None:
            cached = cache_length(layer_cache)
            expected = past.cols.shape[1]
            if cached != expected:
                raise WithdrawalError(
                    f"KV cache of layer {index} holds {cached} tokens where this withdrawal "
                    f"put {expected}: the cache was modified outside dyvte"
                )
            p_cols, p_valid = past.cols, past.valid
            if fwd.attention_2d is not None:  # the caller's current mask decides which past columns count
                p_valid = p_valid & fwd.attention_2d.gather(1, p_cols.clamp(min=0)).bool()
            if cache_window is not None:  # a sliding cache returns only its last window-1 entries
                p_cols, p_valid = p_cols[:, -(cache_window - 1) :], p_valid[:, -(cache_window - 1) :]
            k_cols, k_valid = torch.cat([p_cols, q_cols], 1), torch.cat([p_valid, q_valid], 1)
        mask = build_attention_mask(q_cols, q_valid, k_cols, k_valid, window=window, kind=fwd.kind, dtype=dtype)
        if self._keeps_visual and fwd.new_sequence and fwd.idx is not None and isinstance(own, torch.Tensor):
            mask = self._add_own_pairs(fwd, mask, own, dtype)
        staying = ~fwd.exited
        if bool(staying.any()) and isinstance(own, torch.Tensor):
            # rows still holding every token have the identity layout: keep the model's own mask for them, which
            # may be more than causal (Gemma3 lets image tokens attend to each other both ways)
            if mask is None:
                mask = torch.ones_like(own, dtype=torch.bool).tril(own.shape[-1] - own.shape[-2])
                mask = mask if fwd.kind == "sdpa" else torch.zeros_like(own).masked_fill_(~mask, torch.finfo(dtype).min)
            if own.shape[-2:] != mask.shape[-2:]:
                raise WithdrawalError(f"layer {index}: the model's mask {tuple(own.shape)} does not fit the layout")
            mask = torch.where(staying[:, None, None, None], own.expand(mask.shape[0], *own.shape[1:]), mask)
        fwd.masks[memo] = mask
        return mask

    def _add_own_pairs(
        self, fwd: _Forward, mask: torch.Tensor | None, own: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor | None:
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
        extra = (pairs & ok[:, :, None] & ok[:, None, :] & fwd.exited[:, None, None])[:, None]  # (B, 1, T', T')
        if mask is None:  # SDPA's implicit causal mask, made explicit
            mask = torch.ones(extra.shape[-2:], dtype=torch.bool, device=extra.device).tril().expand_as(extra)
        if mask.dtype == torch.bool:
            return mask | extra
        return mask.masked_fill(extra, 0.0)

    def _rotary(self, fwd: _Forward, rotary: Any) -> Any:
        if rotary is None:
            return None
        memo = id(rotary[0])
        if memo not in fwd.rotary:
            fwd.rotary[memo] = tuple(take(t, fwd.idx, -2) for t in rotary)  # (B, T', d) each
        return fwd.rotary[memo]

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


def _as_layer(layer: Any) -> Any:
    """A K (int) from ints, 0-d tensors and numpy scalars; a per-row ``(B,)`` tensor from 1-D sequences/arrays."""
    if isinstance(layer, bool) or layer is None or isinstance(layer, int):
        return layer
    if isinstance(layer, torch.Tensor) or hasattr(layer, "__array__") or isinstance(layer, (list, tuple)):
        try:
            value = torch.as_tensor(layer)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"layer must be an int K or a 1-D sequence of per-row ints, got {layer!r}") from err
        if value.dim() == 0:  # torch.tensor(3), np.int64(3), np.array(3): one K
            if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
                raise TypeError(f"layer must be an int K, got {layer!r}")
            return int(value)
        return value
    return layer


def withdraw(
    model: nn.Module,
    layer: int | Sequence[int] | torch.Tensor | None = None,
    *,
    calibration: Any = None,
    heads: Any = None,
    threshold: float | None = None,
) -> Withdrawal:
    """Withdraw every visual token of every row after decoder layer ``layer - 1`` (VTW).

    Usable as a context manager or kept as a handle (``handle.remove()`` restores the model exactly)::

        with dyvte.withdraw(model, layer=16):
            out = model.generate(**inputs)

    Args:
        model: a supported transformers ``...ForConditionalGeneration`` model (see ``dyvte.supported_model_types()``).
        layer: exit layer K in ``[0, L]``; ``0`` withdraws before the first layer, ``L`` never withdraws. A 1-D
            sequence gives each row of the batch its own exit layer (the batch size must then match).
        calibration: instead of ``layer``, a :class:`dyvte.Calibration` (or a path to its directory / JSON file):
            its chosen layer is used, after checking that it was made for this kind of model.
        heads: instead of ``layer``, :class:`dyvte.ExitHeads` made for this model: each row leaves after the first
            layer whose head gives P(exit) >= ``threshold``; ``handle.exit_layers`` holds the per-row layers of the
            last prefill (L = no head fired, nothing withdrawn). Decoding runs on the cache prefill left.
        threshold: P(exit) threshold for ``heads`` (default: the heads' saved threshold; > 1 never fires).

    Returns:
        The :class:`Withdrawal` handle.

    Under withdrawal ``forward`` returns logits for the kept slots only, right-aligned per row; the handle's
    ``output_positions`` (``-1`` = padding slot) and ``to_input_positions`` map them back to input positions.
    For ``inputs_embeds``-only calls pass ``visual_mask=`` (``(B, T)`` bool) to the model call.
    """
    model = unwrap(model)
    if sum(x is not None for x in (layer, calibration, heads)) > 1:
        raise TypeError("pass exactly one of layer=, calibration= or heads=")
    if heads is not None:
        from .heads import HeadsWithdrawal

        return HeadsWithdrawal(model, heads, threshold)
    if threshold is not None:
        raise TypeError("threshold= applies to heads= only")
    if calibration is not None:
        from .calibrate import Calibration

        if not isinstance(calibration, Calibration):
            calibration = Calibration.load(calibration)
        calibration.check_model(model)
        layer = calibration.layer
    if layer is None:
        raise TypeError("withdraw() needs layer=K, calibration= or heads=")
    return Withdrawal(model, layer=layer)
