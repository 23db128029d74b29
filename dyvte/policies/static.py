"""Static exits: every row at one layer K (VTW), or each row at its own layer (per-row K).

Both are planned on the host before the forward, so they cost no host sync in any decoder layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dyvte.engine.policy import ExitPolicy, PolicyView, register_policy
from dyvte.engine.registry import ModelSpec
from dyvte.engine.withdrawal import WithdrawalError
from dyvte.utils.syntax import MethodSyntax, int_in, items

__all__ = ["StaticExit", "as_layer"]


class StaticExit(ExitPolicy):
    """Every row leaves at ``layer`` (an int K), or row ``b`` at ``layer[b]`` (a 1-D sequence, one per row)."""

    def __init__(self, layer: int | Sequence[int] | torch.Tensor) -> None:
        self._k: int | None = None
        self._rows: list[int] | None = None
        layer = as_layer(layer)
        if isinstance(layer, torch.Tensor):
            if layer.dim() != 1 or layer.numel() == 0 or layer.is_floating_point() or layer.dtype == torch.bool:
                raise TypeError(f"per-row layers must be a non-empty 1-D sequence of ints, got {layer.tolist()!r}")
            self._rows = [int(k) for k in layer.tolist()]
        elif isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int in [0, L], got {layer!r}")
        else:
            self._k = layer

    def bind(self, spec: ModelSpec) -> None:
        super().bind(spec)
        num_layers = spec.num_layers
        if self._rows is not None:
            if min(self._rows) < 0 or max(self._rows) > num_layers:
                raise ValueError(f"per-row exit layers must be in [0, {num_layers}], got {self._rows}")
        elif not 0 <= self._k <= num_layers:
            raise ValueError(
                f"layer K={self._k} is out of range: this model has L={num_layers} decoder layers, "
                f"so K must be in [0, {num_layers}] (K = {num_layers} never withdraws)"
            )

    @property
    def layer(self) -> int | None:
        return self._k

    def earliest_exit(self) -> int:
        return min(self._rows) if self._rows is not None else self._k

    def planned_exits(self, view: PolicyView) -> list[int]:
        if self._rows is None:
            return [self._k] * view.batch
        if len(self._rows) != view.batch:
            raise WithdrawalError(
                f"per-row exit layers were given for {len(self._rows)} rows, the batch has {view.batch}"
            )
        return self._rows


def as_layer(layer: Any) -> Any:
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


def _static(model: nn.Module, layer: int | Sequence[int] | torch.Tensor) -> StaticExit:
    return StaticExit(layer)


def _parse(argument: str, num_layers: int) -> list[dict[str, Any]]:
    """``static:K[,K...]`` or ``static:all`` (K = 0..L)."""
    if argument.strip() == "all":
        return [{"layer": k} for k in range(num_layers + 1)]
    return [{"layer": int_in(k, 0, num_layers, "exit layer K")} for k in items(argument, "K")]


SYNTAX = MethodSyntax(
    form="static:K[,K...] (K an int in [0, L]; L never withdraws) or static:all",
    short="static:K",
    parse=_parse,
    name=lambda options: f"static K={options['layer']}",
)
register_policy("static", _static, SYNTAX)
