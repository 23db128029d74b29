"""Tiny, randomly initialised vision-language models with real processors, built fully in memory.

Test-support module (not a test file). For each family of the table in ``tests/families.py`` (one entry per family:
its builder below, model class, special tokens, prompt placeholder, placeholder counts and mechanism tags),
:func:`make_tiny` builds a tiny
model (text decoder: hidden 64, ``num_layers`` layers, 4 heads / 2 kv heads where the family allows; vision tower:
hidden 32, 1-2 layers) plus the family's *real* processor class with an in-memory word-level tokenizer built
with the ``tokenizers`` library. :func:`make_batch` produces ragged, left-padded batches whose rows hold
different numbers of images (and, for dynamic-resolution families, images of different sizes). Nothing touches
the network or the hub. Image processors are the ``...ImageProcessorPil`` classes (no torchvision).

Image sizes in ``rows`` are ``(height, width)`` in pixels.

Per-family facts (placeholders per image for sizes (h, w) = 32x32 / 48x32 / 32x48 / 48x48, in a row with one
image; "placeholder" = the token id the model scatters vision features into; see ``Family.image_tokens`` in
``tests/families.py``):

- ``llava``: CLIP 32 px / patch 8, strategy "default" (CLS dropped): 16 / 16 / 16 / 16 (the CLIP processor
  resizes + centre-crops to 32x32).
- ``llava_next``: anyres, pinpoints [[32,32],[32,64],[64,32],[64,64]], CLIP 32 px / patch 8: 36 / 46 / 44 / 88
  (base 16 + unpadded anyres grid + one newline token per grid row): the count depends on size and aspect.
- ``llava_onevision``: SigLIP 32 px / patch 8 + Qwen2, same pinpoints: 36 / 46 / 44 / 88 in single-image rows.
  Quirk: in a row with several images the processor/model use the base features only (no anyres) plus one
  newline: 17 per image, whatever the size (the processor returns ``batch_num_images``).
- ``qwen2_vl`` / ``qwen2_5_vl``: patch 4, merge 2, one placeholder per 8x8 pixels: 16 / 24 / 24 / 36 (16x16 -> 4).
  ``<|vision_start|>``/``<|vision_end|>`` surround the ``<|image_pad|>`` run. mrope (``mrope_section=[2, 3, 3]``,
  head_dim 16): ``position_ids`` are 3-D; in generate they are 4xBxL. Qwen2.5-VL's vision tower uses window
  attention (window 16 px) in layer 0 and full attention in the last layer. The processor also returns
  ``mm_token_type_ids``.
- ``qwen3_vl`` / ``qwen3_vl_moe``: Qwen2-VL's processor setup (patch 4, merge 2: 16 / 24 / 24 / 36), head_dim 16,
  interleaved mrope ``[2, 3, 3]``; a 3-block vision tower whose blocks all feed DeepStack
  (:data:`QWEN3_DEEPSTACK`: additions after decoder layers 0, 1, 2); the MoE decoder routes every layer over 4
  experts of width 32, 2 per token (:data:`QWEN3_MOE`; transformers' default ``grouped_mm`` experts kernel).
- ``internvl``: 32 px tiles, patch 4, pixel-shuffle 0.5 -> 16 ``<IMG_CONTEXT>`` per tile; dynamic tiling as in real
  InternVL (``crop_to_patches=True``, 1-4 tiles + a thumbnail tile when more than one): 16 / 48 / 48 / 80. Each
  image is wrapped in ``<img>``/``</img>``, separate tokens that are *not* placeholders.
- ``gemma3``: SigLIP 32 px / patch 4 pooled to ``mm_tokens_per_image=16``: 16 ``<image_soft_token>`` per image,
  between ``<start_of_image>``/``<end_of_image>`` (the prompt carries ``<start_of_image>``; the ``\n\n`` around
  it vanish in the whitespace tokenizer). 4 text layers with ``layer_types`` = [sliding, sliding, sliding, full]
  (the pattern repeats for other depths) and ``sliding_window=8``, so the window binds on every test sequence.
  The processor returns ``token_type_ids`` (1 on image tokens: bidirectional attention among image tokens).
  Embeddings are tied (as in real Gemma3).
- ``idefics3`` / ``smolvlm``: vision 32 px / patch 4, scale factor 2 -> 16 ``<image>`` per image, no image
  splitting (``do_image_splitting=False``): 16 / 16 / 16 / 16 (images are resized to longest edge 32 and padded;
  ``pixel_attention_mask`` is returned). Each image is ``<fake_token_around_image><global-img>`` + 16 x
  ``<image>`` + ``<fake_token_around_image>``. SmolVLM needs ``num2words``.
- ``mistral3``: Pixtral tower (no [CLS], 2-D rotary), patch 4, spatial merge 2: one ``[IMG]`` per 8x8 pixels,
  16 / 24 / 24 / 36, plus an ``[IMG_BREAK]`` after each row and ``[IMG_END]`` last (text tokens). Mistral decoder.
  ``PixtralProcessor`` is imported through a shim (:func:`_pixtral_processor_class`; it needs torchvision otherwise).
- ``glm4v``: patch 4, merge 2, temporal patch 2: 16 / 24 / 24 / 36 ``<|image|>`` between ``<|begin_of_image|>`` /
  ``<|end_of_image|>``; 3-D rotary (``mrope_section=[1, 1, 2]``), partial rotary 0.5 with GLM's interleaved
  rotation; the processor returns ``mm_token_type_ids``. Video frames are ``<|image|>`` tokens too.
- ``glm4v_moe``: GLM-4V's processor and counts; decoder layer 0 dense, layers 1+ route over 4 experts of width 32, 2
  per token, plus a shared expert (:data:`GLM_MOE`); rotate-half partial rotary.
- ``video_llava``: separate CLIP image and video towers, 32 px / patch 8: 16 ``<image>`` per image ([CLS] dropped),
  17 ``<video>`` per video frame ([CLS] kept). Pixels: ``pixel_values_images``.
- ``llava_next_video``: LLaVA-NeXT's anyres images (36 / 46 / 44 / 88); video frames pooled 2x2: 4 ``<video>`` each.
- Videos (Video-LLaVA, LLaVA-NeXT-Video, LLaVA-OneVision, GLM-4V) go through ``dyvte.data.video.FramesVideoProcessor``
  (``tests/engine/test_video.py``, ``tests/data/test_video.py``).

Quirk common to the video-slot processors (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision, InternVL, SmolVLM): without
torchvision they cannot even be built with ``video_processor=None``, nor saved or reloaded;
:func:`allow_missing_video_processor` (applied by :func:`make_tiny` and :func:`save_and_reload`) patches
``ProcessorMixin.get_attributes`` to fix this. With it, every family round-trips through ``save_pretrained`` /
``AutoModelForImageTextToText`` / ``AutoProcessor`` offline with identical inputs and logits.

Greedy decoding of a random model sits on near-ties and often stops early on eos: compare logits, not tokens.

Rows without images next to rows with images work for every family (images are passed as one list per row).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import BatchFeature, PreTrainedTokenizerFast

#: Text decoder sizes shared by all families.
TEXT_HIDDEN = 64
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_INTERMEDIATE = 128
#: Vision tower sizes shared by all families.
VISION_HIDDEN = 32
VISION_LAYERS = 2
VISION_HEADS = 2
VISION_INTERMEDIATE = 64
#: Pinpoints for the anyres families (LLaVA-NeXT, LLaVA-OneVision).
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]

_SYLLABLES_A = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "vu", "ho", "ze"]
_SYLLABLES_B = ["ran", "mel", "tos", "pik", "dun", "sar", "lev", "bom", "gil", "fet", "nok", "wix"]
#: Plain words of the tiny vocabulary (144 words).
WORDS: list[str] = [a + b for a in _SYLLABLES_A for b in _SYLLABLES_B]


def allow_missing_video_processor() -> None:
    """Let processors with a video slot work with ``video_processor=None`` when torchvision is absent.

    Without torchvision, ``transformers.VideoProcessorMixin`` / ``AutoVideoProcessor`` do not exist, so for
    Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision, InternVL and SmolVLM processors (a) the constructor's class check fails
    on any ``video_processor`` argument, even ``None`` (``AttributeError: type object 'VIDEO_PROCESSOR_MAPPING'
    has no attribute '_extra_content'``), (b) ``save_pretrained`` fails on ``None._auto_class`` and (c)
    ``from_pretrained`` tries to load a video processor. This idempotent patch makes
    ``ProcessorMixin.get_attributes`` leave out video sub-processors when torchvision is not installed, which
    fixes all three, and makes ``ProcessorMixin.__init__`` name positional sub-processors by the full list (Video-LLaVA
    and LLaVA-NeXT-Video pass the video slot before the tokenizer); it changes nothing when torchvision is present.
    """
    from transformers.processing_utils import ProcessorMixin
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return
    original = ProcessorMixin.__dict__["get_attributes"].__func__
    if getattr(original, "_tiny_models_patched", False):
        return

    def get_attributes(cls: type) -> list[str]:
        return [name for name in original(cls) if "video" not in name]

    get_attributes._tiny_models_patched = True  # type: ignore[attr-defined]
    ProcessorMixin.get_attributes = classmethod(get_attributes)  # type: ignore[method-assign,assignment]

    # Processors whose video slot comes before the tokenizer (Video-LLaVA, LLaVA-NeXT-Video) hand their sub-processors
    # to ProcessorMixin.__init__ positionally; with the video slot left out, the positions no longer match the names.
    # Name them by the unpatched attribute list and drop the video ones.
    mixin_init = ProcessorMixin.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        named = dict(zip(original(type(self)), args, strict=False))
        kwargs.update({name: value for name, value in named.items() if "video" not in name})
        kwargs = {name: value for name, value in kwargs.items() if "video" not in name or value is not None}
        mixin_init(self, *args[len(named) :], **kwargs)

    ProcessorMixin.__init__ = __init__  # type: ignore[method-assign]
    from_args = ProcessorMixin.__dict__["from_args_and_dict"].__func__

    def from_args_and_dict(cls: type, args: Any, processor_dict: dict, **kwargs: Any) -> Any:
        # from_pretrained hands the loaded sub-processors to the processor's own __init__ positionally: put them at
        # their positions in its signature, with None in a video slot that comes before them
        named = dict(zip(get_attributes(cls), args, strict=False))
        ordered: list[Any] = []
        for name in list(inspect.signature(cls.__init__).parameters)[1:]:
            if not named:
                break
            ordered.append(named.pop(name) if name in named else None if "video" in name else named)
        if named or any(arg is named for arg in ordered):
            ordered = list(args)  # not the expected layout: leave it as it was
        return from_args(cls, ordered, processor_dict, **kwargs)

    ProcessorMixin.from_args_and_dict = classmethod(from_args_and_dict)  # type: ignore[method-assign,assignment]


def make_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """Build the in-memory word-level tokenizer of ``family`` (special tokens first, then :data:`WORDS`).

    Llama/Gemma-style families prepend the bos token to every sequence; Qwen-style ones have no bos.
    The tokenizer pads on the left.
    """
    basic, extra, others = _table(family).tokens
    specials: list[str] = []
    for tok in [*basic.values(), *extra.values(), *others]:
        if tok is not None and tok not in specials:
            specials.append(tok)
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=basic["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    backend.add_special_tokens(specials)
    bos = basic["bos_token"]
    if bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        padding_side="left",
        extra_special_tokens=dict(extra),
        **{k: v for k, v in basic.items() if v is not None},
    )
    return tokenizer


def _text_kwargs(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """Llama/Qwen2-style text-decoder kwargs shared by most families."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": TEXT_INTERMEDIATE,
        "num_attention_heads": TEXT_HEADS,
        "num_key_value_heads": TEXT_KV_HEADS,
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
    }


