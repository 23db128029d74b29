"""peft LoRA adapter directories: which base they name, and whether their shapes fit a model, before peft loads them.

peft loads an adapter trained on a base of another width with torch's ``load_state_dict``, which fails with one
``size mismatch for ...`` line per adapted tensor (hundreds on a 7B model). :func:`check_adapter` reads the adapter's
tensor shapes from its safetensors header (no weights loaded) and compares them with the model's modules first,
raising one error that names the adapter, its base and the first mismatching module with both shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from dyvte.engine.registry import unwrap

__all__ = ["AdapterMismatchError", "adapter_base", "check_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: peft's prefix of every saved key (``PeftModel.base_model.model`` is the transformers model)
PREFIX = "base_model.model."
#: the LoRA factors of a linear module: ``lora_A`` is ``(r, in_features)``, ``lora_B`` is ``(out_features, r)``
FACTORS = {".lora_A.weight": ("in_features", 1), ".lora_B.weight": ("out_features", 0)}


class AdapterMismatchError(ValueError):
    """A LoRA adapter trained on a base whose modules have other shapes than the model it is loaded on."""


def adapter_base(directory: str | Path) -> str | None:
    """The base model a peft adapter directory names (``adapter_config.json``), or ``None`` for a model directory."""
    config = Path(directory) / CONFIG_NAME
    if not config.is_file():
        return None
    return json.loads(config.read_text())["base_model_name_or_path"]


def check_adapter(model: nn.Module, directory: str | Path) -> None:
    """Raise :class:`AdapterMismatchError` unless the LoRA adapter in ``directory`` fits ``model``'s modules.

    Every ``lora_A`` / ``lora_B`` factor the adapter saves must match the width of the module it adapts
    (``lora_A``: ``(r, in_features)``; ``lora_B``: ``(out_features, r)``), and at least one adapted module must
    exist in the model. Shapes come from the safetensors header: nothing is loaded. An adapter saved in another
    format (``adapter_model.bin``) is left to peft.

    Args:
        model: the base model (a peft wrapper is unwrapped).
        directory: the adapter directory (``adapter_config.json``, ``adapter_model.safetensors``).

    Raises:
        AdapterMismatchError: the message names the adapter, the base it records, how many modules differ and the
            first one with both shapes.
    """
    from safetensors import safe_open

    path = Path(directory)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        return
    base = adapter_base(path)
    model = unwrap(model)
    found, differ = 0, []
    with safe_open(str(weights), "pt") as handle:
        for key in handle.keys():
            suffix = next((s for s in FACTORS if key.endswith(s)), None)
            if suffix is None:
                continue
            name = key[len(PREFIX) : -len(suffix)] if key.startswith(PREFIX) else key[: -len(suffix)]
            try:
                module = model.get_submodule(name)
            except AttributeError:
                continue
            attribute, axis = FACTORS[suffix]
            width = getattr(module, attribute, None)
            if width is None:
                continue
            found += 1
            shape = handle.get_slice(key).get_shape()
            if shape[axis] != width:
                differ.append((name, suffix, shape, module))
    named = f"LoRA adapter {path} (trained on base_model_name_or_path={base!r})"
    here = f"this model ({type(model).__name__}, {getattr(model.config, '_name_or_path', '') or 'unnamed'})"
    if found == 0:
        raise AdapterMismatchError(
            f"{named} adapts no module of {here}: it was trained on another kind of model; load it on its base"
        )
    if differ:
        name, suffix, shape, module = differ[0]
        factor = suffix.split(".")[1]
        raise AdapterMismatchError(
            f"{named} was trained on a base of another shape than {here}: {len(differ)} of its adapted factors do "
            f"not fit, e.g. {name}: the adapter's {factor} has shape {tuple(shape)}, this model's module maps "
            f"{module.in_features} -> {module.out_features} features. Load it on the base it was trained on"
        )
