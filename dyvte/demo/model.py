"""The demo MLLM: a small LLaVA-1.5-architecture model, its word-level tokenizer and its processor.

Built from transformers' own classes (``LlavaForConditionalGeneration`` with a CLIP vision tower and a Llama decoder;
``LlavaProcessor`` with ``CLIPImageProcessorPil``) so that it loads through ``AutoProcessor`` /
``AutoModelForImageTextToText.from_pretrained`` exactly like LLaVA-1.5. Also holds the helpers that the rest of
dyvte uses to feed it: prompts through the chat template, left-padded generation batches, answer extraction.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dyvte.demo.data import SceneConfig, vocabulary_words

logger = logging.getLogger(__name__)

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
USER, ASSISTANT = "USER:", "ASSISTANT:"
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> "
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}{{ eos_token }} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
"""LLaVA-1.5-style template: ``<s>USER: <image> {question} ASSISTANT:`` (+ `` {answer}</s>`` for an answer turn)."""


@dataclass
class DemoModelConfig:
    """Size of the demo MLLM.

    Attributes:
        vision_hidden: CLIP tower width.
        vision_layers: CLIP tower depth (LLaVA reads layer -2, so the last layer only serves the [CLS] path).
        vision_heads: CLIP attention heads.
        vision_ffn: CLIP MLP width.
        patch_size: ViT patch side in pixels.
        text_hidden: Llama width.
        text_layers: Llama decoder layers.
        text_heads: Llama attention heads (no GQA).
        text_ffn: Llama gated-FFN width.
        max_positions: Llama ``max_position_embeddings``.
    """

    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_ffn: int = 512
    patch_size: int = 8
    text_hidden: int = 128
    text_layers: int = 8
    text_heads: int = 4
    text_ffn: int = 384
    max_positions: int = 128


def build_tokenizer(scene: SceneConfig | None = None):
    """A word-level fast tokenizer over the dataset's closed vocabulary.

    Returns:
        ``PreTrainedTokenizerFast`` with ``<pad>``/``<s>``/``</s>``/``<unk>``, an ``<image>`` special token (exposed
        as ``tokenizer.image_token``) and left padding saved in its config.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [PAD, BOS, EOS, UNK, IMAGE, USER, ASSISTANT] + vocabulary_words(scene or SceneConfig())
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
        model_max_length=256,
    )


def build_processor(scene: SceneConfig | None = None, cfg: DemoModelConfig | None = None):
    """The ``LlavaProcessor`` (CLIP PIL image processor sized to the scene + word-level tokenizer + chat template)."""
    from transformers import LlavaProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    scene, cfg = scene or SceneConfig(), cfg or DemoModelConfig()
    h, w = scene.image_px
    image_processor = CLIPImageProcessorPil(
        size={"height": h, "width": w},
        crop_size={"height": h, "width": w},
        do_center_crop=False,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(scene),
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLIP [CLS] token, dropped again by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def build_model(processor, scene: SceneConfig | None = None, cfg: DemoModelConfig | None = None):
    """A randomly initialised ``LlavaForConditionalGeneration`` matching ``processor``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    scene, cfg = scene or SceneConfig(), cfg or DemoModelConfig()
    tok = processor.tokenizer
    h, w = scene.image_px
    if h != w:
        raise ValueError("the CLIP tower needs square images")
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_ffn,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=h,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_ffn,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids(IMAGE),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=num_image_tokens(processor),
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    model = LlavaForConditionalGeneration(config)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    gen.max_new_tokens, gen.do_sample = 12, False
    return model


def num_image_tokens(processor) -> int:
    """Placeholder tokens one scene image expands to (patches + [CLS] − dropped [CLS])."""
    size = processor.image_processor.size
    n = (size["height"] // processor.patch_size) * (size["width"] // processor.patch_size)
    n += processor.num_additional_image_tokens
    return n - 1 if processor.vision_feature_select_strategy == "default" else n


# --------------------------------------------------------------------------------------------------- loading


#: environment variable naming the folder that holds the demo assets (a clone's ``checkpoints/``)
CHECKPOINTS_ENV = "DYVTE_CHECKPOINTS"


def demo_checkpoint_dir(name: str = "demo-mllm") -> Path:
    """Where the demo asset ``name`` (``demo-mllm``, ``demo-exit-heads``, ``demo-data``, ...) lives.

    The demo assets ship with the repository's ``checkpoints/`` folder, not with the wheel. They are looked up, in
    order: in ``$DYVTE_CHECKPOINTS``; in the source checkout this package was imported from (an editable install or
    a clone on ``sys.path``, recognised by its ``pyproject.toml`` beside ``checkpoints/``); in ``./checkpoints``.
    A non-editable install run outside a clone sets ``DYVTE_CHECKPOINTS=<clone>/checkpoints``.
    """
    env = os.environ.get(CHECKPOINTS_ENV)
    if env:
        return Path(env).expanduser().resolve() / name
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "checkpoints").is_dir():
        return checkout / "checkpoints" / name
    return Path.cwd() / "checkpoints" / name


def _require(path: Path) -> Path:
    if not path.is_dir() or not any(path.iterdir()):
        raise FileNotFoundError(
            f"{path} is missing: the demo assets ship with the repository's checkpoints/ folder (set "
            f"{CHECKPOINTS_ENV}=<clone>/checkpoints outside a clone), or build the model with "
            "`python train/pretrain_demo.py` (about 45 min on CPU)"
        )
    return path


def load_demo_processor(path: str | os.PathLike | None = None):
    """The demo ``LlavaProcessor``, offline, from ``checkpoints/demo-mllm`` (or ``path``)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(_require(Path(path) if path else demo_checkpoint_dir()))


def load_demo_model(dtype: torch.dtype = torch.float32, path: str | os.PathLike | None = None):
    """The trained demo ``LlavaForConditionalGeneration``, offline, in eval mode.

    Args:
        dtype: Parameter dtype (``torch.float32`` or ``torch.bfloat16``; never float16 on CPU).
        path: Checkpoint directory; default ``checkpoints/demo-mllm``.
    """
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        _require(Path(path) if path else demo_checkpoint_dir()), dtype=dtype
    )
    return model.eval()


