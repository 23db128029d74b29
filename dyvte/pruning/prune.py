"""Visual-token pruning: FasterVLM ([CLS] attention, before the LLM), FastV (inside the LLM) and a random baseline.

``dyvte.prune(model, method=...)`` is the one entry point:

* ``"fastervlm"`` (arXiv 2412.01818): each view's patches are scored by the vision encoder's attention from the
  [CLS] query at the layer whose output the MLLM reads (``vision_feature_layer``; mean over heads) and the top ones
  are kept, in their original order. Encoders without a [CLS] token fall back to the mean attention each patch
  receives (mean over queries and heads) -- a weaker score: it rewards patches every patch looks at (often
  background "sink" patches) rather than what a global summary token gathered.
* ``"random"``: a seeded random subset of the same size per view (the honest baseline).
* ``"fastv"`` (arXiv 2403.06764, ``layer=K``): see :mod:`dyvte.policies.fastv`.

FasterVLM and random prune *before* the LLM, which then sees a shorter prompt (consecutive positions, as if the
pruned placeholders had never been there). Mechanism, all hooks on the unmodified model:

* ``get_image_features`` of the base model is wrapped (an instance attribute, removed with the handle). It is the
  single entry of both paths: ``generate`` calls it before prefill, a plain forward through the pre-hook below. The
  wrapper switches on a forward pre-hook on the scoring encoder layer, which recomputes that layer's q/k from its
  own input (no eager switch, no ``output_attentions``), then drops the pruned entries from ``pooler_output`` and
  records which ones it kept on the output object.
* A forward pre-hook on the top-level model (``prepend=True``, so it runs before any withdrawal hook) drops the
  placeholders of pruned entries from ``input_ids`` and every other per-token tensor (``attention_mask``,
  ``labels``, ``token_type_ids``...), renumbers ``position_ids``, and remembers the kept columns per row; in decode
  steps it shrinks the growing 2-D ``attention_mask`` and shifts ``position_ids`` the same way, so the KV cache and
  ``generate`` stay consistent.

Views: LLaVA-1.5 has one view per image. LLaVA-NeXT packs a base view and an unpadded crop grid with one newline
token per grid row; each view (the base view, each grid crop) is pruned on its own, the packed features are pruned
per image after the model's own packing (we locate every packed entry by running the model's ``pack_image_features``
on patch indices) and newline tokens are always kept, so the row structure the newlines encode survives.

Video frames (Video-LLaVA, registry ``video_features="frames"``): ``get_video_features`` is wrapped the same way;
each frame is a view ranked by its own [CLS] attention in the video tower, and its [CLS] feature (which Video-LLaVA
feeds the LLM) stays. Other families' videos are refused under pruning; encoders without a [CLS] token are refused
at ``prune()`` (docs/design.md §2).

Budgets: ``ratio=R`` keeps ``max(1, floor((1 - R) * n + 0.5))`` of a view's ``n`` patches; ``keep=k`` keeps ``k``
of a full view's ``N`` patches, i.e. ``max(1, floor(n * k / N + 0.5))`` of an unpadded crop's ``n``.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dyvte.engine.compat import (
    ATTENTION_MASK,
    HIDDEN_STATES,
    INPUT_IDS,
    MM_ENCODER_OUTPUTS,
    PIXEL_ARGS,
    POSITION_IDS,
    cache_in,
    cache_length_host,
    cache_out,
    cache_resets,
    check_cache,
    keep_2d_masks,
)
from dyvte.engine.layout import pack_right, take
from dyvte.engine.registry import (
    FEATURE_LAYOUTS,
    REGISTRY,
    UnsupportedModelError,
    VisionNames,
    _get_path,
    resolve,
    unwrap,
)
from dyvte.engine.withdrawal import PRUNING_ATTR
from dyvte.policies.fastv import FastV, kept_count
from dyvte.utils.syntax import ArgumentError, MethodSyntax, int_in, items, pruned_fraction

__all__ = [
    "PRUNING_METHODS",
    "PatchScorer",
    "PruningError",
    "Pruning",
    "PruningMethod",
    "prune",
    "register_pruning",
    "scorer_method",
]

logger = logging.getLogger(__name__)

_VISION_NAMES = VisionNames()
_KEPT_ATTR = "_dyvte_kept"  # set on get_image_features' output: per image, (n_i,) bool kept entries


class PruningError(RuntimeError):
    """Pruning cannot proceed on these inputs or this state (the message says why)."""


def _supported() -> list[str]:
    return sorted(t for t, f in REGISTRY.items() if f.image_features is not None)


@dataclass(frozen=True)
class PatchScorer:
    """How a pruning method before the LLM scores the vision encoder's tokens; the top ones of each view stay.

    Attributes:
        uses_attention: the scores need the attention of the encoder layer the MLLM reads (recomputed from that
            layer's input by a pre-hook; FasterVLM's [CLS] attention, or the mean attention without a [CLS] token).
        score: ``score(attention, total, seed) -> (total,)`` float64 scores over the flat encoder tokens
            (``view * S + token``) of one ``get_image_features`` call; ``attention`` is ``(total,)`` float32 when
            ``uses_attention``, else ``None``.
    """

    uses_attention: bool
    score: Callable[[torch.Tensor | None, int, int], torch.Tensor]


@dataclass(frozen=True)
class PruningMethod:
    """A registered pruning method: ``build(model, keep=, ratio=, layer=, seed=)`` returns its handle.

    ``syntax`` lets the evaluation harness run it from method strings (``name:R``) and name its table rows; methods
    before the LLM may stand left of ``+`` in a composition (``fastervlm:0.75+heads:DIR``).
    """

    name: str
    stage: str  # "before": the LLM receives a shorter prompt; "inside": an exit policy of the engine
    build: Callable[..., Any]
    scorer: PatchScorer | None = None  # methods before the LLM: how patches are scored
    syntax: MethodSyntax | None = None


PRUNING_METHODS: dict[str, PruningMethod] = {}
"""Registered pruning methods by name (``dyvte.prune(model, method=name, ...)``)."""


def register_pruning(method: PruningMethod) -> PruningMethod:
    """Register a pruning method under its name; returns it unchanged.

    Raises:
        ValueError: another method has that name.
    """
    if PRUNING_METHODS.get(method.name, method) is not method:
        raise ValueError(f"a pruning method named {method.name!r} is already registered")
    PRUNING_METHODS[method.name] = method
    return method


def scorer_method(name: str, scorer: PatchScorer) -> PruningMethod:
    """A pruning method before the LLM that keeps the top patches of each view by ``scorer``."""

    def build(
        model: nn.Module,
        *,
        keep: int | None = None,
        ratio: float | None = None,
        layer: int | None = None,
        seed: int = 0,
    ) -> Pruning:
        if layer is not None:
            raise TypeError(f"layer= is FastV's argument; method={name!r} prunes before the LLM")
        return Pruning(model, name, keep=keep, ratio=ratio, seed=seed, scorer=scorer)

    syntax = MethodSyntax(
        form=f"{name}:R[,R...] (R the fraction of visual tokens pruned, in [0, 1))",
        short=f"{name}:R",
        parse=lambda argument, num_layers: [{"ratio": pruned_fraction(r)} for r in items(argument, "ratio R")],
        name=lambda options: f"{name} {_budget(options)}",
    )
    return PruningMethod(name, "before", build, scorer, syntax)


def _budget(options: dict[str, Any]) -> str:
    ratio_ = options.get("ratio")
    return f"R={ratio_:g}" if ratio_ is not None else f"keep={options.get('keep')}"


class _Modality:
    """One kind of visual input a pruning handle prunes: images, or video frames.

    Attributes:
        key: ``"image"`` / ``"video"`` (the ``mm_encoder_outputs`` key, and ``get_<key>_features``).
        token_id: its placeholder id in ``input_ids``.
        layout: the family's :data:`dyvte.engine.registry.FEATURE_LAYOUTS` entry for it.
        offset: feature entry ``p`` of a view is encoder token ``p + offset`` (for the ``"views"`` layout).
        original / signature: the base model's unwrapped feature method; wrapper: the handle's wrapper of it.
    """

    def __init__(self, key: str, token_id: int, layout: str, offset: int, base: nn.Module) -> None:
        self.key, self.token_id, self.offset = key, int(token_id), offset
        self.layout = FEATURE_LAYOUTS[layout]
        self.getter = f"get_{key}_features"
        self.original = getattr(base, self.getter)
        self.signature = inspect.signature(self.original)
        self.wrapper: Callable[..., Any] | None = None


def _token_id(config: Any, key: str) -> int:
    """The placeholder id of ``key`` (``"image"`` / ``"video"``) in a multimodal config."""
    value = getattr(config, f"{key}_token_id", None)
    return int(value if value is not None else getattr(config, f"{key}_token_index"))


def _refusal(model: nn.Module, family: Any) -> str:
    """Why a family without a feature layout cannot be pruned before the LLM (its encoder's [CLS], if it lacks one)."""
    tower = _get_path(model, family.vision_path)
    names = family.vision
    vision = getattr(tower, names.inner, tower)
    if getattr(getattr(vision, "embeddings", None), names.class_embedding, None) is None:
        return (
            f"its vision encoder ({type(vision).__name__}) has no [CLS] token, whose attention FasterVLM ranks "
            "patches by"
        )
    return "its image features are not laid out as patches of views dyvte can prune"


def _vision_attention(
    layer: nn.Module, hidden: torch.Tensor, cls: bool, names: VisionNames = _VISION_NAMES
) -> torch.Tensor:
    """Attention scores of one CLIP/SigLIP-style encoder layer, recomputed from its input.

    Args:
        layer: the encoder layer (``layer_norm1``, ``self_attn`` with ``q_proj`` / ``k_proj``).
        hidden: ``(V, S, D)`` the layer's input hidden states, one row per view.
        cls: score by the [CLS] (first) query's attention; otherwise by the mean attention each key receives.

    Returns:
        ``(V, S)`` float32: per key, the mean over heads (and, without [CLS], over queries).
    """
    attn = getattr(layer, names.attention)
    views, length, _ = hidden.shape
    heads, head_dim = getattr(attn, names.heads), getattr(attn, names.head_dim)
    scale = getattr(attn, names.scale, None) or attn.scaling
    x = getattr(layer, names.norm)(hidden)
    k = getattr(attn, names.key)(x).view(views, length, heads, head_dim).transpose(1, 2)  # (V, H, S, hd)
    q = getattr(attn, names.query)(x[:, :1] if cls else x).view(views, -1, heads, head_dim).transpose(1, 2)
    probs = ((q @ k.transpose(-1, -2)).float() * scale).softmax(-1)  # (V, H, Q, S), Q = 1 or S
    return probs.mean(dim=(1, 2))


class Pruning:
    """Handle of an active FasterVLM / random pruning before the LLM; a context manager. See :func:`prune`.

    Attributes:
        method: ``"fastervlm"`` or ``"random"``.
        keep: patches kept per full view (or ``None``); ``ratio``: fraction pruned (or ``None``).
        kept_columns: ``(B, T')`` long, for the last new sequence: the original column of each slot of the shortened
            prompt (``-1`` for padding slots), or ``None`` when nothing was pruned.
        fed_tokens: ``(B,)`` long, non-padding tokens per row the LLM received in the last new sequence.
        fed_visual: ``(B,)`` long, visual tokens per row the LLM received in the last new sequence.
        kept_features: per image of the last ``get_image_features`` call, ``(n_i,)`` bool over the model's feature
            entries (packed, for LLaVA-NeXT): which ones were kept.
        exit_layers, visual_after: always ``None`` (nothing is withdrawn inside the LLM); with ``fed_tokens`` and
            ``fed_visual`` they make the :class:`dyvte.engine.handle.Handle` protocol.
    """

    exit_layers: torch.Tensor | None = None
    visual_after: torch.Tensor | None = None

    def __init__(
        self,
        model: nn.Module,
        method: str,
        keep: int | None = None,
        ratio: float | None = None,
        seed: int = 0,
        scorer: PatchScorer | None = None,
    ) -> None:
        self.spec = resolve(model)
        family = self.spec.family
        if family.image_features is None:
            raise UnsupportedModelError(
                f"dyvte.prune(method={method!r}) does not support model_type={self.spec.model_type!r}: "
                f"{_refusal(self.spec.model, family)}. Supported: {', '.join(_supported())} "
                "(FastV, method='fastv', works on every family)."
            )
        if scorer is None:  # a registered method before the LLM, by name
            entry = PRUNING_METHODS.get(method)
            if entry is None or entry.scorer is None:
                before = sorted(n for n, m in PRUNING_METHODS.items() if m.scorer is not None)
                raise ValueError(f"Pruning handles the methods before the LLM ({', '.join(before)}), got {method!r}")
            scorer = entry.scorer
        self.method, self.seed, self.scorer = method, int(seed), scorer
        self.names = family.vision
        model = self.spec.model
        config = model.config
        self.base = model.base_model
        self.tower = _get_path(model, family.vision_path)
        vcfg = config.vision_config
        self.strategy = getattr(config, "vision_feature_select_strategy", "default")
        self.offset = 1 if self.strategy == "default" else 0  # feature entry p is encoder token p + offset
        self.view_tokens = (vcfg.image_size // vcfg.patch_size) ** 2 + 1 - self.offset  # N, features per full view
        self.keep, self.ratio = _check_budget(keep, ratio, self.view_tokens)
        names = self.names
        vision = getattr(self.tower, names.inner, self.tower)  # CLIP / SigLIP vision transformer
        self.has_cls = getattr(getattr(vision, "embeddings", None), names.class_embedding, None) is not None
        encoder_layers = _get_path(vision, names.layers)
        feature_layer = getattr(config, "vision_feature_layer", -1)
        if not isinstance(feature_layer, int):
            raise UnsupportedModelError(
                f"FasterVLM scores at the one encoder layer the MLLM reads; vision_feature_layer={feature_layer!r} "
                "selects several"
            )
        self.feature_layer = feature_layer
        self.score_layer = feature_layer % (len(encoder_layers) + 1) - 1  # hidden_states[i] is layer i-1's output
        if self.score_layer < 0:
            raise UnsupportedModelError("vision_feature_layer selects the patch embeddings: no attention to score by")
        self.kept_columns: torch.Tensor | None = None
        self.kept_features: list[torch.Tensor] | None = None
        self.kept_video_features: list[torch.Tensor] | None = None
        self.fed_tokens: torch.Tensor | None = None
        self.fed_visual: torch.Tensor | None = None
        self._prompt_len = 0
        self._dropped: torch.Tensor | None = None  # (B,) pruned columns per row
        self._cache_ref: weakref.ref | None = None
        self._cache_resets = 0
        self._capture: list[torch.Tensor] | None = None
        self._hooks: list[Any] = []
        self._undo_masks: Any = None
        seq_len = self.view_tokens + self.offset  # S, encoder tokens per view
        self._modalities = [
            _Modality("image", _token_id(config, "image"), family.image_features, self.offset, self.base)
        ]
        score_layers = [encoder_layers[self.score_layer]]
        if getattr(config, "video_token_id", None) is not None:
            video = None
            if family.video_features is not None:
                video = _Modality("video", _token_id(config, "video"), family.video_features, 0, self.base)
                video_tower = _get_path(model, family.video_path or family.vision_path)
                video_layers = _get_path(getattr(video_tower, names.inner, video_tower), names.layers)
                if video_tower is not self.tower:
                    score_layers.append(video_layers[self.score_layer])
            self._video = video  # None: video inputs are refused
            self._modalities += [video] if video is not None else []
        else:
            self._video = None
        self._seq_len = seq_len
        self._image_id = self._modalities[0].token_id
        self._visual_ids = torch.tensor([m.token_id for m in self._modalities])
        self._attach(score_layers)

    # ----------------------------------------------------------------------------------------------- lifecycle
    @property
    def model(self) -> nn.Module:
        """The hooked top-level model."""
        return self.spec.model

    def _attach(self, score_layers: list[nn.Module]) -> None:
        top = self.spec.model
        if getattr(top, PRUNING_ATTR, None) is not None or any(m.getter in vars(self.base) for m in self._modalities):
            raise PruningError("this model is already pruned by dyvte; remove that handle before pruning again")
        self._hooks.append(top.register_forward_pre_hook(self._pre_forward, with_kwargs=True, prepend=True))
        self._hooks.append(top.register_forward_hook(self._post_forward, with_kwargs=True))
        for layer in score_layers:
            self._hooks.append(layer.register_forward_pre_hook(self._score_hook, with_kwargs=True))
        for modality in self._modalities:
            modality.wrapper = self._wrap(modality)
            setattr(self.base, modality.getter, modality.wrapper)
        self._undo_masks = keep_2d_masks(top)  # static caches: generate passes the 2-D mask it shortens
        setattr(top, PRUNING_ATTR, self)

    def remove(self) -> None:
        """Remove every hook and the wrapper; the model is exactly as before. Safe to call twice."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for modality in self._modalities:
            if modality.wrapper is not None and vars(self.base).get(modality.getter) is modality.wrapper:
                delattr(self.base, modality.getter)
        if self._undo_masks is not None:
            self._undo_masks()
            self._undo_masks = None
        if getattr(self.spec.model, PRUNING_ATTR, None) is self:
            delattr(self.spec.model, PRUNING_ATTR)

    def __enter__(self) -> Pruning:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ------------------------------------------------------------------------------------------ feature path
    def _score_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._capture is not None:
            hidden = args[0] if args else kwargs[HIDDEN_STATES]  # (V, S, D)
            with torch.no_grad():
                self._capture.append(_vision_attention(module, hidden, self.has_cls, self.names))
        return None

    def _wrap(self, modality: _Modality) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return self._features(modality, *args, **kwargs)

        return wrapper

    def _features(self, modality: _Modality, *args: Any, **kwargs: Any) -> Any:
        """Wrapper of the base model's ``get_image_features`` / ``get_video_features``: the model's features, pruned
        per view (an image view, an any-resolution crop, a video frame)."""
        bound = modality.signature.bind(*args, **kwargs)
        layer = bound.arguments.get("vision_feature_layer")
        if layer is not None and layer != self.feature_layer:
            raise PruningError(
                f"pruning scores at vision_feature_layer={self.feature_layer}; the call asks for {layer}"
            )
        self._capture = [] if self.scorer.uses_attention else None
        try:
            out = modality.original(*args, **kwargs)
            captured = self._capture
        finally:
            self._capture = None
        pooled = out.pooler_output
        features = list(pooled)  # per image / frame (n_i, D)
        sources = self._sources(modality, bound.arguments, features)  # per entry (n_i,) encoder token, -1 = keep
        total = max((int(s.max()) + 1 for s in sources if s.numel()), default=0)  # encoder tokens scored
        attention = None
        if self.scorer.uses_attention:
            attention = torch.cat(captured).flatten() if captured else torch.empty(0)  # (V * S,)
            if attention.numel() < total:
                raise PruningError("the scoring encoder layer did not run on every view of these images")
        scores = self.scorer.score(attention, total, self.seed)
        seq_len = self.view_tokens + self.offset  # S, encoder tokens per view
        kept = [self._keep_mask(src, scores, seq_len) for src in sources]
        pruned = [f[k.to(f.device)] for f, k in zip(features, kept, strict=True)]
        if isinstance(pooled, torch.Tensor):  # the model reads one (entries, n, D) tensor: every entry keeps n
            if len({p.shape[0] for p in pruned}) > 1:
                raise PruningError("the views of these images keep different numbers of features; the model needs one")
            pruned = torch.stack(pruned) if pruned else pooled
        out.pooler_output = pruned
        setattr(out, _KEPT_ATTR, kept)
        if modality.key == "video":
            self.kept_video_features = kept
        else:
            self.kept_features = kept
        return out

    def _sources(self, modality: _Modality, arguments: dict, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per entry: the flat encoder-token index (view * S + token) of each feature; -1 for entries that stay."""
        grid = (self._seq_len, modality.offset, self.view_tokens)
        sources = modality.layout(self.spec.model, arguments, features, grid)  # the family's layout (registry)
        if [s.shape[0] for s in sources] != [f.shape[0] for f in features]:
            raise PruningError(f"could not locate the {self.spec.model_type} image features (packing changed?)")
        return sources

    def _keep_mask(self, sources: torch.Tensor, scores: torch.Tensor, seq_len: int) -> torch.Tensor:
        """``(n,)`` bool: the top entries of each view of one image by ``scores``; newline entries (-1) stay."""
        keep = sources < 0
        views = torch.where(keep, -1, sources // seq_len)
        for view in views.unique().tolist():
            if view < 0:
                continue
            members = (views == view).nonzero().flatten()  # (n_v,) entries of this view, in order
            count = members.numel()
            if self.keep is not None:
                budget = max(1, min(count, (2 * count * self.keep + self.view_tokens) // (2 * self.view_tokens)))
            else:
                budget = int(kept_count(torch.tensor(count), self.ratio))
            view_scores = scores[sources[members]].to(torch.float64)
            top = view_scores.argsort(descending=True, stable=True)[:budget]
            keep[members[top]] = True
        return keep

    # --------------------------------------------------------------------------------------------- top hooks
    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if len(args) > 1:
            raise PruningError("under dyvte.prune pass the model inputs as keyword arguments")
        kwargs = dict(kwargs)
        if args:
            kwargs[INPUT_IDS], args = args[0], ()
        input_ids = kwargs.get(INPUT_IDS)
        cache = cache_in(kwargs, self.spec.names.cache)
        new_sequence = self._is_new_sequence(cache)
        if new_sequence and cache is not None and (reason := check_cache(cache)) is not None:
            raise PruningError(f"pruning: {reason}")
        if not new_sequence:
            return args, self._continue(kwargs, cache)
        if self._video is None and any(kwargs.get(name) is not None for name in PIXEL_ARGS["video"]):
            raise PruningError(
                f"dyvte.prune(method={self.method!r}) prunes the images of model_type={self.spec.model_type!r} but not "
                "its videos: its video features are not one feature per encoder patch (registry: video_features). "
                "Pass the video without pruning, or use method='fastv'"
            )
        encoded = {m.key: self._encode(m, kwargs) for m in self._modalities}
        if input_ids is None:
            if any(v is not None for v in encoded.values()):
                raise PruningError("dyvte.prune needs input_ids to find the image placeholders (not inputs_embeds)")
            return args, kwargs
        batch, num_tokens = input_ids.shape
        placeholder = torch.isin(input_ids, self._visual_ids.to(input_ids.device))  # (B, T) every pruned kind
        keep = torch.ones_like(placeholder)
        for modality in self._modalities:
            outputs = encoded[modality.key]
            if outputs is None:
                continue
            kept = getattr(outputs, _KEPT_ATTR, None)
            if kept is None:
                raise PruningError(
                    f"these {modality.key} features were not computed under this dyvte.prune handle (precomputed "
                    "mm_encoder_outputs?): pass the pixels, or call generate inside the `with` block"
                )
            flat = torch.cat(kept).to(keep.device)
            mine = input_ids == modality.token_id  # (B, T)
            if int(mine.sum()) != flat.numel():
                raise PruningError(
                    f"input_ids hold {int(mine.sum())} {modality.key} placeholders for {flat.numel()} "
                    f"{modality.key} features"
                )
            keep[mine] = flat  # row-major, the order masked_scatter fills placeholders in
        mask = kwargs.get(ATTENTION_MASK)
        valid = mask.bool() if isinstance(mask, torch.Tensor) else torch.ones_like(keep)  # (B, T)
        pruned = ~keep  # (B, T) placeholders of pruned image entries
        self._prompt_len = num_tokens
        self._dropped = pruned.sum(1)  # (B,)
        if not bool(pruned.any()):
            self.kept_columns = None
            self.fed_tokens = valid.sum(1).cpu()
            self.fed_visual = (placeholder & valid).sum(1).cpu()
            return args, kwargs
        idx = pack_right(keep & valid)  # (B, T'): padding columns go too, rows are re-padded on the left
        slot_ok = idx >= 0
        kwargs[INPUT_IDS] = take(input_ids, idx, 1).masked_fill(~slot_ok, self._pad_id())
        kwargs[ATTENTION_MASK] = slot_ok.long() if mask is None else take(mask, idx, 1) * slot_ok
        position_ids = kwargs.get(POSITION_IDS)
        if position_ids is None:  # the shortened prompt's own positions (the model would count padding slots)
            kwargs[POSITION_IDS] = (slot_ok.long().cumsum(1) - 1).clamp(min=0)
        elif position_ids.shape == (batch, num_tokens):
            shifted = position_ids - pruned.long().cumsum(1)  # a kept token moves back by the pruned before it
            kwargs[POSITION_IDS] = take(shifted, idx, 1).masked_fill(~slot_ok, 0)
        else:
            raise PruningError(f"position_ids of shape {tuple(position_ids.shape)} are not supported under pruning")
        for key, value in list(kwargs.items()):
            if key in (INPUT_IDS, ATTENTION_MASK, POSITION_IDS) or not isinstance(value, torch.Tensor):
                continue
            if value.shape[:2] == (batch, num_tokens):  # labels, token_type_ids, visual_mask, ...
                pad = ~slot_ok.view(*idx.shape, *[1] * (value.dim() - 2))
                kwargs[key] = take(value, idx, 1).masked_fill(pad, -100 if key == "labels" else 0)
        self.kept_columns = idx
        self.fed_tokens = slot_ok.sum(1).cpu()
        self.fed_visual = (take(placeholder, idx, 1) & slot_ok).sum(1).cpu()
        return args, kwargs

    def _encode(self, modality: _Modality, kwargs: dict) -> Any:
        """The call's features of one modality (computed here, pruned, from its pixels), or ``None``; the pixels
        are replaced by the features in ``kwargs`` (``mm_encoder_outputs``)."""
        encoded = kwargs.get(MM_ENCODER_OUTPUTS) or {}
        outputs = encoded.get(modality.key)
        name = next((n for n in PIXEL_ARGS[modality.key] if kwargs.get(n) is not None), None)
        if outputs is not None or name is None:
            return outputs
        call = {"return_dict": True}
        for key in ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes"):
            if kwargs.get(key) is not None and key in modality.signature.parameters:
                call[key] = kwargs[key]
        outputs = modality.wrapper(kwargs[name], **call)
        kwargs[name] = None
        kwargs[MM_ENCODER_OUTPUTS] = {**encoded, modality.key: outputs}
        return outputs

    def _is_new_sequence(self, cache: Any) -> bool:
        """Whether a call with ``cache`` starts a sequence; a cache this handle filled is not read (no host sync)."""
        if cache is None:
            return True
        known = self._cache_ref() if self._cache_ref is not None else None
        if known is cache:
            return cache_resets(cache) != self._cache_resets  # generate() resets and reuses a static cache
        return cache_length_host(cache) == 0

    def _continue(self, kwargs: dict, cache: Any) -> dict:
        """A decode step: map the caller's full-length mask and positions onto the shortened prompt."""
        known = self._cache_ref() if self._cache_ref is not None else None
        if known is not cache:
            raise PruningError(
                "the KV cache passed in was not produced under this prune handle: prefill and decode under it"
            )
        if self.kept_columns is None:
            return kwargs
        idx, prompt = self.kept_columns, self._prompt_len
        mask = kwargs.get(ATTENTION_MASK)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            if mask.shape[1] < prompt:
                raise PruningError(f"attention_mask has {mask.shape[1]} columns, fewer than the prompt's {prompt}")
            kwargs[ATTENTION_MASK] = torch.cat([take(mask[:, :prompt], idx, 1) * (idx >= 0), mask[:, prompt:]], 1)
        position_ids = kwargs.get(POSITION_IDS)
        if isinstance(position_ids, torch.Tensor):
            kwargs[POSITION_IDS] = position_ids - self._dropped[:, None]  # same device: no copy, no sync
        return kwargs

    def _post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        cache = cache_out(output, self.spec.names.cache)
        self._cache_ref = weakref.ref(cache) if cache is not None else None
        self._cache_resets = cache_resets(cache) if cache is not None else 0
        return output

    def _pad_id(self) -> int:
        config = self.spec.model.config
        for cfg in (config, config.get_text_config()):
            pad = getattr(cfg, "pad_token_id", None)
            if pad is not None and pad != self._image_id:
                return int(pad)
        return 0 if self._image_id != 0 else 1


def _check_budget(keep: int | None, ratio: float | None, view_tokens: int) -> tuple[int | None, float | None]:
    if (keep is None) == (ratio is None):
        raise TypeError("pass exactly one of keep= (tokens kept per view) or ratio= (fraction pruned)")
    if keep is not None:
        if isinstance(keep, bool) or not isinstance(keep, int):
            raise TypeError(f"keep must be an int, got {keep!r}")
        if not 1 <= keep <= view_tokens:
            raise ValueError(f"keep={keep} is out of range: each image view has {view_tokens} tokens, keep 1..that")
        return keep, None
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio (the fraction pruned) must be in [0, 1), got {ratio!r}")
    return None, float(ratio)


def prune(
    model: nn.Module,
    method: str = "fastervlm",
    *,
    keep: int | None = None,
    ratio: float | None = None,
    layer: int | None = None,
    seed: int = 0,
) -> Pruning | FastV:
    """Prune visual tokens: FasterVLM or random before the LLM, or FastV inside it.

    Usable as a context manager or kept as a handle (``handle.remove()`` restores the model). ``fastervlm`` /
    ``random`` nest with :func:`dyvte.withdraw` (either order)::

        with dyvte.prune(model, method="fastervlm", ratio=0.75), dyvte.withdraw(model, layer=16):
            out = model.generate(**inputs)

    Args:
        model: a supported transformers model (``fastervlm`` / ``random``: LLaVA-1.5, LLaVA-NeXT, LLaVA-NeXT-Video's
            images, Video-LLaVA's images and video frames; ``fastv``: every
            family of ``dyvte.supported_model_types()``).
        method: ``"fastervlm"``, ``"random"`` or ``"fastv"``.
        keep: patches kept per image view (``fastervlm`` / ``random``), in ``[1, N]``.
        ratio: fraction of visual tokens pruned, in ``[0, 1)`` (``fastv`` needs it).
        layer: FastV's layer K >= 1: tokens are ranked by layer K-1's attention and dropped from layer K on.
        seed: seed of the random subset (``random``).

    Returns:
        The :class:`Pruning` handle, or a :class:`dyvte.policies.fastv.FastV` withdrawal handle for ``fastv``.
    """
    model = unwrap(model)
    entry = PRUNING_METHODS.get(method)
    if entry is None:
        raise ValueError(f"unknown pruning method {method!r}; use one of {', '.join(sorted(PRUNING_METHODS))}")
    return entry.build(model, keep=keep, ratio=ratio, layer=layer, seed=seed)


def _fastervlm_scores(attention: torch.Tensor | None, total: int, seed: int) -> torch.Tensor:
    return attention.to(torch.float64)  # the [CLS] attention (the mean attention without a [CLS] token)


def _random_scores(attention: torch.Tensor | None, total: int, seed: int) -> torch.Tensor:
    return torch.rand(max(total, 1), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _fastv(
    model: nn.Module, *, keep: int | None = None, ratio: float | None = None, layer: int | None = None, seed: int = 0
) -> FastV:
    if keep is not None or ratio is None or layer is None:
        raise TypeError("method='fastv' needs layer=K and ratio=R (not keep=)")
    return FastV(model, layer=layer, ratio=ratio)


register_pruning(scorer_method("fastervlm", PatchScorer(uses_attention=True, score=_fastervlm_scores)))
register_pruning(scorer_method("random", PatchScorer(uses_attention=False, score=_random_scores)))


def _parse_fastv(argument: str, num_layers: int) -> list[dict[str, Any]]:
    """``fastv:K:R[,R...]`` (K in [1, L])."""
    layer, _, ratios = argument.partition(":")
    if not ratios.strip():
        raise ArgumentError("FastV needs a layer K and ratios R")
    k = int_in(layer.strip(), 1, num_layers, "layer K")
    return [{"layer": k, "ratio": pruned_fraction(r)} for r in items(ratios, "ratio R")]


FASTV_SYNTAX = MethodSyntax(
    form="fastv:K:R[,R...] (K an int in [1, L], R the fraction of visual tokens pruned, in [0, 1))",
    short="fastv:K:R",
    parse=_parse_fastv,
    name=lambda options: f"fastv K={options['layer']} {_budget(options)}",
)
register_pruning(PruningMethod("fastv", "inside", _fastv, syntax=FASTV_SYNTAX))
