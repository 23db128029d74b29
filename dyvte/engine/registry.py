"""One registry of the architecture knowledge dyvte needs, keyed by ``config.model_type``.

For every supported family it says where the text decoder and the vision encoder live inside the
``...ForConditionalGeneration`` model, which config attributes hold the visual placeholder ids, what the decoder's
attention modules are called (FastV's ranking recomputes one attention row from them), what the vision encoder's are
called (FasterVLM's [CLS] scores), which projections LoRA adapts, and how ``get_image_features`` lays out its output
(pruning before the LLM). Everything else (layer count, attention kind, sliding windows, rotary layout) is read from
the model itself, so adding a family is one entry here plus its tests; no other module names a family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dyvte.engine.compat import CallNames, attn_implementation, call_names, check_deepstack

__all__ = [
    "AttentionNames",
    "FEATURE_LAYOUTS",
    "Family",
    "LORA_TARGETS",
    "ModelSpec",
    "REGISTRY",
    "UnsupportedModelError",
    "VisionNames",
    "family_of_config",
    "resolve",
    "supported_model_types",
]

LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The Llama-style text-decoder projections LoRA targets by default (attention + gated MLP)."""


LINEAR_ATTENTION = "linear_attention"
"""The ``layer_types`` entry of a linear-attention (recurrent) decoder layer (Qwen3.5's Gated DeltaNet)."""


def layer_types(text_config) -> list[str]:
    """Each decoder layer's kind from a text config's ``layer_types`` (``"full_attention"``, ``"sliding_attention"``,
    :data:`LINEAR_ATTENTION`), one per layer; every layer ``"full_attention"`` when the config lists none."""
    num_layers = text_config.num_hidden_layers
    return list(getattr(text_config, "layer_types", None) or ["full_attention"] * num_layers)[:num_layers]


class UnsupportedModelError(ValueError):
    """The model is not one of the families dyvte knows how to hook."""


@dataclass(frozen=True)
class AttentionNames:
    """Module and attribute names of a text-decoder layer's attention (Llama-style by default).

    Attributes:
        norm: the layer's input norm; attention: its attention module; query / key: the projections;
        query_norm / key_norm: per-head norms (read only when present); head_dim / scaling / softcap: attributes of
        the attention module (``softcap`` only when present); rotary: how the layer rotates q/k by ``(cos, sin)``,
        ``"half"`` (Llama's ``rotate_half``) or ``"interleaved"`` (GLM's pairs ``(x0, x1)``); either way only the
        first ``cos.shape[-1]`` channels rotate (partial rotary).
    """

    norm: str = "input_layernorm"
    attention: str = "self_attn"
    query: str = "q_proj"
    key: str = "k_proj"
    query_norm: str = "q_norm"
    key_norm: str = "k_norm"
    head_dim: str = "head_dim"
    scaling: str = "scaling"
    softcap: str = "attn_logit_softcapping"
    rotary: str = "half"


@dataclass(frozen=True)
class VisionNames:
    """Module and attribute names of a CLIP/SigLIP-style vision encoder, for scoring patches by attention.

    Attributes:
        inner: the vision transformer inside the tower (``tower.vision_model``; the tower itself when absent);
        class_embedding: ``embeddings.<this>`` exists when the encoder has a [CLS] token; layers: dotted path of
        the encoder layers from ``inner``; norm / attention / query / key: an encoder layer's pre-attention norm,
        attention module and projections; heads / head_dim / scale: attributes of the attention module.
    """

    inner: str = "vision_model"
    class_embedding: str = "class_embedding"
    layers: str = "encoder.layers"
    norm: str = "layer_norm1"
    attention: str = "self_attn"
    query: str = "q_proj"
    key: str = "k_proj"
    heads: str = "num_heads"
    head_dim: str = "head_dim"
    scale: str = "scale"