def _clip_vision(image_size: int = 32, patch_size: int = 8) -> dict[str, Any]:
    """Tiny CLIP/SigLIP-style vision-tower kwargs."""
    return {
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": VISION_INTERMEDIATE,
        "num_hidden_layers": VISION_LAYERS,
        "num_attention_heads": VISION_HEADS,
        "image_size": image_size,
        "patch_size": patch_size,
    }


def _pixtral_processor_class() -> type:
    """``PixtralProcessor`` without torchvision.

    ``processing_pixtral`` imports one helper, ``get_resize_output_image_size``, from the torchvision image processor
    module, so without torchvision the class is a lazy placeholder and the module fails to import. The PIL image
    processor module defines the same helper: it stands in for that one import (only while the module loads); the
    processor class itself is transformers' own.
    """
    import importlib
    import sys

    from transformers.utils import is_torchvision_available

    name = "transformers.models.pixtral.processing_pixtral"
    torch_module = "transformers.models.pixtral.image_processing_pixtral"
    if name in sys.modules or is_torchvision_available():
        return importlib.import_module(name).PixtralProcessor
    pil = importlib.import_module("transformers.models.pixtral.image_processing_pil_pixtral")
    sys.modules[torch_module] = pil
    try:
        return importlib.import_module(name).PixtralProcessor
    finally:
        del sys.modules[torch_module]


