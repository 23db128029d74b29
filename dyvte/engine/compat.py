"""The one place where dyvte reads names out of transformers calls (see docs/design.md §4, "Compatibility").

transformers renames internals between minor releases: 5.24 renamed the cache argument ``past_key_values`` to
``cache`` (in model and decoder-layer calls, and in their outputs) with only a deprecation warning, so code that read
``kwargs.get("past_key_values")`` silently got ``None``. dyvte therefore never reads such a name directly:

* :func:`call_names` resolves, once per model, the names its calls use, from the ``forward`` signatures, and raises
  :class:`CompatibilityError` when none of the spellings dyvte knows is there (a future rename fails loudly);
* :func:`cache_in` / :func:`cache_out` read the cache going into a call and coming out of it;
* :func:`attn_implementation` reads the attention implementation, :func:`cache_layer` and :func:`check_cache` the
  cache's per-layer internals (length, sliding window, which cache classes withdrawal can shorten).

Tests use the same accessors, so the suite runs unchanged on every supported transformers release.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "ATTENTION_MASK",
    "CACHE_NAMES",
    "CHAT_TEMPLATE_ATTR",
    "IMAGE_TOKEN_ATTR",
    "HIDDEN_STATES",
    "INPUTS_EMBEDS",
    "INPUT_IDS",
    "LAYER_ARGS",
    "MM_ENCODER_OUTPUTS",
    "PIXEL_ARGS",
    "POSITION_EMBEDDINGS",
    "POSITION_IDS",
    "TOP_ARGS",
    "USE_CACHE",
    "CallNames",
    "CaptureCache",
    "CompatibilityError",
    "DEEPSTACK_EMBEDS",
    "DEEPSTACK_MASK",
    "ENCODER_METHODS",
    "check_deepstack",
    "attn_implementation",
    "cache_in",
    "cache_layer",
    "cache_length",
    "cache_tensors",
    "cache_state_tensors",
    "cache_out",
    "cache_capacity",
    "cache_key_view",
    "cache_length_host",
    "cache_repeat_rows",
    "cache_resets",
    "call_names",
    "hidden_states_of",
    "logit_lens",
    "logits_of",
    "chat_template",
    "check_cache",
    "keep_2d_masks",
    "generate_taking",
    "image_token",
    "seal_cache",
]

CACHE_NAMES: tuple[str, ...] = ("cache", "past_key_values")  # newest spelling first (5.24+, then 5.0-5.23)
# argument names dyvte reads and rewrites; checked against the signatures by call_names()
INPUT_IDS, INPUTS_EMBEDS, ATTENTION_MASK = "input_ids", "inputs_embeds", "attention_mask"
POSITION_IDS, POSITION_EMBEDDINGS, HIDDEN_STATES = "position_ids", "position_embeddings", "hidden_states"
MM_ENCODER_OUTPUTS = "mm_encoder_outputs"  # precomputed vision features that generate() hands to the prefill call
# the pixel arguments of a model call, per modality: Video-LLaVA's image pixels are `pixel_values_images` up to
# transformers 5.22 and `pixel_values` from 5.23 (the old name is still accepted, and its processor still returns it)
PIXEL_ARGS: dict[str, tuple[str, ...]] = {
    "image": ("pixel_values", "pixel_values_images"),
    "video": ("pixel_values_videos",),
}
USE_CACHE = "use_cache"
# the base model's vision-encoder entry points its forward calls (``self.get_image_features(...)``), per modality
ENCODER_METHODS: tuple[str, ...] = ("get_image_features", "get_video_features")
LOGITS = "logits"  # output field of every model call
LOGITS_TO_KEEP = "logits_to_keep"  # top-level argument: the LM head runs on the last N positions only
TOP_ARGS: tuple[str, ...] = (INPUT_IDS, INPUTS_EMBEDS, ATTENTION_MASK)
LAYER_ARGS: tuple[str, ...] = (HIDDEN_STATES, ATTENTION_MASK, POSITION_EMBEDDINGS, POSITION_IDS)
# DeepStack (Qwen3-VL): the text decoder's arguments holding the visual positions and the per-layer features it adds
# to them after each of its first layers (docs/design.md §4, "DeepStack")
DEEPSTACK_MASK, DEEPSTACK_EMBEDS = "visual_pos_masks", "deepstack_visual_embeds"
_DYNAMIC_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")  # cache layers that grow by concatenation
_STATIC_LAYERS = ("StaticLayer", "StaticSlidingWindowLayer")  # pre-allocated; each layer counts its own length
# a linear-attention layer's conv and recurrent states are per row, not per token: withdrawal changes what they
# summarise (the kept sequence), never their shape
_LINEAR_LAYERS = ("LinearAttentionLayer",)
_LINEAR_STATES = ("conv_states", "recurrent_states")  # its state dicts, keyed by state index
_LAYERS = _DYNAMIC_LAYERS + _STATIC_LAYERS + _LINEAR_LAYERS  # cache layers whose layers may hold different lengths


def logits_of(output: Any) -> torch.Tensor:
    """The ``logits`` field of a model call's output (``(B, T, V)``)."""
    return output[LOGITS]