@dataclass(frozen=True)
class Family:
    """How to find the pieces dyvte hooks in one model family.

    Attributes:
        decoder_path: dotted path from the top-level model to the text decoder (the module with ``.layers``).
        visual_id_attrs: config attributes whose values are visual placeholder token ids (missing/None ones skipped).
        vision_path: dotted path from the top-level model to the vision encoder.
        image_features: how ``get_image_features`` lays out its per-image output, for pruning before the LLM:
            ``"views"`` (one view per image, a row of patches each: LLaVA-1.5), ``"anyres"`` (LLaVA-NeXT's
            base view + unpadded crop grid with newline tokens), or ``None`` (``dyvte.prune`` unsupported); the
            layouts are the functions of :data:`FEATURE_LAYOUTS`.
        attention: names of the decoder layers' attention pieces.
        vision: names of the vision encoder's pieces.
        lora_targets: the decoder projections LoRA adapts by default.
        deepstack: the text decoder adds vision features to the hidden states at the visual positions after each
            of its first layers (Qwen3-VL's DeepStack); the engine then applies them itself, to the visual tokens
            still present (docs/design.md §4, "DeepStack").
        video_features: how ``get_video_features`` lays out its output, for pruning video frames before the LLM:
            ``"frames"`` (one view per frame: the encoder's tokens, [CLS] first, which stays: Video-LLaVA), or
            ``None`` (pruning refuses video inputs).
        video_path: dotted path of the video encoder when it is not the one at ``vision_path`` (Video-LLaVA).
        gated_query: the full-attention ``q_proj`` also outputs a sigmoid output gate (twice the query width:
            Qwen3.5), which the FLOPs count and FastV's one-row recomputation must know.
    """

    decoder_path: str
    visual_id_attrs: tuple[str, ...]
    vision_path: str
    image_features: str | None = None
    attention: AttentionNames = field(default_factory=AttentionNames)
    vision: VisionNames = field(default_factory=VisionNames)
    lora_targets: tuple[str, ...] = LORA_TARGETS
    deepstack: bool = False
    video_features: str | None = None
    video_path: str | None = None
    gated_query: bool = False


REGISTRY: dict[str, Family] = {
    "llava": Family("model.language_model", ("image_token_id",), "model.vision_tower", "views"),
    "llava_next": Family("model.language_model", ("image_token_id",), "model.vision_tower", "anyres"),
    "llava_onevision": Family("model.language_model", ("image_token_id", "video_token_id"), "model.vision_tower"),
    "qwen2_vl": Family("model.language_model", ("image_token_id", "video_token_id"), "model.visual"),
    "qwen2_5_vl": Family("model.language_model", ("image_token_id", "video_token_id"), "model.visual"),
    "internvl": Family(  # InternViT has a [CLS] (embeddings.cls_token); its pixel shuffle merges patches
        "model.language_model",
        ("image_token_id",),
        "model.vision_tower",
        vision=VisionNames(class_embedding="cls_token"),
    ),
    "gemma3": Family("model.language_model", ("image_token_id",), "model.vision_tower"),
    "idefics3": Family("model.text_model", ("image_token_id",), "model.vision_model"),
    "smolvlm": Family("model.text_model", ("image_token_id",), "model.vision_model"),
    "qwen3_vl": Family("model.language_model", ("image_token_id", "video_token_id"), "model.visual", deepstack=True),
    "qwen3_vl_moe": Family(  # LoRA: attention only (the routed experts are fused 3-D parameters, not Linears)
        "model.language_model",
        ("image_token_id", "video_token_id"),
        "model.visual",
        lora_targets=LORA_TARGETS[:4],
        deepstack=True,
    ),
    "mistral3": Family("model.language_model", ("image_token_id",), "model.vision_tower"),
    "glm4v": Family(
        "model.language_model",
        ("image_token_id", "video_token_id"),
        "model.visual",
        attention=AttentionNames(rotary="interleaved"),
    ),
    "video_llava": Family(
        "model.language_model",
        ("image_token_id", "video_token_id"),
        "model.image_tower",
        "views",
        video_features="frames",
        video_path="model.video_tower",
    ),
    "llava_next_video": Family(
        "model.language_model", ("image_token_id", "video_token_id"), "model.vision_tower", "anyres"
    ),
    "glm4v_moe": Family(  # LoRA: attention only, as qwen3_vl_moe (the routed experts are fused 3-D parameters)
        "model.language_model", ("image_token_id", "video_token_id"), "model.visual", lora_targets=LORA_TARGETS[:4]
    ),
    "qwen3_5": Family("model.language_model", ("image_token_id", "video_token_id"), "model.visual", gated_query=True),
    "qwen3_5_moe": Family(
        "model.language_model", ("image_token_id", "video_token_id"), "model.visual", gated_query=True
    ),
}


def _views(model: nn.Module, arguments: dict[str, Any], features: list[torch.Tensor], grid: tuple[int, int, int]):
    """LLaVA-1.5: image ``i`` is view ``i``; feature entry ``p`` is encoder token ``p + offset`` of it."""
    seq_len, offset, _ = grid
    return [i * seq_len + offset + torch.arange(f.shape[0]) for i, f in enumerate(features)]  # (n_i,) each