#: the vision tower of every Qwen-style tiny model (Qwen2.5-VL, Qwen3-VL, Qwen3.5, GLM-4V): patch 4, 2x2 merge, 2 frames
QWEN_VISION = {
    "depth": VISION_LAYERS,
    "hidden_size": VISION_HIDDEN,
    "intermediate_size": VISION_INTERMEDIATE,
    "num_heads": VISION_HEADS,
    "out_hidden_size": TEXT_HIDDEN,
    "patch_size": 4,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}


def _qwen_image_processor(img_mean: dict[str, Any]) -> Any:
    """The Qwen image processor of the tiny Qwen families: 16x16 to 64x64 pixels, patch 4, 2x2 merge, 2 frames."""
    import transformers as tf

    return tf.Qwen2VLImageProcessorPil(
        min_pixels=16 * 16, max_pixels=64 * 64, patch_size=4, merge_size=2, temporal_patch_size=2, **img_mean
    )


def _qwen_token_ids(tk: PreTrainedTokenizerFast) -> dict[str, int]:
    """The image / video placeholder and vision start / end token ids of a Qwen-family config."""
    return {
        "image_token_id": tk.image_token_id,
        "video_token_id": tk.video_token_id,
        "vision_start_token_id": tk.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tk.convert_tokens_to_ids("<|vision_end|>"),
    }


