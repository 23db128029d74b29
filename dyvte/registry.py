"""One registry of the architecture knowledge dyvte needs, keyed by ``config.model_type``.

For every supported family it says where the text decoder lives inside the ``...ForConditionalGeneration`` model
and which config attributes hold the visual placeholder ids. Everything else (layer count, attention kind, sliding
windows, rotary layout) is read from the model itself, so adding a family is one entry here plus its tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .compat import CallNames, attn_implementation, call_names

__all__ = ["Family", "ModelSpec", "REGISTRY", "UnsupportedModelError", "resolve", "supported_model_types"]


class UnsupportedModelError(ValueError):
    """The model is not one of the families dyvte knows how to hook."""


@dataclass(frozen=True)
class Family:
    """How to find the pieces dyvte hooks in one model family.

    Attributes:
        decoder_path: dotted path from the top-level model to the text decoder (the module with ``.layers``).
        visual_id_attrs: config attributes whose values are visual placeholder token ids (missing/None ones skipped).
        vision_path: dotted path from the top-level model to the vision encoder.
        image_features: how ``get_image_features`` lays out its per-image output, for pruning before the LLM:
            ``"views"`` (one view per image, a row of patches each: LLaVA-1.5), ``"anyres"`` (LLaVA-NeXT's
            base view + unpadded crop grid with newline tokens), or ``None`` (``dyvte.prune`` unsupported).
    """

    decoder_path: str
    visual_id_attrs: tuple[str, ...]
    vision_path: str
    image_features: str | None = None


REGISTRY: dict[str, Family] = {
    "llava": Family("model.language_model", ("image_token_id",), "model.vision_tower", "views"),
    "llava_next": Family("model.language_model", ("image_token_id",), "model.vision_tower", "anyres"),
    "llava_onevision": Family("model.language_model", ("image_token_id", "video_token_id"), "model.vision_tower"),
    "qwen2_vl": Family("model.language_model", ("image_token_id", "video_token_id"), "model.visual"),
    "qwen2_5_vl": Family("model.language_model", ("image_token_id", "video_token_id"), "model.visual"),
    "internvl": Family("model.language_model", ("image_token_id",), "model.vision_tower"),
    "gemma3": Family("model.language_model", ("image_token_id",), "model.vision_tower"),
    "idefics3": Family("model.text_model", ("image_token_id",), "model.vision_model"),
    "smolvlm": Family("model.text_model", ("image_token_id",), "model.vision_model"),
}


def supported_model_types() -> list[str]:
    """The ``model_type`` values dyvte supports, sorted."""
    return sorted(REGISTRY)


@dataclass
class ModelSpec:
    """The resolved pieces of one concrete model.

    Attributes:
        model: the top-level model the user calls (``forward`` / ``generate``).
        model_type: its ``config.model_type``.
        decoder: the text decoder module (owns ``layers``, ``norm``, ``rotary_emb``).
        layers: the decoder layers, in order.
        visual_ids: the visual placeholder token ids, as a 1-D long tensor.
        sliding_window: per layer, the sliding-window width, or ``None`` for full attention.
        names: the argument names its calls use (resolved once by :func:`dyvte.compat.call_names`).
    """

    model: nn.Module
    model_type: str
    decoder: nn.Module
    layers: nn.ModuleList
    visual_ids: torch.Tensor
    sliding_window: list[int | None]
    names: CallNames

    @property
    def num_layers(self) -> int:
        """Number of decoder layers L."""
        return len(self.layers)

    def attn_implementation_now(self) -> str:
        """The text decoder's current attention implementation (``"sdpa"``, ``"eager"``, ...)."""
        return attn_implementation(self.decoder.config)

    @property
    def text_config(self):
        """The text decoder's config."""
        return self.decoder.config


def _get_path(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def unwrap(model: nn.Module) -> nn.Module:
    """Return the transformers model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def resolve(model: nn.Module) -> ModelSpec:
    """Find the decoder, its layers and the visual token ids of a supported model.

    Args:
        model: a transformers ``...ForConditionalGeneration`` model of a supported family (a PEFT wrapper is unwrapped).

    Returns:
        The resolved :class:`ModelSpec`.

    Raises:
        UnsupportedModelError: the model's family is not in the registry, or its layout is not the expected one.
        CompatibilityError: the installed transformers names its call arguments in a way dyvte does not know.
    """
    model = unwrap(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = REGISTRY.get(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"dyvte does not support model_type={model_type!r} ({type(model).__name__}). "
            f"Supported families: {', '.join(supported_model_types())}. "
            "Pass the top-level ...ForConditionalGeneration model."
        )
    try:
        decoder = _get_path(model, family.decoder_path)
        layers = decoder.layers
    except AttributeError as err:
        raise UnsupportedModelError(
            f"{type(model).__name__} has model_type={model_type!r} but no decoder at '{family.decoder_path}': "
            "pass the top-level ...ForConditionalGeneration model."
        ) from err
    ids = [getattr(config, a, None) for a in family.visual_id_attrs]
    ids = [int(i) for i in ids if i is not None]
    if not ids:
        raise UnsupportedModelError(f"{type(model).__name__}'s config has none of {family.visual_id_attrs} set.")
    text_config = decoder.config
    layer_types = getattr(text_config, "layer_types", None) or ["full_attention"] * len(layers)
    window = getattr(text_config, "sliding_window", None)
    sliding = [window if (t == "sliding_attention" and window) else None for t in layer_types]
    return ModelSpec(
        model=model,
        model_type=model_type,
        decoder=decoder,
        layers=layers,
        visual_ids=torch.tensor(sorted(set(ids)), dtype=torch.long),
        sliding_window=sliding,
        names=call_names(model, layers[0]),
    )
