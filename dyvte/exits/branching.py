"""Withdrawal at every exit layer K by branching off one full forward (docs/design.md, "Labels").

Withdrawal at exit layer K changes nothing before layer K: in the withdrawn forward, layers ``0..K-1`` see exactly the
inputs they saw in the full forward of the same batch, so they return exactly what they returned there.
:class:`Branches` records each decoder layer's return value in the full forward (a tensor from transformers 5.23 on,
or a tuple: kept as returned) and, in the withdrawn forward at K, swaps the ``forward`` of layers ``0..K-1`` for a
replay of that value. The layers' hooks still run (the engine's DeepStack add-back after the first layers, any hook of
the caller's), the engine handles layers ``K..L-1`` as always (masks, original rotary positions, linear attention),
and only those layers compute, on the visual-free sequence. The vision encoder is not run again either: the base
model's ``get_image_features`` / ``get_video_features`` return the full forward's result when called again with the
same arguments (the same tensors, unmodified), as :mod:`dyvte.pruning.before_llm` wraps them.

A withdrawn forward at K then costs the embeddings, masks and LM head plus ``L - K`` layers on the text tokens,
instead of ``K`` layers on the whole prompt plus that: labelling every K of a batch costs about two full forwards
instead of ``L + 1`` (``benchmarks/label_cost.py`` measures it).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dyvte.engine.compat import ENCODER_METHODS, LOGITS_TO_KEEP, logits_of
from dyvte.engine.registry import resolve
from dyvte.policies.withdraw import withdraw

__all__ = ["Branches", "EncoderMemo"]

_FORWARD = "forward"


def _swap(owner: nn.Module, name: str, value: Callable[..., Any]) -> Callable[[], None]:
    """Set ``owner.<name>`` to ``value`` as an instance attribute; returns the undo, which puts back exactly what the
    instance held (its own attribute, e.g. an accelerate wrapper, or none: the class's method shows through)."""
    own = vars(owner)
    had, previous = name in own, own.get(name)
    setattr(owner, name, value)

    def undo() -> None:
        if had:
            setattr(owner, name, previous)
        elif name in vars(owner):
            delattr(owner, name)

    return undo


class _Unkeyable(Exception):
    """An argument the memo cannot identify (the call goes through)."""


def _key(value: Any) -> Any:
    """A hashable identity of a call argument: a tensor by its storage, view and version (so the same unmodified
    tensor, or a view of it with the same layout, matches; an in-place change does not)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.data_ptr(), tuple(value.shape), value.stride(), value.dtype, str(value.device),
                value._version)  # fmt: skip
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_key(v) for v in value))
    raise _Unkeyable


class EncoderMemo:
    """The base model's vision-encoder methods (:data:`dyvte.engine.compat.ENCODER_METHODS`) answer a repeated call
    with the same arguments from memory; a context manager (or :meth:`remove`).

    The memo holds the arguments of every remembered call, so a matching tensor is the very same memory, unmodified
    since (its version counter is part of the key). Arguments it cannot identify make the call go through.

    Attributes:
        calls: calls of the wrapped methods; ``hits``: those answered from memory.
    """

    def __init__(self, model: nn.Module) -> None:
        self.calls = self.hits = 0
        self._entries: dict[tuple, tuple[tuple, dict, Any]] = {}
        self._undo: list[Callable[[], None]] = []
        base = model.base_model
        for name in ENCODER_METHODS:
            method = getattr(base, name, None)
            if callable(method):
                self._undo.append(_swap(base, name, self._wrap(name, method)))

    def _wrap(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def memo(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            try:
                key = (name, _key(args), tuple((k, _key(v)) for k, v in sorted(kwargs.items())))
            except _Unkeyable:
                return method(*args, **kwargs)
            entry = self._entries.get(key)
            if entry is not None:
                self.hits += 1
                return entry[2]
            result = method(*args, **kwargs)
            self._entries[key] = (args, kwargs, result)  # the arguments stay alive: no other tensor gets their memory
            return result

        return memo

    def remove(self) -> None:
        """Put the original methods back and forget every result. Safe to call twice."""
        while self._undo:
            self._undo.pop()()
        self._entries.clear()

    def __enter__(self) -> EncoderMemo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class Branches:
    """One full forward of a batch, then withdrawal at any exit layer K replaying its layers ``0..K-1``.

    Use as a context manager (the encoder memo is attached on entry and removed on exit, with everything recorded)::

        with Branches(model) as branches:
            out = branches.full(inputs, output_hidden_states=True)
            for layer in range(num_layers):
                logits = branches.withdrawn(layer)  # (B, T, V) at the input positions

    Outputs equal ``model(**inputs)`` and, under ``dyvte.withdraw(model, layer=K)``, ``to_input_positions`` of its
    logits: the replayed layers return what they computed in the full forward, given the same inputs.
    """

    def __init__(self, model: nn.Module) -> None:
        self.spec = resolve(model)
        self._memo: EncoderMemo | None = None
        self._inputs: dict[str, Any] | None = None
        self._kwargs: dict[str, Any] = {}
        self._outputs: list[Any] = []
        self._num_tokens = 0

    def _keeps_logits(self) -> bool:
        """Whether the model's forward takes ``logits_to_keep`` (then a withdrawn branch asked for its ``last``
        positions runs the LM head on its last ``last`` output slots only, which hold every one of them)."""
        return _accepts(self.model.forward, LOGITS_TO_KEEP)

    @property
    def model(self) -> nn.Module:
        """The top-level model."""
        return self.spec.model

    @property
    def encoder_memo(self) -> EncoderMemo | None:
        """The vision-encoder memo while the context is active (``None`` outside it)."""
        return self._memo

    def __enter__(self) -> Branches:
        self._memo = EncoderMemo(self.model)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._memo is not None:
            self._memo.remove()
            self._memo = None
        self._inputs, self._kwargs, self._outputs = None, {}, []

    def full(self, inputs: dict[str, Any], **kwargs: Any) -> Any:
        """The full forward ``model(**inputs, use_cache=False, **kwargs)``, recording every decoder layer's return
        value (later :meth:`withdrawn` calls branch off it, with the same ``inputs`` and ``kwargs``: the vision
        encoder sees the same call and answers from memory).

        Raises:
            RuntimeError: outside the ``with`` block, or a decoder layer did not run.
        """
        if self._memo is None:
            raise RuntimeError("Branches.full: use Branches inside a `with` block")
        layers = self.spec.layers
        outputs: list[Any] = [None] * len(layers)
        undo = [_swap(layer, _FORWARD, _recorder(layer.forward, outputs, j)) for j, layer in enumerate(layers)]
        kwargs = {"use_cache": False, **kwargs}
        try:
            out = self.model(**inputs, **kwargs)
        finally:
            for step in reversed(undo):
                step()
        missing = [j for j, value in enumerate(outputs) if value is None]
        if missing:
            raise RuntimeError(f"Branches.full: decoder layers {missing} did not run in the full forward")
        self._inputs, self._kwargs, self._outputs = inputs, kwargs, outputs
        self._num_tokens = int(logits_of(out).shape[1])
        return out

    def withdrawn(self, layer: int, last: int | None = None) -> torch.Tensor:
        """``(B, T, V)`` logits of the recorded batch under withdrawal at exit layer ``layer``, at its input positions
        (withdrawn positions hold 0, as ``handle.to_input_positions``); layers ``0..layer-1`` are replayed.

        Args:
            layer: the exit layer K in ``[0, L-1]``.
            last: return only the last ``last`` input positions, ``(B, last, V)`` (the same values; the ``(B, T, V)``
                tensor is never built).

        Raises:
            RuntimeError: no full forward recorded in this ``with`` block.
            ValueError: ``layer`` is not in ``[0, L-1]``, or ``last`` not in ``[1, T]``.
        """
        if self._inputs is None:
            raise RuntimeError("Branches.withdrawn: call Branches.full first (inside the same `with` block)")
        num_layers = self.spec.num_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ValueError(f"Branches.withdrawn: exit layer must be an int in [0, {num_layers - 1}], got {layer!r}")
        num_tokens = self._num_tokens
        if last is not None and (isinstance(last, bool) or not isinstance(last, int) or not 1 <= last <= num_tokens):
            raise ValueError(f"Branches.withdrawn: last must be an int in [1, {num_tokens}], got {last!r}")
        undo = [
            _swap(self.spec.layers[j], _FORWARD, _replay(self.spec.layers[j].forward, self._outputs[j]))
            for j in range(layer)
        ]
        keep = {LOGITS_TO_KEEP: last} if last is not None and self._keeps_logits() else {}
        try:
            with withdraw(self.model, layer=layer) as handle:
                logits = logits_of(self.model(**self._inputs, **self._kwargs, **keep))  # (B, T_out or last, V)
                if last is None:
                    return handle.to_input_positions(logits)
                return _last_positions(logits, handle.output_positions, num_tokens, last)
        finally:
            for step in reversed(undo):
                step()


def _accepts(forward: Callable[..., Any], name: str) -> bool:
    """Whether ``forward`` takes a keyword argument ``name``."""
    try:
        return name in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def _last_positions(logits: torch.Tensor, positions: torch.Tensor | None, num_tokens: int, last: int) -> torch.Tensor:
    """``(B, last, V)``: the values of ``(B, T_out, V)`` output slots at the last ``last`` of ``num_tokens`` input
    positions (``positions`` ``(B, T_out)``: each slot's input position, ``-1`` for padding; ``None``: the input's
    own), 0 where no slot holds one, as :meth:`dyvte.engine.withdrawal.Withdrawal.to_input_positions` then
    ``[:, -last:]``."""
    if positions is None:
        return logits[:, -last:]
    pos = positions[:, -logits.shape[1] :].to(logits.device) - (num_tokens - last)  # (B, T_out) column in the window
    out = logits.new_zeros((logits.shape[0], last + 1, *logits.shape[2:]))
    target = torch.where(pos >= 0, pos, last)  # padding and earlier slots go to a spare column
    out.index_put_((torch.arange(logits.shape[0], device=logits.device)[:, None], target), logits)
    return out[:, :last]


def _recorder(forward: Callable[..., Any], outputs: list[Any], index: int) -> Callable[..., Any]:
    @functools.wraps(forward)  # its signature stays the layer's (dyvte.engine.compat.call_names reads it)
    def record(*args: Any, **kwargs: Any) -> Any:
        outputs[index] = result = forward(*args, **kwargs)
        return result

    return record


def _replay(forward: Callable[..., Any], value: Any) -> Callable[..., Any]:
    @functools.wraps(forward)
    def replay(*args: Any, **kwargs: Any) -> Any:
        return value

    return replay