def build_mistral3(tf: Any, tk: PreTrainedTokenizerFast, text: dict, img_mean: dict) -> tuple[Any, Any]:
    """Mistral3: Pixtral tower (no [CLS], 2-D rotary), patch 4, spatial merge 2 -> one [IMG] per 8x8 pixels, one
    [IMG_BREAK] after each row of [IMG] and [IMG_END] in place of the last break (text tokens, not placeholders)."""
    PixtralProcessor = _pixtral_processor_class()
    vision = tf.PixtralVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=VISION_INTERMEDIATE,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=VISION_HEADS,
        image_size=64,
        patch_size=4,
        head_dim=VISION_HIDDEN // VISION_HEADS,
    )
    config = tf.Mistral3Config(
        vision_config=vision,
        text_config=tf.MistralConfig(**text, head_dim=TEXT_HIDDEN // TEXT_HEADS, sliding_window=None),
        image_token_index=tk.image_token_id,
        spatial_merge_size=2,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    ip = tf.PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size=8, **img_mean)
    proc = PixtralProcessor(
        image_processor=ip,
        tokenizer=tk,
        patch_size=4,
        spatial_merge_size=2,
        image_token="[IMG]",
        image_break_token="[IMG_BREAK]",
        image_end_token="[IMG_END]",
    )
    return config, proc


#: GLM-4V-MoE's tiny decoder: layer 0 dense, later layers route over 4 experts of width 32, 2 per token, plus one
#: shared expert.
GLM_MOE = {
    "moe_intermediate_size": 32,
    "num_experts_per_tok": 2,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
}


def build_glm4v(tf: Any, tk: PreTrainedTokenizerFast, text: dict, img_mean: dict, moe: bool = False) -> tuple[Any, Any]:
    """GLM-4V: patch 4, merge 2 -> one <|image|> per 8x8 pixels between <|begin_of_image|>/<|end_of_image|>;
    3-D (mrope) positions; partial rotary (half the head dim), interleaved pairs; extra post-norms per layer.
    ``moe``: GLM-4V-MoE (:data:`GLM_MOE`; rotate-half rotary, no post-norms), same processor."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2], "partial_rotary_factor": 0.5}
    text = {k: v for k, v in text.items() if k != "bos_token_id"}
    if moe:
        cfg_cls, text_cfg, vision_cls = tf.Glm4vMoeConfig, tf.Glm4vMoeTextConfig, tf.Glm4vMoeVisionConfig
        text = {**text, **GLM_MOE}
    else:
        cfg_cls, text_cfg, vision_cls = tf.Glm4vConfig, tf.Glm4vTextConfig, tf.Glm4vVisionConfig
    config = cfg_cls(
        text_config=text_cfg(**text, rope_parameters=rope),
        vision_config=vision_cls(**QWEN_VISION, image_size=32),
        image_token_id=tk.image_token_id,
        video_token_id=tk.video_token_id,
        image_start_token_id=tk.convert_tokens_to_ids("<|begin_of_image|>"),
        image_end_token_id=tk.convert_tokens_to_ids("<|end_of_image|>"),
        video_start_token_id=tk.convert_tokens_to_ids("<|begin_of_video|>"),
        video_end_token_id=tk.convert_tokens_to_ids("<|end_of_video|>"),
    )
    ip = tf.Glm4vImageProcessorPil(
        size={"shortest_edge": 16 * 16, "longest_edge": 2 * 64 * 64},  # pixels x 2 frames
        patch_size=4,
        merge_size=2,
        temporal_patch_size=2,
        **img_mean,
    )
    proc = tf.Glm4vProcessor(image_processor=ip, tokenizer=tk, video_processor=None)
    return config, proc


def build_video_llava(tf: Any, tk: PreTrainedTokenizerFast, text: dict, img_mean: dict) -> tuple[Any, Any]:
    """Video-LLaVA: separate CLIP image and video towers (32 px / patch 8, with [CLS]); images drop the [CLS]
    feature (16 <image>), video frames keep it (17 <video> per frame)."""
    config = tf.VideoLlavaConfig(
        vision_config=tf.CLIPVisionConfig(**_clip_vision(32, 8)),
        text_config=tf.LlamaConfig(**text),
        image_token_index=tk.image_token_id,
        video_token_index=tk.video_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=16,
        video_seq_length=17 * 8,
    )
    ip = tf.VideoLlavaImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, **img_mean)
    proc = tf.VideoLlavaProcessor(
        image_processor=ip,
        video_processor=None,
        tokenizer=tk,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return config, proc


def build_llava_next_video(tf: Any, tk: PreTrainedTokenizerFast, text: dict, img_mean: dict) -> tuple[Any, Any]:
    """LLaVA-NeXT-Video: LLaVA-NeXT's anyres images (same counts as ``llava_next``); video frames are pooled 2x2
    (stride 2): 4 <video> per 32 px frame, no newline."""
    config = tf.LlavaNextVideoConfig(
        vision_config=tf.CLIPVisionConfig(**_clip_vision(32, 8)),
        text_config=tf.LlamaConfig(**text),
        image_token_index=tk.image_token_id,
        video_token_index=tk.video_token_id,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        spatial_pool_stride=2,
        image_seq_length=16,
        video_seq_length=4,
    )
    ip = tf.LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS, **img_mean
    )
    proc = tf.LlavaNextVideoProcessor(
        video_processor=None,
        image_processor=ip,
        tokenizer=tk,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return config, proc


def build_llava(tf: Any, tk: PreTrainedTokenizerFast, text: dict, img_mean: dict) -> tuple[Any, Any]:
    """LLaVA-1.5: CLIP 32 px / patch 8, strategy "default" ([CLS] dropped): 16 <image> per image."""
    config = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(**_clip_vision(32, 8)),
        text_config=tf.LlamaConfig(**text),
        image_token_index=tk.image_token_id,
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    ip = tf.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, **img_mean)
    proc = tf.LlavaProcessor(
        image_processor=ip,
        tokenizer=tk,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return config, proc


def build_llava_next(tf: Any, tk: PreTrainedTokenizerFast, text: dict, img_mean: dict) -> tuple[Any, Any]:
    """LLaVA-NeXT: anyres over :data:`PINPOINTS`, CLIP 32 px / patch 8."""
    config = tf.LlavaNextConfig(
        vision_config=tf.CLIPVisionConfig(**_clip_vision(32, 8)),
        text_config=tf.LlamaConfig(**text),
        image_token_index=tk.image_token_id,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=16,
    )
    ip = tf.LlavaNextImageProcessorPil(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_grid_pinpoints=PINPOINTS,
        **img_mean,
    )
    proc = tf.LlavaNextProcessor(
        image_processor=ip,
        tokenizer=tk,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return config, proc


def build_llava_onevision(tf: Any, tk: PreTrainedTokenizerFast, text: dict, img_mean: dict) -> tuple[Any, Any]:
    """LLaVA-OneVision: SigLIP 32 px / patch 8 + Qwen2, anyres over :data:`PINPOINTS`."""
    config = tf.LlavaOnevisionConfig(
        vision_config=tf.SiglipVisionConfig(**_clip_vision(32, 8)),
        text_config=tf.Qwen2Config(**text),
        image_token_index=tk.image_token_id,
        video_token_index=tk.video_token_id,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    ip = tf.LlavaOnevisionImageProcessorPil(
        size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS, **img_mean
    )
    proc = tf.LlavaOnevisionProcessor(
        image_processor=ip,
        tokenizer=tk,
        video_processor=None,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
    )
    return config, proc


def build_qwen2_vl(
    tf: Any, tk: PreTrainedTokenizerFast, text: dict, img_mean: dict, v2_5: bool = False
) -> tuple[Any, Any]:
    """Qwen2-VL (``v2_5``: Qwen2.5-VL, whose vision tower uses window attention): patch 4, merge 2, mrope."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    text = {**text, "rope_parameters": rope}
    if not v2_5:
        vision = tf.Qwen2VLVisionConfig(
            depth=VISION_LAYERS,
            embed_dim=VISION_HIDDEN,
            hidden_size=TEXT_HIDDEN,
            mlp_ratio=2,
            num_heads=VISION_HEADS,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        cfg_cls, text_cls, proc_cls = tf.Qwen2VLConfig, tf.Qwen2VLTextConfig, tf.Qwen2VLProcessor
    else:
        vision = tf.Qwen2_5_VLVisionConfig(**QWEN_VISION, window_size=16, fullatt_block_indexes=[VISION_LAYERS - 1])
        cfg_cls, text_cls, proc_cls = tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLTextConfig, tf.Qwen2_5_VLProcessor
    config = cfg_cls(
        text_config=text_cls(**text),
        vision_config=vision,
        **_qwen_token_ids(tk),
    )
    proc = proc_cls(image_processor=_qwen_image_processor(img_mean), tokenizer=tk, video_processor=None)
    return config, proc


def build_internvl(tf: Any, tk: PreTrainedTokenizerFast, text: dict, img_mean: dict) -> tuple[Any, Any]:
    """InternVL: 32 px tiles, patch 4, pixel shuffle 0.5, dynamic tiling (1-4 tiles + a thumbnail)."""
    config = tf.InternVLConfig(
        vision_config=tf.InternVLVisionConfig(
            hidden_size=VISION_HIDDEN,
            num_hidden_layers=VISION_LAYERS,
            num_attention_heads=VISION_HEADS,
            intermediate_size=VISION_INTERMEDIATE,
            image_size=[32, 32],
            patch_size=[4, 4],
        ),
        text_config=tf.Qwen2Config(**text),
        image_token_id=tk.context_image_token_id,
        image_seq_length=16,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    ip = tf.GotOcr2ImageProcessorPil(
        size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=4, **img_mean
    )
    proc = tf.InternVLProcessor(image_processor=ip, tokenizer=tk, video_processor=None, image_seq_length=16)
    return config, proc


def build_gemma3(tf: Any, tk: PreTrainedTokenizerFast, text: dict, img_mean: dict) -> tuple[Any, Any]:
    """Gemma3: SigLIP pooled to 16 tokens; layer types [sliding x 3, full] repeated, ``sliding_window=8``."""
    pattern = ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]
    layer_types = [pattern[i % len(pattern)] for i in range(text["num_hidden_layers"])]
    gtext = {
        **text,
        "head_dim": TEXT_HIDDEN // TEXT_HEADS,
        "query_pre_attn_scalar": TEXT_HIDDEN // TEXT_HEADS,
        "sliding_window": 8,
        "layer_types": layer_types,
        "tie_word_embeddings": True,
    }
    config = tf.Gemma3Config(
        text_config=tf.Gemma3TextConfig(**gtext),
        vision_config=tf.SiglipVisionConfig(**_clip_vision(32, 4)),
        mm_tokens_per_image=16,
        boi_token_index=tk.boi_token_id,
        eoi_token_index=tk.eoi_token_id,
        image_token_index=tk.image_token_id,
        tie_word_embeddings=True,
    )
    ip = tf.Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, **img_mean)
    proc = tf.Gemma3Processor(image_processor=ip, tokenizer=tk, image_seq_length=16)
    return config, proc


def build_idefics3(
    tf: Any, tk: PreTrainedTokenizerFast, text: dict, img_mean: dict, smol: bool = False
) -> tuple[Any, Any]:
    """Idefics3 (``smol``: SmolVLM): vision 32 px / patch 4, pixel shuffle (scale factor 2), no image splitting."""
    if not smol:
        cfg_cls, vis_cls, ip_cls = tf.Idefics3Config, tf.Idefics3VisionConfig, tf.Idefics3ImageProcessorPil
    else:
        cfg_cls, vis_cls, ip_cls = tf.SmolVLMConfig, tf.SmolVLMVisionConfig, tf.SmolVLMImageProcessorPil
    config = cfg_cls(
        vision_config=vis_cls(**_clip_vision(32, 4)),
        text_config=tf.LlamaConfig(**text),
        image_token_id=tk.image_token_id,
        scale_factor=2,
        pad_token_id=tk.pad_token_id,
    )
    ip = ip_cls(do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32}, **img_mean)
    if not smol:
        proc = tf.Idefics3Processor(image_processor=ip, tokenizer=tk, image_seq_len=16)
    else:
        proc = tf.SmolVLMProcessor(image_processor=ip, tokenizer=tk, video_processor=None, image_seq_len=16)
    return config, proc


