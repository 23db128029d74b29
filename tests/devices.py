"""Device checks that run on a CPU-only machine (tests/*/test_devices.py).

Two tools, each proving something different:

* :class:`HostFactoryAudit` (a ``TorchFunctionMode``) records every tensor that dyvte's own code creates *without
  naming a device* (``torch.tensor``, ``torch.arange``, ``torch.zeros``, ... with no ``device=``) while it runs. Such a
  tensor lands on the CPU whatever the model's device; on a GPU it is either a deliberate host-side value (an exit
  layer read back, a bookkeeping index) or a bug that only a GPU would show. The tests compare the sites recorded with
  a reviewed list, by file and function, so a new device-less tensor in the hot path fails here, on CPU, until it
  names its device or is reviewed as host-side.
* :func:`stop_on_forward` with a model moved to the ``meta`` device: every input dyvte builds (processor tensors,
  teacher-forced batches) must arrive on the model's device at its first forward (``meta`` is a device CPU can hold
  without data, so a tensor left on the CPU is caught); the forward itself cannot run on ``meta`` and is stopped.

What they cannot prove: that the reviewed host-side tensors are used correctly on a real GPU (mixed-device ops that
PyTorch accepts on CPU, such as indexing a CUDA tensor with a CPU index), what transformers does on a GPU, kernel or
dtype behaviour (bf16/fp16 numerics), speed. ``benchmarks/gpu.sh`` runs the real thing on a GPU.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import dyvte

PACKAGE = Path(dyvte.__file__).parent
ROOT = PACKAGE.parent
TORCH = str(Path(torch.__file__).parent)
HERE = str(Path(__file__))

#: torch factory functions that put their result on the default (CPU) device unless given ``device=``
FACTORIES = frozenset(
    {
        "tensor",
        "as_tensor",
        "zeros",
        "ones",
        "full",
        "empty",
        "arange",
        "rand",
        "randn",
        "randint",
        "randperm",
        "eye",
        "linspace",
    }
)


class HostFactoryAudit(TorchFunctionMode):
    """Records ``(file, function)`` of every device-less tensor factory call made by dyvte's own code in the block.

    ``torch.as_tensor`` of a tensor keeps its device and is not recorded. The caller is the innermost frame outside
    torch's Python code (and this file); calls from transformers, torch or the tests are not recorded.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sites: dict[tuple[str, str], str] = {}  # (file relative to the repo, function) -> one source line

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in FACTORIES and kwargs.get("device") is None and not _keeps_device(name, args):
            frame = sys._getframe(1)
            while frame is not None and (
                frame.f_code.co_filename.startswith(TORCH) or frame.f_code.co_filename == HERE
            ):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(str(PACKAGE)):
                file = str(Path(frame.f_code.co_filename).relative_to(ROOT))
                while frame.f_code.co_name.startswith("<") and frame.f_back is not None:  # a comprehension (< 3.12)
                    frame = frame.f_back
                self.sites.setdefault((file, frame.f_code.co_name), f"line {frame.f_lineno}: {name}")
        return func(*args, **kwargs)


def _keeps_device(name: str, args: tuple) -> bool:
    """``torch.tensor`` / ``torch.as_tensor`` of a tensor keep (or copy from) its device."""
    return name in ("tensor", "as_tensor") and bool(args) and isinstance(args[0], torch.Tensor)


class StopForward(Exception):
    """Raised by :func:`stop_on_forward`'s hook once the inputs are checked."""


@contextlib.contextmanager
def stop_on_forward(model: nn.Module, device: torch.device | str) -> Iterator[list[dict[str, torch.device]]]:
    """Check the devices of every tensor argument of ``model``'s first forward or ``generate`` call, then stop it
    with :class:`StopForward`.

    ``generate`` is replaced on the instance for the block: on ``meta`` it cannot reach the forward (it reads values
    before the first step), so the check runs where it is called, with the same arguments.

    Yields:
        The list the check appends ``{argument name: device}`` to, one dict per call reached.
    """
    seen: list[dict[str, torch.device]] = []
    want = torch.device(device)

    def check(args: tuple, kwargs: dict) -> None:
        tensors = {f"arg{i}": a for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
        tensors.update({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        seen.append({k: v.device for k, v in tensors.items()})
        wrong = {k: str(v.device) for k, v in tensors.items() if v.device != want}
        assert not wrong, f"inputs not on the model's device {want}: {wrong}"
        raise StopForward

    def generate(*args: Any, **kwargs: Any) -> None:
        check(args, kwargs)

    handle = model.register_forward_pre_hook(lambda m, a, k: check(a, k), with_kwargs=True, prepend=True)
    model.generate = generate
    try:
        yield seen
    finally:
        handle.remove()
        del model.generate