def hidden_states_of(output: Any) -> tuple[torch.Tensor, ...]:
    """The per-layer ``hidden_states`` of a call made with ``output_hidden_states=True``: ``L + 1`` tensors
    ``(B, T, d)``, the embeddings first.

    Raises:
        CompatibilityError: the output carries none (the call did not ask, or a release renamed the field).
    """
    states = output.get(HIDDEN_STATES) if hasattr(output, "get") else None
    if states is None:
        raise CompatibilityError(
            f"the model output has no {HIDDEN_STATES!r} (call the model with output_hidden_states=True); "
            f"fields: {list(output.keys()) if hasattr(output, 'keys') else type(output).__name__}"
        )
    return states


def logit_lens(model: nn.Module, decoder: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(final norm, LM head)`` of a model: the modules that turn a decoder layer's output into logits."""
    return decoder.norm, model.get_output_embeddings()


class CompatibilityError(RuntimeError):
    """The installed transformers calls things by names dyvte does not know (the message names them)."""


@dataclass(frozen=True)
class CallNames:
    """The argument names one model's calls use, resolved from its ``forward`` signatures.

    Attributes:
        cache: name of the cache argument of the top-level ``forward`` (and of the cache field of its output).
        layer_cache: name of the cache argument of the decoder layers' ``forward``.
    """

    cache: str
    layer_cache: str


def _parameters(fn: Any) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)  # follows functools.wraps (transformers' deprecate_kwarg)
    except (TypeError, ValueError):
        return set()


def _pick(params: set[str], known: tuple[str, ...], where: str) -> str:
    for name in known:
        if name in params:
            return name
    raise CompatibilityError(
        f"{where} takes none of the argument names {list(known)} that dyvte knows "
        f"(it takes {sorted(params)}): this transformers release renamed them. Install the tested version "
        "range (see pyproject.toml / constraints.txt) or update dyvte.engine.compat."
    )


def call_names(model: nn.Module, layer: nn.Module) -> CallNames:
    """Resolve the names of ``model``'s calls once, from the signatures of its and a decoder layer's ``forward``.

    Args:
        model: the top-level model the user calls.
        layer: one of its decoder layers.

    Returns:
        The resolved :class:`CallNames`.

    Raises:
        CompatibilityError: a signature has none of the known cache names, or the model does not take one of
            :data:`TOP_ARGS` / a decoder layer one of :data:`LAYER_ARGS` by name (dyvte would read or rewrite an
            argument the call never sees).
    """
    top = _parameters(model.forward)
    layer_params = _parameters(layer.forward)
    cache = _pick(top, CACHE_NAMES, f"{type(model).__name__}.forward")
    layer_cache = _pick(layer_params, CACHE_NAMES, f"{type(layer).__name__}.forward")
    for where, params, needed in ((model, top, TOP_ARGS), (layer, layer_params, LAYER_ARGS)):
        missing = [name for name in needed if name not in params]
        if missing:
            raise CompatibilityError(
                f"{type(where).__name__}.forward takes no argument named {missing}: this transformers release "
                "renamed what dyvte reads or rewrites in its calls. Install the tested version range (see "
                "pyproject.toml / constraints.txt) or update dyvte.engine.compat."
            )
    return CallNames(cache=cache, layer_cache=layer_cache)


def check_deepstack(decoder: nn.Module) -> None:
    """Check that a DeepStack text decoder's ``forward`` takes :data:`DEEPSTACK_MASK` and :data:`DEEPSTACK_EMBEDS`.

    Raises:
        CompatibilityError: one of them is missing (this release renamed what dyvte takes over).
    """
    params = _parameters(decoder.forward)
    missing = [name for name in (DEEPSTACK_MASK, DEEPSTACK_EMBEDS) if name not in params]
    if missing:
        raise CompatibilityError(
            f"{type(decoder).__name__}.forward takes no argument named {missing}: this transformers release renamed "
            "the DeepStack inputs dyvte applies after withdrawal. Install the tested version range (see "
            "pyproject.toml / constraints.txt) or update dyvte.engine.compat."
        )