def _build(family: str, tokenizer: PreTrainedTokenizerFast, num_layers: int) -> tuple[Any, Any]:
    """``(config, processor)`` of ``family`` (tokenizer already built), from the builder its table entry names."""
    import transformers as tf

    text = {**_text_kwargs(tokenizer), "num_hidden_layers": num_layers}
    img_mean = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    config, proc = _table(family).build(tf, tokenizer, text, img_mean)
    if "video_processor" in inspect.signature(type(proc).__init__).parameters:
        # Keep the attribute (left unset by the patched ``get_attributes``); it is saved as ``null`` and handed
        # back as ``video_processor=None`` by ``from_pretrained`` (SmolVLM's ``__init__`` requires the argument).
        proc.video_processor = None
    return config, proc


def _table(family: str) -> Any:
    """The entry of ``family`` in the table of ``tests/families.py`` (imported on first use: the table names the
    builders of this module)."""
    from .families import family as entry

    return entry(family)


#: Qwen3-VL's tiny vision tower: 3 blocks, each feeding one DeepStack level, so the 3 injections after decoder
#: layers 0, 1, 2 cover every exit layer K = 0..3 of the 4-layer decoder.
QWEN3_DEEPSTACK = [0, 1, 2]
#: Qwen3-VL-MoE's tiny routed FFN: 4 experts of width 32, 2 per token, every layer sparse.
QWEN3_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1}


