"""Counting the host syncs dyvte's own code makes (docs/design.md §4, "Hot path"), with a ``TorchFunctionMode``.

A host sync is any call that needs a device tensor's value on the host (``item``, ``tolist``, ``__bool__``, ``cpu``,
``nonzero``, boolean-mask indexing, ...) or copies host memory to the device (``torch.tensor(..., device=)``,
``.to(device)``: synchronous from pageable memory). On CPU nothing actually waits, but every such call made on a
GPU would, so the count is the same on both. Only calls whose innermost caller outside torch's own Python code is in
the ``dyvte`` package are counted: dyvte's hooks, policies and FastV's ranking, not transformers or ``generate``
(nor a decoder layer's own code that dyvte runs per group of rows).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["SyncCounter", "READS"]

PACKAGE = str(Path(__file__).parent)
TORCH = str(Path(torch.__file__).parent)
READS = frozenset(
    {
        "item",
        "tolist",
        "__bool__",
        "__int__",
        "__float__",
        "__index__",
        "cpu",
        "numpy",
        "nonzero",
        "argwhere",
        "unique",
        "masked_select",
        "equal",
        "allclose",
    }
)
"""Tensor methods and functions that read a tensor's value on the host."""


class SyncCounter(TorchFunctionMode):
    """Counts dyvte's host syncs per top-level model call (``calls[0]`` is the first call, e.g. the prefill).

    Usage::

        counter = SyncCounter(model)      # registers a pre-hook that opens a new count per model call
        with counter, torch.no_grad():
            model.generate(...)
        counter.remove()
        counter.calls                      # [prefill, step 1, step 2, ...]
        counter.names                      # the function names counted, per call

    The pre-hook is prepended, so it runs before dyvte's own hook on the model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.calls: list[int] = []
        self.names: list[list[str]] = []
        self._hook = model.register_forward_pre_hook(self._new_call, prepend=True)

    def _new_call(self, module: nn.Module, args: Any) -> None:
        self.calls.append(0)
        self.names.append([])

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.calls and is_sync(name, args, kwargs) and _called_by_dyvte():
            self.calls[-1] += 1
            self.names[-1].append(name)
        return func(*args, **kwargs)

    def remove(self) -> None:
        """Remove the model hook."""
        self._hook.remove()


def is_sync(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether a call of the torch function ``name`` with these arguments is a host sync."""
    if name in READS:
        return True
    if name in ("__getitem__", "__setitem__"):  # boolean-mask indexing reads the mask to size its result
        index = args[1] if len(args) > 1 else None
        parts = index if isinstance(index, tuple) else (index,)
        return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)
    if name in ("tensor", "as_tensor"):  # a host-to-device copy
        return kwargs.get("device") is not None
    if name in ("to", "cuda"):
        return name == "cuda" or "device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args[1:])
    return False


def _called_by_dyvte() -> bool:
    """Whether the innermost caller outside torch's own Python code is dyvte (not this module).

    The innermost caller decides, not any frame on the stack: a decoder layer that dyvte runs per group of rows
    (``dyvte.engine.grouping``) is transformers' code called from a dyvte frame, and what it does (e.g. a cache layer's
    lazy initialisation) it does in the ungrouped call too.
    """
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(TORCH):
        frame = frame.f_back
    if frame is None:
        return False
    filename = frame.f_code.co_filename
    return filename.startswith(PACKAGE) and not filename.endswith("syncs.py")
