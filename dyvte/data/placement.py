"""Where a model runs and in which dtype: checked before any weight is read (:func:`dyvte.data.sources.load_model`).

float16 is accepted only for a model on a CUDA device: on the CPU it is ~100x slower than float32 (refused there, with
the same message on every launcher). A CUDA device asked for on a machine without CUDA is refused before loading.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dyvte.utils.devices import check_device

__all__ = ["AUTO_MAPS", "CPU_DTYPES", "DTYPES", "check_dtype", "check_placement"]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
#: the dtypes accepted on CPU (float16 is ~100x slower than float32 there: refused)
CPU_DTYPES = {name: dtype for name, dtype in DTYPES.items() if dtype != torch.float16}
#: ``device_map`` strings that let accelerate place the model over every visible device
AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_dtype(
    dtype: str, device: str | torch.device | None = None, device_map: Any = None, option: str = "dtype"
) -> torch.dtype:
    """The ``torch.dtype`` named ``dtype``, refused where it cannot run well: float16 anywhere but on CUDA.

    Args:
        dtype: a key of :data:`DTYPES` (``float32``, ``bfloat16``, ``float16`` and their short names).
        device: where the model will run (``None``: where it loads, the CPU unless ``device_map`` says otherwise).
        device_map: the ``device_map`` the model is loaded with, if any.
        option: the option's name in messages (``"--dtype"`` on the launchers).

    Raises:
        ValueError: an unknown dtype, or float16 for a model that runs on the CPU (the message says why).
    """
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"{option} must be one of {sorted(DTYPES)}, got {dtype!r}")
    if DTYPES[dtype] == torch.float16 and not _on_cuda(device, device_map):
        raise ValueError(
            f"{option} must be one of {sorted(CPU_DTYPES)} on CPU, got {dtype!r}: float16 is ~100x slower than "
            "float32 on CPU (use bfloat16 there, or float16 with a CUDA device: --device cuda)"
        )
    return DTYPES[dtype]


def _on_cuda(device: str | torch.device | None, device_map: Any) -> bool:
    """Whether a model loaded with ``device`` / ``device_map`` runs on a CUDA device (as far as can be told before
    loading: an ``"auto"`` map counts when CUDA is available)."""
    if device is not None:
        return torch.device(device).type == "cuda"
    if device_map is None:
        return False
    if isinstance(device_map, str) and device_map in AUTO_MAPS:
        return torch.cuda.is_available()
    return any(_map_device(target).type == "cuda" for target in _map_targets(device_map))


def _map_targets(device_map: Any) -> list[Any]:
    """The devices a ``device_map`` names (a device, or a mapping of module names to devices)."""
    return list(device_map.values()) if isinstance(device_map, Mapping) else [device_map]


def _map_device(target: Any) -> torch.device:
    """One ``device_map`` target as a device (an int is a CUDA index; ``"disk"`` offload counts as the CPU)."""
    if isinstance(target, bool):
        raise ValueError(f"device_map: {target!r} is not a device")
    if isinstance(target, int):
        return torch.device("cuda", target)
    if target == "disk":
        return torch.device("cpu")
    return torch.device(target)


def check_placement(device: str | torch.device | None, device_map: Any) -> torch.device | None:
    """Check ``device`` / ``device_map`` of :func:`load_model` against each other and against this machine.

    Returns:
        ``device`` as a ``torch.device`` (``None`` when not given).

    Raises:
        ValueError: both given, a malformed one, or a CUDA device on a machine without CUDA (or without that index).
        ImportError: ``device_map`` without ``accelerate`` installed (transformers needs it to place the weights).
    """
    if device is not None and device_map is not None:
        raise ValueError(
            f"give device or device_map, not both (device={device!r}, device_map={device_map!r}): device moves the "
            "whole model to one device, device_map lets from_pretrained place (or shard) it"
        )
    if device is not None:
        return check_device(device)
    if device_map is None:
        return None
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise ImportError("device_map needs the accelerate package (pip install accelerate); or pass device=...")
    if isinstance(device_map, str) and device_map in AUTO_MAPS:
        return None
    if not isinstance(device_map, (str, int, Mapping)) or isinstance(device_map, bool):
        raise ValueError(
            f"device_map must be 'auto', a device or a mapping of module names to devices, got {device_map!r}"
        )
    for target in _map_targets(device_map):
        try:
            dev = _map_device(target)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device_map: {target!r} is not a device") from error
        check_device(str(dev), "device_map")
    return None
