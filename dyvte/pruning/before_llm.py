"""Pruning before the LLM (FasterVLM, random, and any registered :class:`dyvte.pruning.scoring.PatchScorer`).

The LLM then sees a shorter prompt (consecutive positions, as if the pruned placeholders had never been there).
Mechanism, all hooks on the unmodified model:

* ``get_image_features`` of the base model is wrapped (an instance attribute, removed with the handle). It is the
  single entry of both paths: ``generate`` calls it before prefill, a plain forward through the pre-hook below. The
  wrapper switches on a forward pre-hook on the scoring encoder layer, which recomputes that layer's q/k from its
  own input, then drops the pruned entries from ``pooler_output`` and records which ones it kept on the output.
* A forward pre-hook on the top-level model (``prepend=True``, so it runs before any withdrawal hook) drops the
  placeholders of pruned entries from ``input_ids`` and every other per-token tensor, renumbers ``position_ids``
  and remembers the kept columns per row (:mod:`dyvte.pruning.prompt`); in decode steps it shrinks the growing 2-D
  ``attention_mask`` and shifts ``position_ids`` the same way, so the KV cache and ``generate`` stay consistent.

Views: LLaVA-1.5 has one view per image. LLaVA-NeXT packs a base view and an unpadded crop grid with one newline
token per grid row; each view (the base view, each grid crop) is pruned on its own, the packed features are pruned
per image after the model's own packing (every packed entry is located by running the model's
``pack_image_features`` on patch indices) and newline tokens are always kept, so the row structure survives.

Video frames (Video-LLaVA, registry ``video_features="frames"``): ``get_video_features`` is wrapped the same way;
each frame is a view ranked by its own [CLS] attention in the video tower, and its [CLS] feature (which Video-LLaVA
feeds the LLM) stays. Other families' videos are refused under pruning; encoders without a [CLS] token are refused
at ``prune()`` (docs/design.md §2).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dyvte.engine.compat import (
    HIDDEN_STATES,
    INPUT_IDS,
    MM_ENCODER_OUTPUTS,
    PIXEL_ARGS,
    cache_in,
    cache_length_host,
    cache_out,
    cache_resets,
    check_cache,
    keep_2d_masks,
)
from dyvte.engine.registry import UnsupportedModelError, _get_path, resolve
from dyvte.engine.withdrawal import PRUNING_ATTR
from dyvte.pruning.prompt import continue_prompt, pad_id, shorten_prompt
from dyvte.pruning.registry import PRUNING_METHODS
from dyvte.pruning.scoring import (
    KEPT_ATTR,
    Modality,
    PatchScorer,
    PruningError,
    check_budget,
    keep_mask,
    refusal,
    supported_types,
    token_id,
    vision_attention,
)
from dyvte.utils.threads import PerThread

__all__ = ["Pruning"]


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

    # per-call state, per calling thread (docs/design.md §4, "Threads")
    kept_columns = PerThread()
    kept_features = PerThread()
    kept_video_features = PerThread()
    fed_tokens = PerThread()
    fed_visual = PerThread()
    _prompt_len = PerThread(0)
    _short = PerThread()  # the last new sequence's shortened prompt
    _cache_ref = PerThread()
    _cache_resets = PerThread(0)
    _capture = PerThread()

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
                f"{refusal(self.spec.model, family)}. Supported: {', '.join(supported_types())} "
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
        self.keep, self.ratio = check_budget(keep, ratio, self.view_tokens)
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
        self._hooks: list[Any] = []
        self._undo_masks: Any = None
        seq_len = self.view_tokens + self.offset  # S, encoder tokens per view
        self._modalities = [Modality("image", token_id(config, "image"), family.image_features, self.offset, self.base)]
        score_layers = [encoder_layers[self.score_layer]]
        if getattr(config, "video_token_id", None) is not None:
            video = None
            if family.video_features is not None:
                video = Modality("video", token_id(config, "video"), family.video_features, 0, self.base)
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
                self._capture.append(vision_attention(module, hidden, self.has_cls, self.names))
        return None

    def _wrap(self, modality: Modality) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return self._features(modality, *args, **kwargs)

        return wrapper

    def _features(self, modality: Modality, *args: Any, **kwargs: Any) -> Any:
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
            # (V * S,) on the host, where the views are ranked (the sources are host tensors; one copy per image batch)
            attention = torch.cat(captured).flatten().cpu() if captured else torch.empty(0)
            if attention.numel() < total:
                raise PruningError("the scoring encoder layer did not run on every view of these images")
        scores = self.scorer.score(attention, total, self.seed)
        seq_len = self.view_tokens + self.offset  # S, encoder tokens per view
        kept = [keep_mask(src, scores, seq_len, self.keep, self.ratio, self.view_tokens) for src in sources]
        pruned = [f[k.to(f.device)] for f, k in zip(features, kept, strict=True)]
        if isinstance(pooled, torch.Tensor):  # the model reads one (entries, n, D) tensor: every entry keeps n
            if len({p.shape[0] for p in pruned}) > 1:
                raise PruningError("the views of these images keep different numbers of features; the model needs one")
            pruned = torch.stack(pruned) if pruned else pooled
        out.pooler_output = pruned
        setattr(out, KEPT_ATTR, kept)
        if modality.key == "video":
            self.kept_video_features = kept
        else:
            self.kept_features = kept
        return out

    def _sources(self, modality: Modality, arguments: dict, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per entry: the flat encoder-token index (view * S + token) of each feature; -1 for entries that stay."""
        grid = (self._seq_len, modality.offset, self.view_tokens)
        sources = modality.layout(self.spec.model, arguments, features, grid)  # the family's layout (registry)
        if [s.shape[0] for s in sources] != [f.shape[0] for f in features]:
            raise PruningError(f"could not locate the {self.spec.model_type} image features (packing changed?)")
        return sources

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
        self._prompt_len = input_ids.shape[1]
        return args, self._shorten(kwargs, input_ids, encoded)

    def _shorten(self, kwargs: dict, input_ids: torch.Tensor, encoded: dict[str, Any]) -> dict:
        """The new sequence's per-token tensors without the placeholders of pruned entries (``kwargs`` updated)."""
        keep = torch.ones_like(input_ids, dtype=torch.bool)  # (B, T)
        for modality in self._modalities:
            outputs = encoded[modality.key]
            if outputs is None:
                continue
            kept = getattr(outputs, KEPT_ATTR, None)
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
        placeholder = torch.isin(input_ids, self._visual_ids.to(input_ids.device))  # (B, T) every pruned kind
        shortened = shorten_prompt(kwargs, input_ids, keep, placeholder, pad_id(self.spec.model.config, self._image_id))
        self._short = shortened
        self.kept_columns = shortened.kept_columns
        self.fed_tokens, self.fed_visual = shortened.fed_tokens, shortened.fed_visual
        return kwargs

    def _encode(self, modality: Modality, kwargs: dict) -> Any:
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
        return continue_prompt(kwargs, self._short, self._prompt_len)

    def _post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        cache = cache_out(output, self.spec.names.cache)
        self._cache_ref = weakref.ref(cache) if cache is not None else None
        self._cache_resets = cache_resets(cache) if cache is not None else 0
        return output