def build_qwen3_vl(
    tf: Any, tk: PreTrainedTokenizerFast, text: dict[str, Any], img_mean: dict[str, Any], moe: bool = False
) -> tuple[Any, Any]:
    """``(config, processor)`` of a tiny Qwen3-VL (dense) or (``moe``) Qwen3-VL-MoE with DeepStack and interleaved
    mrope."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    text = {**text, "head_dim": TEXT_HIDDEN // TEXT_HEADS, "rope_parameters": rope}
    vision_kwargs = {
        **QWEN_VISION,
        "depth": len(QWEN3_DEEPSTACK),
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": QWEN3_DEEPSTACK,
    }
    if not moe:
        cfg_cls, text_cfg, vision = tf.Qwen3VLConfig, tf.Qwen3VLTextConfig(**text), tf.Qwen3VLVisionConfig
    else:
        cfg_cls, vision = tf.Qwen3VLMoeConfig, tf.Qwen3VLMoeVisionConfig
        text_cfg = tf.Qwen3VLMoeTextConfig(**text, **QWEN3_MOE)
    config = cfg_cls(
        text_config=text_cfg,
        vision_config=vision(**vision_kwargs),
        **_qwen_token_ids(tk),
        tie_word_embeddings=False,
    )
    return config, tf.Qwen3VLProcessor(
        image_processor=_qwen_image_processor(img_mean), tokenizer=tk, video_processor=None
    )


def build_qwen3_5(
    tf: Any, tk: PreTrainedTokenizerFast, text: dict[str, Any], img_mean: dict, moe: bool = False
) -> tuple[Any, Any]:
    """Qwen3.5 (dense or, ``moe``, MoE): hybrid decoder, ``layer_types`` 3 Gated DeltaNet (linear attention) : 1 full
    attention.

    Full-attention layers: gated q (``q_proj`` outputs query and gate), q/k norms, partial interleaved M-RoPE
    (head_dim 16, ``partial_rotary_factor`` 0.5 -> 8 rotary dims, ``mrope_section`` [2, 1, 1]). Linear layers: 2 key
    heads / 4 value heads of 16, conv kernel 4. MoE: 4 experts, top-2, expert FFN 32, shared expert 32.
    """
    num_layers = text["num_hidden_layers"]
    rope = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "mrope_section": [2, 1, 1],
        "mrope_interleaved": True,
    }
    qtext = {
        **text,
        "head_dim": TEXT_HIDDEN // TEXT_HEADS,
        "rope_parameters": rope,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "layer_types": ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(num_layers)],
    }
    vision = {**QWEN_VISION, "num_position_embeddings": 64}
    if not moe:
        cfg_cls, text_cfg = tf.Qwen3_5Config, tf.Qwen3_5TextConfig(**qtext)
        vision_cfg = tf.Qwen3_5VisionConfig(**vision)
    else:
        routed = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
        qtext = {**qtext, **routed, "shared_expert_intermediate_size": 32}
        qtext.pop("intermediate_size")
        cfg_cls, text_cfg = tf.Qwen3_5MoeConfig, tf.Qwen3_5MoeTextConfig(**qtext)
        vision_cfg = tf.Qwen3_5MoeVisionConfig(**vision)
    config = cfg_cls(
        text_config=text_cfg,
        vision_config=vision_cfg,
        **_qwen_token_ids(tk),
    )
    return config, tf.Qwen3VLProcessor(
        image_processor=_qwen_image_processor(img_mean), tokenizer=tk, video_processor=None
    )


def make_tiny(
    family: str,
    attn: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    num_layers: int = 4,
    seed: int = 0,
) -> tuple[Any, Any]:
    """Build a tiny random model of ``family`` and its real processor.

    Args:
        family: a ``model_type`` of the table in ``tests/families.py``.
        attn: attention implementation ("sdpa" or "eager"), applied to the whole model (text decoder included).
        dtype: parameter dtype.
        num_layers: number of text-decoder layers.
        seed: seed for the random initialisation (same seed -> same weights).

    Returns:
        ``(model, processor)``; the model is in eval mode with a greedy-ready ``generation_config``.
    """
    import transformers as tf

    entry = _table(family)  # a ValueError naming the table's families if there is none
    allow_missing_video_processor()
    tokenizer = make_tokenizer(family)
    config, processor = _build(family, tokenizer, num_layers)
    torch.manual_seed(seed)
    model_cls = getattr(tf, entry.model_class)
    model = model_cls._from_config(config, attn_implementation=attn, dtype=dtype)
    model.eval()
    gc = model.generation_config
    gc.pad_token_id = tokenizer.pad_token_id
    gc.eos_token_id = tokenizer.eos_token_id
    gc.bos_token_id = tokenizer.bos_token_id
    gc.do_sample = False
    return model, processor


def make_image(height: int, width: int, rng: np.random.Generator) -> Image.Image:
    """A random RGB PIL image of the given size."""
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _row_rng(seed: int, row_id: int) -> np.random.Generator:
    """Per-row generator, so that a row's content depends only on ``(seed, row_id)``."""
    return np.random.default_rng([seed, row_id])