def cache_in(kwargs: dict[str, Any], name: str) -> Any:
    """The cache passed to a call: under the resolved ``name``, else under an older spelling the caller still used.

    A caller on transformers >= 5.24 may still pass the deprecated ``past_key_values=``; hooks see kwargs before the
    model's deprecation shim renames them, so both spellings are read here.
    """
    value = kwargs.get(name)
    if value is None:
        for other in CACHE_NAMES:
            if other != name and kwargs.get(other) is not None:
                return kwargs[other]
    return value


def cache_out(output: Any, name: str | None = None) -> Any:
    """The cache a model or ``generate`` call returned (``None`` when it returned none or a plain tuple).

    Args:
        output: a transformers ``ModelOutput`` (model forward or ``generate(return_dict_in_generate=True)``).
        name: the resolved cache name (:attr:`CallNames.cache`); without it every known spelling is tried.
    """
    if not isinstance(output, dict):  # ModelOutput is an OrderedDict of its non-None fields
        return None
    # plain dict access: ModelOutput's own __contains__/__getitem__ map old names and log a deprecation warning
    for key in (name,) if name is not None else CACHE_NAMES:
        if dict.__contains__(output, key):
            return dict.__getitem__(output, key)
    return None


def attn_implementation(config: Any) -> str:
    """The attention implementation a (text) config asks for: ``"sdpa"``, ``"eager"``, ...

    Raises:
        CompatibilityError: the config has no ``_attn_implementation`` attribute (renamed upstream).
    """
    if not hasattr(config, "_attn_implementation"):
        raise CompatibilityError(
            f"{type(config).__name__} has no _attn_implementation: dyvte cannot tell which attention the model runs"
        )
    return config._attn_implementation or "eager"


def check_cache(cache: Any) -> str | None:
    """Why withdrawal cannot use this cache, or ``None`` when it can.

    Withdrawal and pruning shorten the sequence that layers >= K store, so every cache layer must keep its own
    length: transformers' dynamic layers do (they grow by concatenation), and so do its static ones (each
    pre-allocated layer writes at its own running length, so a withdrawn layer simply fills fewer slots).
    Quantized and offloaded layers are refused.
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        return f"{type(cache).__name__} exposes no per-layer storage (.layers), which dyvte needs"
    kinds = sorted({type(layer).__name__ for layer in layers} - set(_LAYERS))
    if kinds:
        return (
            f"a {type(cache).__name__} with {', '.join(kinds)} layers cannot be used: after an exit, layers >= K "
            "store only the kept tokens, so the layers of one cache hold different lengths, which a quantized or "
            "offloaded cache cannot express. Use the default dynamic cache or cache_implementation='static'"
        )
    return None


def cache_length_host(cache: Any) -> int:
    """Tokens held by a cache, as a Python int. A static cache counts them in a tensor: reading it is a host sync,
    so the engine calls this only for a cache it has not seen before (a fresh static cache answers 0 untouched)."""
    length = cache.get_seq_length()
    return int(length) if isinstance(length, torch.Tensor) else length


def cache_resets(cache: Any) -> int:
    """How many times ``cache.reset()`` ran since dyvte first saw the cache (``generate`` resets and reuses a static
    cache between calls). The first call wraps the instance's ``reset`` (the class is untouched)."""
    if "_dyvte_resets" not in vars(cache):
        cache._dyvte_resets = 0
        cache.reset = types.MethodType(_counting_reset, cache)  # a bound method: a deepcopy rebinds it to the copy
    return cache._dyvte_resets


def _counting_reset(cache: Any, *args: Any, **kwargs: Any) -> Any:
    cache._dyvte_resets += 1
    return type(cache).reset(cache, *args, **kwargs)


def cache_repeat_rows(cache: Any, times: int) -> None:
    """Repeat every row of ``cache`` ``times`` times in place, each copy next to its row (as beam search expands).

    transformers' ``LinearAttentionLayer`` (Qwen3.5's Gated DeltaNet) has no ``batch_repeat_interleave``: its conv
    and recurrent states (dicts of ``(B, ...)`` tensors) are repeated here.
    """
    for layer in cache.layers:
        if hasattr(layer, "batch_repeat_interleave"):
            layer.batch_repeat_interleave(times)
            continue
        states = [getattr(layer, name, None) for name in _LINEAR_STATES]
        if not all(isinstance(s, dict) for s in states):
            raise CompatibilityError(f"cannot repeat the rows of a {type(layer).__name__} cache layer")
        for state in states:
            for key, tensor in state.items():
                if isinstance(tensor, torch.Tensor):
                    state[key] = tensor.repeat_interleave(times, 0)


