"""Wall-clock measurement helpers: random-weight LLaVA-shaped models, prefill / decode timing, KV-cache bytes.

Used by ``benchmarks/prefill.py`` and the comparison report. Nothing here is a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import StoppingCriteria

from dyvte.engine.compat import cache_out, cache_state_tensors, cache_tensors, logits_of

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration

__all__ = [
    "DTYPES",
    "LlavaShape",
    "add_shape_arguments",
    "StepClock",
    "build_random_llava",
    "greedy_steps",
    "kv_cache_bytes",
    "Qwen3_5Shape",
    "build_random_qwen3_5",
    "qwen3_5_prompt",
    "recurrent_state_bytes",
    "llava_prompt",
    "matmul_gflops",
    "median_time",
    "shape_from_args",
    "time_decode",
    "time_prefill",
]

IMAGE_TOKEN_ID = 32000
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
"""Command-line dtype names of the benchmark scripts (never fp16 on CPU)."""


@dataclass(frozen=True)
class LlavaShape:
    """Shape of a random-weight LLaVA-1.5-like model (the decoder is Llama; the vision tower is small).

    Defaults give a ~0.8 B-parameter decoder (24 layers of d = 1536, FFN 4096, 12 heads of 128: MHA as Vicuna).
    ``LlavaShape.llava_7b()`` is LLaVA-1.5-7B's decoder (32 x 4096, FFN 11008).
    """

    hidden_size: int = 1536
    num_layers: int = 24
    intermediate_size: int = 4096
    num_heads: int = 12
    num_kv_heads: int = 12
    vocab_size: int = 32064
    image_size: int = 336
    patch_size: int = 14
    vision_hidden: int = 64

    @classmethod
    def llava_7b(cls, num_layers: int = 32) -> LlavaShape:
        """LLaVA-1.5-7B's decoder shape (optionally with fewer layers)."""
        return cls(hidden_size=4096, num_layers=num_layers, intermediate_size=11008, num_heads=32, num_kv_heads=32)

    @property
    def image_tokens(self) -> int:
        """Visual tokens per image (CLS dropped, as LLaVA's default feature selection)."""
        return (self.image_size // self.patch_size) ** 2


def add_shape_arguments(parser: argparse.ArgumentParser, default: LlavaShape) -> None:
    """``--layers/--hidden/--ffn/--heads`` (MHA decoder) with ``default``'s values, for :func:`shape_from_args`."""
    parser.add_argument("--layers", type=int, default=default.num_layers, help="decoder layers")
    parser.add_argument("--hidden", type=int, default=default.hidden_size, help="decoder width")
    parser.add_argument("--ffn", type=int, default=default.intermediate_size, help="gated-FFN width")
    parser.add_argument("--heads", type=int, default=default.num_heads, help="attention heads (no GQA)")


def shape_from_args(args: argparse.Namespace) -> LlavaShape:
    """The :class:`LlavaShape` named by the arguments :func:`add_shape_arguments` added."""
    return LlavaShape(
        hidden_size=args.hidden,
        num_layers=args.layers,
        intermediate_size=args.ffn,
        num_heads=args.heads,
        num_kv_heads=args.heads,
    )


def build_random_llava(
    shape: LlavaShape, dtype: torch.dtype = torch.bfloat16, device: str = "cpu", attn: str = "sdpa", seed: int = 0
) -> LlavaForConditionalGeneration:
    """A real ``LlavaForConditionalGeneration`` with random weights of the given shape, in eval mode."""
    # lazy: transformers' LLaVA / Llama / CLIP model code takes seconds to import and only this function needs it
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=2 * shape.vision_hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
    )
    text = LlamaConfig(
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        vocab_size=shape.vocab_size,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    model = model.to(dtype).eval()
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model


def llava_prompt(
    shape: LlavaShape,
    text_before: int = 35,
    text_after: int = 40,
    batch: int = 1,
    device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A LLaVA-1.5-like prompt: ``text_before`` text tokens, one image, ``text_after`` text tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = []
    for _ in range(batch):
        before = torch.randint(3, 32000, (text_before,), generator=gen)
        after = torch.randint(3, 32000, (text_after,), generator=gen)
        ids.append(torch.cat([before, torch.full((shape.image_tokens,), IMAGE_TOKEN_ID), after]))
    input_ids = torch.stack(ids).to(device)
    pixels = torch.randn(batch, 3, shape.image_size, shape.image_size, generator=gen).to(device=device, dtype=dtype)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels}


@dataclass(frozen=True)
class Qwen3_5Shape:
    """Shape of a random-weight Qwen3.5 hybrid decoder (docs/design.md, "Withdrawal on linear-attention layers").

    Defaults are Qwen3.5-9B's decoder dims (transformers' ``Qwen3_5TextConfig`` defaults, documented there as
    "Qwen3.5-9B style"): d = 4096, FFN 12288, full attention 16 query / 4 KV heads of 256 with an output gate and
    partial rotary (0.25), Gated DeltaNet 16 key / 32 value heads of 128, conv kernel 4; the real model has 32 layers,
    3 linear : 1 full. Only ``num_layers`` are built (default 4: 3 linear + 1 full), and a 32064-token vocabulary
    (the real one has 248320) keeps the LM head small; the vision tower is tiny and not run (see
    :func:`qwen3_5_prompt`).
    """

    hidden_size: int = 4096
    num_layers: int = 4
    intermediate_size: int = 12288
    num_heads: int = 16
    num_kv_heads: int = 4
    head_dim: int = 256
    linear_key_heads: int = 16
    linear_value_heads: int = 32
    linear_head_dim: int = 128
    conv_kernel: int = 4
    vocab_size: int = 32064
    image_tokens: int = 576


def build_random_qwen3_5(
    shape: Qwen3_5Shape, dtype: torch.dtype = torch.bfloat16, device: str = "cpu", attn: str = "sdpa", seed: int = 0
) -> nn.Module:
    """A real ``Qwen3_5ForConditionalGeneration`` with random weights of the given shape, in eval mode.

    ``layer_types``: every 4th layer is full attention, the others linear attention (the real pattern).
    """
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3_5TextConfig, Qwen3_5VisionConfig

    text = Qwen3_5TextConfig(
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        linear_num_key_heads=shape.linear_key_heads,
        linear_num_value_heads=shape.linear_value_heads,
        linear_key_head_dim=shape.linear_head_dim,
        linear_value_head_dim=shape.linear_head_dim,
        linear_conv_kernel_dim=shape.conv_kernel,
        vocab_size=shape.vocab_size,
        layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(shape.num_layers)],
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10_000_000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [11, 11, 10],
            "mrope_interleaved": True,
        },
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = Qwen3_5VisionConfig(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=shape.hidden_size
    )
    config = Qwen3_5Config(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=IMAGE_TOKEN_ID + 1,
        vision_start_token_id=IMAGE_TOKEN_ID + 2,
        vision_end_token_id=IMAGE_TOKEN_ID + 3,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3_5ForConditionalGeneration(config)
    model = model.to(dtype).eval()
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def qwen3_5_prompt(
    shape: Qwen3_5Shape, text_before: int = 35, text_after: int = 40, device: str = "cpu", seed: int = 0
) -> dict[str, torch.Tensor]:
    """``text_before`` text tokens, a run of ``shape.image_tokens`` image placeholders, ``text_after`` text tokens.

    No pixels: the placeholders enter the decoder as their own embeddings (the decoder's cost is what the prefill
    benchmark times; it does not depend on the embeddings' values) with plain 1-D positions.
    """
    gen = torch.Generator().manual_seed(seed)
    before = torch.randint(3, IMAGE_TOKEN_ID, (text_before,), generator=gen)
    after = torch.randint(3, IMAGE_TOKEN_ID, (text_after,), generator=gen)
    ids = torch.cat([before, torch.full((shape.image_tokens,), IMAGE_TOKEN_ID), after])[None].to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(
    fn: Callable[[], object], runs: int, warmup: int = 1, device: torch.device | None = None
) -> tuple[float, list[float]]:
    """Median wall time of ``fn`` over ``runs`` runs (after ``warmup``), and all the times, in seconds."""
    device = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def matmul_gflops(dtype: torch.dtype, device: torch.device | None = None, size: int = 512, runs: int = 3) -> float:
    """Measured GFLOP/s of a square ``size`` x ``size`` matmul in ``dtype`` (median of ``runs``, one warm-up).

    Why a benchmark picks fp32 on a CPU: one without bf16 matrix units runs bf16 matmuls far slower than fp32.
    """
    device = device or torch.device("cpu")
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    seconds, _ = median_time(lambda: a @ b, runs, 1, device)
    return 2 * size**3 / seconds / 1e9


def time_prefill(
    model: nn.Module, inputs: dict[str, torch.Tensor], runs: int = 3, warmup: int = 1
) -> tuple[float, list[float]]:
    """Median prefill time (``logits_to_keep=1`` with a KV cache, as ``generate`` does)."""

    @torch.inference_mode()
    def run() -> None:
        model(**inputs, logits_to_keep=1, use_cache=True)

    return median_time(run, runs, warmup, model.device)


class StepClock(StoppingCriteria):
    """Records the time after every generation step (the criteria run once per step)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def time_decode(model: nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int = 16) -> tuple[float, int]:
    """Greedy-generate ``new_tokens`` tokens; return the median per-token decode time (s) and the KV-cache bytes."""
    clock = StepClock(model.device)
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            stopping_criteria=[clock],
            return_dict_in_generate=True,
        )
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)]  # step 0 is the prefill
    return statistics.median(steps), kv_cache_bytes(cache_out(out))


def greedy_steps(
    model: nn.Module,
    logits: torch.Tensor,
    cache: object,
    attention_mask: torch.Tensor,
    steps: int,
    suppress: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Greedy-decode ``steps`` tokens from a prefilled ``cache``, one model call per token, timing each call.

    Args:
        model: the top-level model (hooked or not).
        logits: ``(B, V)`` the prefill's last-position logits.
        cache: the prefill's KV cache (extended in place).
        attention_mask: ``(B, P)`` the prefill's 2-D mask.
        steps: tokens to generate.
        suppress: token ids never chosen (e.g. image placeholders, which a decode step must not receive).

    Returns:
        ``(B, steps)`` tokens and each call's wall time in seconds.
    """
    from dyvte.engine.registry import resolve  # lazy: the registry imports transformers' model classes

    name = resolve(model).names.cache
    device = logits.device

    def pick(scores: torch.Tensor) -> torch.Tensor:  # (B, V) -> (B, 1)
        if suppress is not None:
            scores = scores.index_fill(-1, suppress.to(device), float("-inf"))
        return scores.argmax(-1, keepdim=True)

    tokens, times = [], []
    next_ids, mask = pick(logits), attention_mask
    with torch.inference_mode():
        for _ in range(steps):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)  # (B, P + t)
            positions = mask.long().cumsum(-1)[:, -1:] - 1  # (B, 1) as generate computes them
            _sync(device)
            start = time.perf_counter()
            out = model(
                input_ids=next_ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **{name: cache},
            )
            next_ids = pick(logits_of(out)[:, -1])
            _sync(device)
            times.append(time.perf_counter() - start)
            tokens.append(next_ids)
    return torch.cat(tokens, 1), times


def kv_cache_bytes(cache) -> int:
    """Bytes held by the keys and values of every layer of a transformers cache."""
    return sum(t.numel() * t.element_size() for t in cache_tensors(cache))


def recurrent_state_bytes(cache) -> int:
    """Bytes held by the convolution and recurrent states of a cache's linear-attention layers (Qwen3.5's Gated
    DeltaNet); ``0`` for a cache without such layers. Unlike :func:`kv_cache_bytes`, they do not shrink with
    withdrawal (:func:`dyvte.eval.flops.prefill_state_bytes` per row)."""
    return sum(t.numel() * t.element_size() for t in cache_state_tensors(cache))


@contextlib.contextmanager
def threads(num: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count."""
    old = torch.get_num_threads()
    if num:
        torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(old)