def load_demo_dataset(split: str | None = None, path: str | os.PathLike | None = None):
    """The stored "digit scenes" dataset (``checkpoints/demo-data``).

    Args:
        split: ``train`` / ``validation`` / ``test``; ``None`` returns the ``DatasetDict``.
        path: Directory written by ``save_to_disk``; default ``checkpoints/demo-data``.
    """
    import datasets

    ds = datasets.load_from_disk(str(_require(Path(path) if path else demo_checkpoint_dir("demo-data"))))
    return ds if split is None else ds[split]


# ------------------------------------------------------------------------------------------------ prompting


def format_prompts(processor, questions: Sequence[str]) -> list[str]:
    """Chat-template prompts ``<s>USER: <image> {question} ASSISTANT:`` (one image placeholder, not yet expanded)."""
    conversations = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in questions]
    return processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)


def blank_like(image: Image.Image) -> Image.Image:
    """An all-black image of the same size and mode (the "no visual information" baseline input)."""
    return Image.new(image.mode, image.size)


def prepare_generation_inputs(processor, records: Sequence[dict] | dict, blank_images: bool = False):
    """Processor inputs for ``model.generate`` from dataset records.

    Args:
        processor: The demo processor (left padding).
        records: A list of records or a column-wise batch (``ds[i:j]``) with ``image`` and ``question``.
        blank_images: Replace every image by a black one (text-only baseline).

    Returns:
        ``BatchFeature`` with ``input_ids`` / ``attention_mask`` ``(B, T)`` left-padded and ``pixel_values``
        ``(B, 3, H, W)``.
    """
    if isinstance(records, dict):
        images, questions = list(records["image"]), list(records["question"])
    else:
        images, questions = [r["image"] for r in records], [r["question"] for r in records]
    if blank_images:
        images = [blank_like(im) for im in images]
    return processor(images=images, text=format_prompts(processor, questions), padding=True, return_tensors="pt")


def extract_answer(text: str) -> str:
    """The short answer in generated text: what follows the last ``ASSISTANT:``, up to ``</s>``, stripped."""
    text = text.rsplit(ASSISTANT, 1)[-1]
    text = text.split(EOS, 1)[0]
    return " ".join(text.replace(PAD, " ").split())


@torch.no_grad()
def generate_answers(
    model, processor, records: Sequence[dict] | dict, max_new_tokens: int = 4, blank_images: bool = False
) -> list[str]:
    """Greedy short answers for a batch of records (left-padded batch generation)."""
    inputs = prepare_generation_inputs(processor, records, blank_images=blank_images)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)  # (B, T + new)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [extract_answer(t) for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def scene_pixel_values(images: np.ndarray) -> torch.Tensor:
    """Fast path equal to the processor's image preprocessing for scene-sized grayscale images.

    Args:
        images: ``(B, H, W)`` uint8.

    Returns:
        ``(B, 3, H, W)`` float32, rescaled to 0..1 and normalized with mean = std = 0.5.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)  # (B, H, W)
    x = (x - IMAGE_MEAN[0]) / IMAGE_STD[0]
    return x[:, None].expand(-1, 3, -1, -1).contiguous()  # (B, 3, H, W)
