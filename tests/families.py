"""The table of model families the tests run on: one entry per family (test-support module, not a test file).

A supported family is its registry entry (``dyvte/engine/registry.py``) plus one :class:`Family` entry in
:data:`TABLE`: how ``tests/tiny_models.py`` builds its tiny model (builder, model class, special tokens, prompt
placeholder), what its processor gives (placeholders per image), and the mechanisms it stands for (tags).
Every test derives its families from here (``tests/engine/test_registry.py`` checks that the table covers exactly
``dyvte.supported_model_types()``):

- the invariants of docs/design.md §5 (never withdrawing is the unmodified model, withdrawal equals the masking
  oracle, the cache changes nothing, a ragged batch equals its rows alone, ``remove()`` restores the model), the
  FLOPs / KV-bytes accounting and the exit-head invariants run on :data:`MODEL_TYPES`, every family;
- feature tests whose subject does not depend on the family run on :func:`representatives`, one family per
  mechanism (:data:`MECHANISMS`);
- tests of one mechanism take :func:`with_tag`, or its :func:`representative`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from . import tiny_models as tiny

#: The mechanisms a feature test must see once each, with what the tag means (a family may carry several tags).
MECHANISMS: dict[str, str] = {
    "plain": "LLaVA-1.5 style: a CLIP tower, a fixed number of placeholders per image, a Llama decoder",
    "mrope": "multimodal rotary positions (3-D position ids; Qwen2-VL style, interleaved in Qwen3-VL / Qwen3.5)",
    "sliding_window": "decoder layers with a sliding attention window next to full ones (Gemma3)",
    "deepstack": "vision features added to the hidden states after the first decoder layers (Qwen3-VL DeepStack)",
    "linear_attention": "recurrent (Gated DeltaNet) decoder layers next to full-attention ones (Qwen3.5)",
    "pixtral_rope": "a Pixtral vision tower: no [CLS], 2-D rotary positions, [IMG_BREAK] rows (Mistral3)",
    "pixel_shuffle": "patches merged by a pixel shuffle before the projector (Idefics3, SmolVLM, InternVL)",
}
#: Other tags: ``anyres`` (LLaVA-NeXT tiling: counts depend on size and aspect), ``moe`` (routed-expert decoder).
OTHER_TAGS = {"anyres", "moe"}

Tokens = tuple[dict[str, str | None], dict[str, str], list[str]]


@dataclass(frozen=True)
class Family:
    """One model family of the tests.

    Attributes:
        model_type: ``config.model_type``, the key of ``dyvte.engine.registry.REGISTRY``.
        model_class: the transformers ``...ForConditionalGeneration`` class name.
        build: ``build(transformers, tokenizer, text_kwargs, image_mean_std) -> (config, processor)``, from
            ``tests/tiny_models.py``.
        tokens: the word-level tokenizer's special tokens: (bos / eos / pad / unk, extra special tokens exposed as
            tokenizer attributes, other added special tokens).
        prompt_image: what a prompt carries once per image (the processor expands it).
        image_tokens: placeholders per image in a single-image row, by image size ``(height, width)``.
        tags: the mechanisms (:data:`MECHANISMS`) and other traits (:data:`OTHER_TAGS`) of the family.
        represents: the mechanism this family stands for in feature tests (:func:`representatives`), if any.
        video: how the tests feed it videos: ``"frames"`` (``dyvte.data.video.FramesVideoProcessor``, through the
            image processor), ``"grid"`` (Qwen's video layout built by ``tests/video_inputs.py``), or ``None``.
        prune_refusal: why ``dyvte.prune`` refuses FasterVLM / random on it (a regex of the error), ``None`` where it
            prunes before the LLM.
        word_level_reload: ``AutoTokenizer`` cannot rebuild the word-level test tokenizer of this ``model_type``
            (transformers forces ``Qwen3_5Tokenizer``, a byte-level BPE without merges, for qwen3_5*):
            ``save_and_reload`` hands the processor the saved tokenizer.json as a ``PreTrainedTokenizerFast``.
    """

    model_type: str
    model_class: str
    build: Callable[..., tuple[Any, Any]]
    tokens: Tokens
    prompt_image: str
    image_tokens: dict[tuple[int, int], int]
    tags: frozenset[str]
    represents: str | None = None
    video: str | None = None
    prune_refusal: str | None = None
    word_level_reload: bool = False

    @property
    def dynamic_resolution(self) -> bool:
        """Its placeholder count per image depends on the image size."""
        return len(set(self.image_tokens.values())) > 1


# ---------------------------------------------------------------------------------------------- shared pieces
_BASIC = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
_QWEN_BASIC = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"}
_GEMMA_BASIC = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
_ROW_COL = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
_IDEFICS_EXTRA = {
    "image_token": "<image>",
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}
LLAVA_TOKENS: Tokens = (_BASIC, {"image_token": "<image>"}, [])
LLAVA_VIDEO_TOKENS: Tokens = (_BASIC, {"image_token": "<image>", "video_token": "<video>"}, [])
QWEN_TOKENS: Tokens = (
    _QWEN_BASIC,
    {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_bos_token": "<|vision_start|>",
        "vision_eos_token": "<|vision_end|>",
    },
    ["<|im_start|>"],
)
GLM_TOKENS: Tokens = (
    {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|pad|>", "unk_token": "<unk>"},
    {"image_token": "<|image|>", "video_token": "<|video|>"},
    ["<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>"],
)
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
GLM_IMAGE = "<|begin_of_image|><|image|><|end_of_image|>"

#: placeholders per image for sizes 32x32 / 48x32 / 32x48 / 48x48 (see the facts in ``tests/tiny_models.py``)
FIXED_16 = {(32, 32): 16, (48, 32): 16, (32, 48): 16, (48, 48): 16}
ANYRES = {(32, 32): 36, (48, 32): 46, (32, 48): 44, (48, 48): 88}
PER_8X8 = {(32, 32): 16, (48, 32): 24, (32, 48): 24, (48, 48): 36}  # one placeholder per 8x8 pixels
TILES = {(32, 32): 16, (48, 32): 48, (32, 48): 48, (48, 48): 80}  # InternVL: 16 per tile, + a thumbnail


def _no_cls(encoder: str) -> str:
    return rf"\({encoder}\) has no \[CLS\] token"


# ------------------------------------------------------------------------------------------------------ table
TABLE: list[Family] = [
    Family(
        "llava",
        "LlavaForConditionalGeneration",
        tiny.build_llava,
        LLAVA_TOKENS,
        "<image>",
        FIXED_16,
        frozenset({"plain"}),
        represents="plain",
    ),
    Family(
        "llava_next",
        "LlavaNextForConditionalGeneration",
        tiny.build_llava_next,
        LLAVA_TOKENS,
        "<image>",
        ANYRES,
        frozenset({"anyres"}),
    ),
    Family(
        "llava_onevision",
        "LlavaOnevisionForConditionalGeneration",
        tiny.build_llava_onevision,
        (_QWEN_BASIC, {"image_token": "<image>", "video_token": "<video>"}, []),
        "<image>",
        ANYRES,
        frozenset({"anyres"}),
        video="frames",
        prune_refusal=_no_cls(r"SiglipVision\w*"),
    ),
    Family(
        "qwen2_vl",
        "Qwen2VLForConditionalGeneration",
        tiny.build_qwen2_vl,
        QWEN_TOKENS,
        QWEN_IMAGE,
        PER_8X8,
        frozenset({"mrope"}),
        represents="mrope",
        video="grid",
        prune_refusal=_no_cls("Qwen2VisionTransformerPretrainedModel"),
    ),
    Family(
        "qwen2_5_vl",
        "Qwen2_5_VLForConditionalGeneration",
        partial(tiny.build_qwen2_vl, v2_5=True),
        QWEN_TOKENS,
        QWEN_IMAGE,
        PER_8X8,
        frozenset({"mrope"}),
        video="grid",
        prune_refusal=_no_cls("Qwen2_5_VisionTransformerPretrainedModel"),
    ),
    Family(
        "internvl",
        "InternVLForConditionalGeneration",
        tiny.build_internvl,
        (
            _QWEN_BASIC,
            {
                "start_image_token": "<img>",
                "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>",
            },
            [],
        ),
        "<IMG_CONTEXT>",
        TILES,
        frozenset({"pixel_shuffle"}),
        prune_refusal="not laid out as patches of views",
    ),
    Family(
        "gemma3",
        "Gemma3ForConditionalGeneration",
        tiny.build_gemma3,
        (
            _GEMMA_BASIC,
            {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
            [],
        ),
        "<start_of_image>",
        FIXED_16,
        frozenset({"sliding_window"}),
        represents="sliding_window",
        prune_refusal=_no_cls("SiglipVisionModel"),
    ),
    Family(
        "idefics3",
        "Idefics3ForConditionalGeneration",
        tiny.build_idefics3,
        (_BASIC, _IDEFICS_EXTRA, _ROW_COL),
        "<image>",
        FIXED_16,
        frozenset({"pixel_shuffle"}),
        represents="pixel_shuffle",
        prune_refusal=_no_cls("Idefics3VisionTransformer"),
    ),
    Family(
        "smolvlm",
        "SmolVLMForConditionalGeneration",
        partial(tiny.build_idefics3, smol=True),
        (_BASIC, {**_IDEFICS_EXTRA, "video_token": "<video>"}, _ROW_COL),
        "<image>",
        FIXED_16,
        frozenset({"pixel_shuffle"}),
        prune_refusal=_no_cls("SmolVLMVisionTransformer"),
    ),
    Family(
        "qwen3_vl",
        "Qwen3VLForConditionalGeneration",
        tiny.build_qwen3_vl,
        QWEN_TOKENS,
        QWEN_IMAGE,
        PER_8X8,
        frozenset({"mrope", "deepstack"}),
        represents="deepstack",
        video="grid",
        prune_refusal=_no_cls("Qwen3VLVisionModel"),
    ),
    Family(
        "qwen3_vl_moe",
        "Qwen3VLMoeForConditionalGeneration",
        partial(tiny.build_qwen3_vl, moe=True),
        QWEN_TOKENS,
        QWEN_IMAGE,
        PER_8X8,
        frozenset({"mrope", "deepstack", "moe"}),
        video="grid",
        prune_refusal=_no_cls("Qwen3VLMoeVisionModel"),
    ),
    Family(
        "mistral3",
        "Mistral3ForConditionalGeneration",
        tiny.build_mistral3,
        (_BASIC, {"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}, []),
        "[IMG]",
        PER_8X8,
        frozenset({"pixtral_rope"}),
        represents="pixtral_rope",
        prune_refusal=_no_cls("PixtralVisionModel"),
    ),
    Family(
        "glm4v",
        "Glm4vForConditionalGeneration",
        tiny.build_glm4v,
        GLM_TOKENS,
        GLM_IMAGE,
        PER_8X8,
        frozenset({"mrope"}),
        video="frames",
        prune_refusal=_no_cls("Glm4vVisionModel"),
    ),
    Family(
        "video_llava",
        "VideoLlavaForConditionalGeneration",
        tiny.build_video_llava,
        LLAVA_VIDEO_TOKENS,
        "<image>",
        FIXED_16,
        frozenset({"plain"}),
        video="frames",
    ),
    Family(
        "llava_next_video",
        "LlavaNextVideoForConditionalGeneration",
        tiny.build_llava_next_video,
        LLAVA_VIDEO_TOKENS,
        "<image>",
        ANYRES,
        frozenset({"anyres"}),
        video="frames",
    ),
    Family(
        "glm4v_moe",
        "Glm4vMoeForConditionalGeneration",
        partial(tiny.build_glm4v, moe=True),
        GLM_TOKENS,
        GLM_IMAGE,
        PER_8X8,
        frozenset({"mrope", "moe"}),
        video="frames",
        prune_refusal=_no_cls("Glm4vMoeVisionModel"),
    ),
    Family(
        "qwen3_5",
        "Qwen3_5ForConditionalGeneration",
        tiny.build_qwen3_5,
        QWEN_TOKENS,
        QWEN_IMAGE,
        PER_8X8,
        frozenset({"mrope", "linear_attention"}),
        represents="linear_attention",
        prune_refusal=_no_cls("Qwen3_5VisionModel"),
        word_level_reload=True,
    ),
    Family(
        "qwen3_5_moe",
        "Qwen3_5MoeForConditionalGeneration",
        partial(tiny.build_qwen3_5, moe=True),
        QWEN_TOKENS,
        QWEN_IMAGE,
        PER_8X8,
        frozenset({"mrope", "linear_attention", "moe"}),
        prune_refusal=_no_cls("Qwen3_5MoeVisionModel"),
        word_level_reload=True,
    ),
]

_BY_TYPE = {entry.model_type: entry for entry in TABLE}
#: Every family of the table, in table order.
MODEL_TYPES: list[str] = [entry.model_type for entry in TABLE]


def family(model_type: str) -> Family:
    """The table entry of ``model_type``."""
    try:
        return _BY_TYPE[model_type]
    except KeyError:
        raise ValueError(f"unknown family {model_type!r}; the table has {MODEL_TYPES}") from None


def with_tag(tag: str) -> list[str]:
    """The families tagged ``tag``, in table order."""
    if tag not in MECHANISMS and tag not in OTHER_TAGS:
        raise ValueError(f"unknown tag {tag!r}; expected one of {sorted(MECHANISMS) + sorted(OTHER_TAGS)}")
    return [entry.model_type for entry in TABLE if tag in entry.tags]


def representative(mechanism: str) -> str:
    """The one family that stands for ``mechanism`` in feature tests."""
    found = [entry.model_type for entry in TABLE if entry.represents == mechanism]
    if mechanism not in MECHANISMS or len(found) != 1:
        raise ValueError(f"no one representative of {mechanism!r}; mechanisms: {sorted(MECHANISMS)}")
    return found[0]


def representatives(*mechanisms: str) -> list[str]:
    """One family per mechanism: of every mechanism of :data:`MECHANISMS` (in table order), or of those named."""
    return [representative(mechanism) for mechanism in mechanisms] if mechanisms else _REPRESENTATIVES


_REPRESENTATIVES = [entry.model_type for entry in TABLE if entry.represents is not None]
assert sorted(entry.represents for entry in TABLE if entry.represents) == sorted(MECHANISMS), "one per mechanism"


def with_video(kind: str) -> list[str]:
    """The families the tests feed videos the ``kind`` way (``"frames"`` or ``"grid"``)."""
    return [entry.model_type for entry in TABLE if entry.video == kind]


def prunable() -> list[str]:
    """The families ``dyvte.prune`` prunes before the LLM (FasterVLM, random)."""
    return [entry.model_type for entry in TABLE if entry.prune_refusal is None]