def _anyres(model: nn.Module, arguments: dict[str, Any], features: list[torch.Tensor], grid: tuple[int, int, int]):
    """LLaVA-NeXT: a base view + an unpadded crop grid per image, packed with one newline entry per grid row.

    Every packed entry is located by running the model's own ``pack_image_features`` on encoder-token indices.
    """
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    seq_len, offset, view_tokens = grid
    cfg = model.config
    image_sizes = arguments["image_sizes"]
    views = [
        image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size) for size in image_sizes
    ]
    first = torch.tensor([0, *views]).cumsum(0)
    grids = [
        ((first[i] + torch.arange(n))[:, None] * seq_len + offset + torch.arange(view_tokens)).double().unsqueeze(-1)
        for i, n in enumerate(views)
    ]  # per image (views_i, N, 1)
    strategy = getattr(cfg, "vision_feature_select_strategy", "default")
    packed, _ = model.base_model.pack_image_features(
        grids, image_sizes, strategy, image_newline=torch.tensor([-1.0], dtype=torch.float64)
    )
    return [p.squeeze(-1).round().long() for p in packed]  # (n_i,) each


def _frames(model: nn.Module, arguments: dict[str, Any], features: list[torch.Tensor], grid: tuple[int, int, int]):
    """Video-LLaVA's videos: entry ``i`` is frame ``i`` (videos x frames, in order) with every encoder token; its
    [CLS] feature (token 0) always stays (``-1``), patch ``p`` is encoder token ``p`` of that frame."""
    seq_len, _, _ = grid
    out = []
    for i, f in enumerate(features):
        index = i * seq_len + torch.arange(f.shape[0])
        index[0] = -1  # the [CLS] feature: kept, like LLaVA-NeXT's newlines
        out.append(index)  # (S,)
    return out


FeatureLayout = Callable[[nn.Module, dict[str, Any], list[torch.Tensor], tuple[int, int, int]], list[torch.Tensor]]

FEATURE_LAYOUTS: dict[str, FeatureLayout] = {"views": _views, "anyres": _anyres, "frames": _frames}
"""``Family.image_features`` -> ``layout(model, get_image_features arguments, per-image features, (S, offset, N))``
giving, per image, the flat encoder-token index (``view * S + token``) of each feature entry (``-1``: a newline)."""


def family_of_config(config: Any) -> Family | None:
    """The registry entry of a (multimodal or text) config, or ``None``: a text config's ``model_type`` is its
    family's plus ``"_text"`` (``qwen3_5_text``)."""
    model_type = str(getattr(config, "model_type", ""))
    family = REGISTRY.get(model_type)
    if family is None and model_type.endswith("_text"):
        family = REGISTRY.get(model_type[: -len("_text")])
    return family


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
        names: the argument names its calls use (resolved once by :func:`dyvte.engine.compat.call_names`).
        family: its :class:`Family` entry.
        linear_attention: per layer, whether it is a linear-attention (recurrent) layer, e.g. Qwen3.5's Gated
            DeltaNet layers (``layer_types`` entry ``"linear_attention"``): it keeps a recurrent state, not a KV cache,
            and takes a 2-D padding mask (docs/design.md, "Withdrawal on linear-attention layers (Qwen3.5)").
        deepstack_layers: DeepStack families: the first layers after which the decoder adds vision features (the
            vision config's ``deepstack_visual_indexes``, one feature level each; every layer when the config does
            not say); 0 for other families.
    """

    model: nn.Module
    model_type: str
    decoder: nn.Module
    layers: nn.ModuleList
    visual_ids: torch.Tensor
    sliding_window: list[int | None]
    names: CallNames
    family: Family = field(default_factory=lambda: Family("", (), ""))
    linear_attention: list[bool] = field(default_factory=list)
    deepstack_layers: int = 0

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
    deepstack_layers = 0
    if family.deepstack:
        check_deepstack(decoder)
        levels = getattr(getattr(config, "vision_config", None), "deepstack_visual_indexes", None)
        deepstack_layers = len(layers) if levels is None else min(len(levels), len(layers))
    text_config = decoder.config
    kinds = layer_types(text_config)
    window = getattr(text_config, "sliding_window", None)
    sliding = [window if (t == "sliding_attention" and window) else None for t in kinds]
    return ModelSpec(
        model=model,
        model_type=model_type,
        decoder=decoder,
        layers=layers,
        visual_ids=torch.tensor(sorted(set(ids)), dtype=torch.long),
        sliding_window=sliding,
        names=call_names(model, layers[0]),
        family=family,
        linear_attention=[t == LINEAR_ATTENTION for t in kinds],
        deepstack_layers=deepstack_layers,
    )
