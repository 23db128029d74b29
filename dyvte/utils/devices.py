"""Devices: check a requested device before any weight is read, find a model's device, move inputs to it.

dyvte builds model inputs on the host (the processor's tensors) and moves them to the model's device right before
the model reads them; results that leave the model (exit layers, counts, metrics) come back to the host.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["check_device", "model_device", "to_device"]

#: device types :func:`check_device` accepts
DEVICE_TYPES = ("cpu", "cuda")


def check_device(device: str | torch.device, option: str = "device") -> torch.device:
    """``device`` as a ``torch.device``, checked against this machine before anything is loaded.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (or a ``torch.device``).
        option: the option's name in messages (e.g. ``"--device"``).

    Raises:
        ValueError: not a device string, a device type other than cpu / cuda, CUDA asked for on a machine (or a
            torch build) without CUDA, or a CUDA index this machine does not have.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{option} must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from error
    if dev.type not in DEVICE_TYPES:
        raise ValueError(f"{option} must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "" if torch.version.cuda else f" (torch {torch.__version__} is a CPU-only build)"
            raise ValueError(f"{option} {device!r}: CUDA is not available on this machine{build}; use 'cpu'")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{option} {device!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return dev


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (else buffer); ``cpu`` for a model with neither.

    Under ``device_map`` sharding this is where the inputs go: the embedding is the first module.
    """
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def to_device(inputs: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """The tensors of ``inputs`` on ``device`` (other values as they are); a tensor already there is not copied."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