def make_prompt(family: str, row: Sequence[tuple[int, int]], row_id: int = 0, seed: int = 0) -> str:
    """Prompt of random words (``2 + 3 * row_id + {0,1,2}`` of them) after one image placeholder per image."""
    rng = _row_rng(seed, row_id)
    n_words = 2 + 3 * row_id + int(rng.integers(0, 3))
    words = " ".join(WORDS[int(j)] for j in rng.integers(0, len(WORDS), size=n_words))
    placeholders = " ".join(_table(family).prompt_image for _ in row)
    return f"{placeholders} {words}" if placeholders else words


def make_row_images(row: Sequence[tuple[int, int]], row_id: int = 0, seed: int = 0) -> list[Image.Image]:
    """The random images of one row (sizes ``(height, width)``)."""
    rng = _row_rng(seed + 7919, row_id)
    return [make_image(h, w, rng) for (h, w) in row]


def make_batch(
    processor: Any,
    family: str,
    rows: Sequence[Sequence[tuple[int, int]]],
    seed: int = 0,
    row_ids: Sequence[int] | None = None,
) -> BatchFeature:
    """Left-padded batch of torch tensors, one row per entry of ``rows``.

    Args:
        processor: the processor returned by :func:`make_tiny` for ``family``.
        family: a ``model_type`` of the table in ``tests/families.py``.
        rows: per row, the list of image sizes ``(height, width)``; ``[]`` is a text-only row. E.g.
            ``[[(32, 32)], [(48, 32), (32, 32)], []]``. Rows get prompts of different lengths.
        seed: seed for the random words and pixels.
        row_ids: index used to generate each row's content (default ``range(len(rows))``). A row's words and
            pixels depend only on ``(seed, row_id)``, so ``make_batch(p, f, [rows[i]], seed, row_ids=[i])`` is
            row ``i`` of ``make_batch(p, f, rows, seed)`` alone (without padding).
    """
    ids = list(range(len(rows))) if row_ids is None else list(row_ids)
    images = [make_row_images(row, i, seed) for row, i in zip(rows, ids, strict=True)]
    text = [make_prompt(family, row, i, seed) for row, i in zip(rows, ids, strict=True)]
    kwargs: dict[str, Any] = {"text": text, "padding": True, "return_tensors": "pt"}
    if any(images):
        kwargs["images"] = images
    processor.tokenizer.padding_side = "left"
    return processor(**kwargs)