def cache_capacity(cache: Any) -> int | None:
    """The length every layer of a pre-allocated cache holds keys for, when all its layers are full-attention
    ``StaticLayer``s of one length (``None``: a dynamic cache, sliding layers, or no cache)."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer).__name__ != "StaticLayer" for layer in layers):
        return None
    lengths = {int(layer.max_cache_len) for layer in layers}
    return lengths.pop() if len(lengths) == 1 else None


def cache_key_view(layer: Any, past: int, query: int) -> tuple[int, int]:
    """Which slots of a layer's history the keys of its attention hold, from host counts only (no sync).

    The history of a layer is every token it was given, in order (``past`` before this call, ``query`` in it).

    Returns:
        ``(first, length)``: key slot ``j`` holds history entry ``first + j``; entries at or after ``past + query``
        are empty (a pre-allocated layer's unused slots), which the mask hides.
    """
    if layer is None:
        return 0, query
    name = type(layer).__name__
    if name == "StaticLayer":
        return 0, int(layer.max_cache_len)
    if name == "StaticSlidingWindowLayer":
        size = int(layer.max_cache_len)  # min(window, max_cache_len)
        if past >= size:  # full: one new token rolls the buffer, several are appended to its last size - 1
            return (past + 1 - size, size) if query == 1 else (past - size + 1, size - 1 + query)
        if past + query > size:
            return 0, past + query
        return 0, size
    if getattr(layer, "is_sliding", False):  # a dynamic sliding layer keeps its last window - 1 entries
        keep = min(past, int(layer.sliding_window) - 1)
        return past - keep, keep + query
    return 0, past + query


def cache_layer(cache: Any, index: int) -> tuple[Any, int | None]:
    """Layer ``index`` of a cache and the width of its sliding window (``None`` for full attention).

    Returns ``(None, None)`` when there is no cache.
    """
    if cache is None:
        return None, None
    layer = cache.layers[index]
    window = getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
    return layer, window


def cache_length(cache: Any) -> int:
    """Tokens held by a cache (its first layer) or by one cache layer (a 0-d tensor for static layers)."""
    return cache.get_seq_length()


def cache_tensors(cache: Any) -> Iterator[torch.Tensor]:
    """The key and value tensors of every layer of a cache (layers not yet filled hold none)."""
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                yield tensor


def cache_state_tensors(cache: Any) -> Iterator[torch.Tensor]:
    """The convolution and recurrent state tensors of every linear-attention layer of a cache (transformers'
    ``LinearAttentionLayer``: ``conv_states`` / ``recurrent_states``, dicts keyed by state index); none for other
    layers or states not yet filled."""
    for layer in getattr(cache, "layers", []):
        for name in _LINEAR_STATES:
            states = getattr(layer, name, None)
            if isinstance(states, dict):
                yield from (t for t in states.values() if isinstance(t, torch.Tensor))


def seal_cache(cache: Any, error: Exception) -> None:
    """Make every later write into ``cache`` raise ``error`` (the cache's class and the model are untouched).

    Used for a cache whose layers hold a withdrawn layout once its handle is gone: the unhooked model would attend
    with masks of the wrong width (a shape error deep inside attention, or wrong numbers).
    """
    if cache is None or getattr(cache, "_dyvte_sealed", False):
        return

    def update(*args: Any, **kwargs: Any) -> Any:
        raise error

    cache.update = update  # an instance attribute shadows Cache.update, which every attention layer calls
    cache._dyvte_sealed = True


class CaptureCache:
    """Stands in for the KV cache in one decoder-layer call of a prefill run on a group of rows (dyvte.engine.grouping).

    Attention layers call ``cache.update(keys, values, layer_idx, ...)`` and attend to what it returns. A prefill's
    cache layer is empty, so the true update would return exactly its inputs: this one returns them too, and keeps
    them, with the call's other arguments, for :meth:`replay` into the real cache once every group has run.
    """

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None  # (B_g, H_kv, W_g, h)
        self.values: torch.Tensor | None = None
        self._call: tuple[int, tuple, dict] | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep and return the new keys and values (the attention of an empty cache layer sees only them)."""
        self.keys, self.values, self._call = key_states, value_states, (layer_idx, args, kwargs)
        return key_states, value_states

    def replay(self, cache: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``keys``/``values`` (the whole batch's) into ``cache`` with the captured call's other arguments."""
        if self._call is None:
            raise RuntimeError("CaptureCache.replay before any update")
        layer_idx, args, kwargs = self._call
        cache.update(keys, values, layer_idx, *args, **kwargs)


MASKS_FOR_GENERATE = "create_masks_for_generate"  # generate() turns the 2-D mask into 4-D ones for static caches


def keep_2d_masks(model: nn.Module, pad: Callable[[], bool] = lambda: False) -> Callable[[], None]:
    """Make ``generate`` hand ``model`` the caller's 2-D padding mask even with a static cache; returns the undo.

    With a compileable (static) cache, ``generate`` builds the 4-D masks before each call through the model's
    ``create_masks_for_generate``. Withdrawal needs the 2-D mask (it builds the masks of layers >= K itself, from the
    kept tokens' original columns), so an instance attribute shadows that method with one returning the 2-D mask;
    the model's forward then builds its own 4-D masks, as it does with a dynamic cache. In a decode step, when
    ``pad()`` says so, the mask is right-padded with zeros to the static cache's length, so a compiled decode step
    sees the same shapes at every step (``generate``'s own mask, which grows by a column per step, is untouched).
    The class is untouched, and the undo deletes the attribute.
    """

    if getattr(vars(model).get(MASKS_FOR_GENERATE), "_dyvte", False):  # an outer dyvte handle did it already
        return lambda: None

    def passthrough(*args: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
        embeds, capacity = kwargs.get("inputs_embeds"), cache_capacity(kwargs.get("cache"))
        decoding = isinstance(embeds, torch.Tensor) and embeds.shape[1] == 1
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and decoding and capacity and pad():
            attention_mask = torch.nn.functional.pad(attention_mask, (0, capacity - attention_mask.shape[1]))
        return attention_mask

    passthrough._dyvte = True
    setattr(model, MASKS_FOR_GENERATE, passthrough)

    def undo() -> None:
        if vars(model).get(MASKS_FOR_GENERATE) is passthrough:
            delattr(model, MASKS_FOR_GENERATE)

    return undo


GENERATE = "generate"


def generate_taking(model: nn.Module, name: str, hold: Callable[[Any], None]) -> Callable[[], None]:
    """Let ``model.generate`` take the keyword argument ``name`` that the model's ``forward`` does not declare
    (``generate`` refuses such an argument: ``model_kwargs are not used by the model``); returns the undo.

    An instance attribute wraps ``generate``: when a call gives ``name``, it is popped and its value handed to
    ``hold`` for the duration of the call (``hold(None)`` after, however the call ends); other calls pass through
    untouched. The class is untouched; the undo restores what the instance had before (usually nothing).
    """
    before = vars(model).get(GENERATE)  # an instance attribute someone else set, restored by the undo
    original = model.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        if name not in kwargs:
            return original(*args, **kwargs)
        hold(kwargs.pop(name))
        try:
            return original(*args, **kwargs)
        finally:
            hold(None)

    generate.__doc__ = original.__doc__
    setattr(model, GENERATE, generate)

    def undo() -> None:
        if vars(model).get(GENERATE) is generate:
            if before is None:
                delattr(model, GENERATE)
            else:
                setattr(model, GENERATE, before)

    return undo


# ------------------------------------------------------------------------------------------------ processors
#: processor / tokenizer attributes read by dyvte.data.prompts (a processor's own chat template, its image placeholder)
CHAT_TEMPLATE_ATTR, IMAGE_TOKEN_ATTR = "chat_template", "image_token"


def chat_template(processor: Any) -> str | dict | None:
    """The processor's chat template (or its tokenizer's), ``None`` when neither has one."""
    for owner in (processor, getattr(processor, "tokenizer", None)):
        template = getattr(owner, CHAT_TEMPLATE_ATTR, None)
        if template:
            return template
    return None


def image_token(processor: Any) -> str | None:
    """The text placeholder the processor expands into image tokens (``"<image>"`` for LLaVA), if it says."""
    for owner in (processor, getattr(processor, "tokenizer", None)):
        token = getattr(owner, IMAGE_TOKEN_ATTR, None)
        if isinstance(token, str) and token:
            return token
    return None