def image_token_id(model: Any) -> int:
    """The placeholder token id the model scatters vision features into."""
    cfg = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(cfg, name, None)
        if value is not None:
            return int(value)
    raise AttributeError("config has no image token id")


def save_and_reload(model: Any, processor: Any, tmp_path: str | os.PathLike) -> tuple[Any, Any]:
    """Save ``model`` and ``processor`` with ``save_pretrained`` and load them back offline.

    Loads with ``AutoModelForImageTextToText.from_pretrained`` / ``AutoProcessor.from_pretrained`` under
    ``HF_HUB_OFFLINE=1``; keeps the model's dtype and attention implementation. Returns ``(model, processor)``.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    allow_missing_video_processor()
    path = Path(tmp_path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        attn = model.config.text_config._attn_implementation
        reloaded = AutoModelForImageTextToText.from_pretrained(path, dtype=model.dtype, attn_implementation=attn)
        kwargs = {}
        if _table(model.config.model_type).word_level_reload:  # see Family.word_level_reload
            kwargs["tokenizer"] = PreTrainedTokenizerFast.from_pretrained(path)
        try:
            reloaded_proc = AutoProcessor.from_pretrained(path, **kwargs)
        except ImportError:  # PixtralProcessor: exported only with torchvision (see _pixtral_processor_class)
            reloaded_proc = type(processor).from_pretrained(path)
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    reloaded.eval()
    return reloaded, reloaded_proc


def random_heads(model: Any, seed: int = 0, head_size: int | None = 4, std: float = 0.5) -> Any:
    """Exit heads for ``model`` with every parameter drawn from N(0, std) (seeded after the heads are built), in
    eval mode. Narrow by default: random heads of the default width 128 all fire at the same layer."""
    from dyvte import ExitHeads

    heads = ExitHeads.for_model(model, head_size=head_size)
    torch.manual_seed(seed)
    for param in heads.parameters():
        torch.nn.init.normal_(param, std=std)
    return heads.eval()


def sharpened_heads(model: Any, seed: int = 3, visual_inputs: bool = False) -> Any:
    """Randomly initialised exit heads (seeded before they are built) whose output layers are scaled by 30 with bias
    -1, so that the rows of a batch disagree about when to leave; eval mode (``visual_inputs``: heads that also read
    the visual tokens' pooled states)."""
    import dataclasses

    from dyvte import ExitHeads

    torch.manual_seed(seed)
    config = dataclasses.replace(ExitHeads.for_model(model).config, visual_inputs=visual_inputs)
    heads = ExitHeads(config).eval()
    with torch.no_grad():
        for head in heads.heads:
            head[3].weight.mul_(30.0)
            head[3].bias.fill_(-1.0)
    return heads


def constant_heads(model: Any, fire_at: int | None) -> Any:
    """Exit heads for ``model`` whose head ``fire_at`` always fires and the others never (``None``: none fires); eval
    mode."""
    from dyvte import ExitHeads

    heads = ExitHeads.for_model(model)
    with torch.no_grad():
        for j, head in enumerate(heads.heads):
            head[3].weight.zero_()
            head[3].bias.fill_(10.0 if j == fire_at else -10.0)
    return heads.eval()


def greedy(model: Any, inputs: dict, new_tokens: int = 4, **kwargs: Any) -> torch.Tensor:
    """``(B, new_tokens)`` the greedy continuation of ``inputs`` with the visual placeholder tokens suppressed (a tiny
    random model would otherwise emit them); ``kwargs`` go to ``generate`` (``use_cache``, ``min_new_tokens``...)."""
    from dyvte.engine.registry import resolve

    ids = resolve(model).visual_ids.tolist()
    out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, suppress_tokens=ids, **kwargs)
    return out[:, -new_tokens:]


# ------------------------------------------------------------------------------------ records for the launchers
#: A chat template for the tiny models' processors (they ship none): image placeholder, then the question.
TEMPLATE = (
    "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} {{ '" + WORDS[0] + "' }}"
    "{% endif %}"
)


def records(n: int, seed: int = 0) -> list[dict]:
    """``n`` random (image, question, answer, qtype) records of the tiny vocabulary: 32x32 images, 2-4 word
    questions, one-word answers, question types "a" and "b" alternating."""
    rng = np.random.default_rng(seed)
    return [
        {
            "image": make_image(32, 32, rng),
            "question": " ".join(WORDS[int(j)] for j in rng.integers(1, len(WORDS), size=2 + i % 3)),
            "answer": WORDS[int(rng.integers(1, len(WORDS)))],
            "qtype": "ab"[i % 2],
        }
        for i in range(n)
    ]
