"""Prefill benchmark: full model vs visual-token withdrawal at several K, against the FLOPs ideal.

Builds a random-weight Llama-shaped decoder (~0.8 B parameters by default) inside a real
``LlavaForConditionalGeneration`` and a LLaVA-1.5-like prompt (35 text + 576 visual + 40 text tokens), then prints,
per dtype and K: median prefill time (``logits_to_keep=1``, KV cache on, as ``generate`` does), measured speedup,
FLOPs-ideal speedup (``dyvte.prefill_flops``, detailed convention, decoder + LM head), their ratio, the median
per-token decode time over 16 generated tokens, and the KV-cache bytes after them.

    python benchmarks/prefill.py                      # bf16 and fp32, K in 0 4 8 12 16 20 24 of 24, 3 runs
    python benchmarks/prefill.py --dtypes bf16 --runs 5 --layers 24 --hidden 1536
"""

from __future__ import annotations

import argparse
import logging
import platform

import torch

import dyvte
from dyvte.benchmark import (
    DTYPES,
    IMAGE_TOKEN_ID,
    LlavaShape,
    add_shape_arguments,
    build_random_llava,
    llava_prompt,
    shape_from_args,
    threads,
    time_decode,
    time_prefill,
)

logger = logging.getLogger("prefill")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--ks", nargs="+", type=int, default=None, help="exit layers (default: every L/6)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per point (median reported)")
    add_shape_arguments(parser, LlavaShape())
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    shape = shape_from_args(args)
    ks = args.ks or sorted({round(i * args.layers / 6) for i in range(7)})
    rows = []
    with threads(args.threads):
        for name in args.dtypes:
            dtype = DTYPES[name]
            model = build_random_llava(shape, dtype=dtype, device=args.device)
            decoder_params = sum(p.numel() for p in model.model.language_model.parameters())
            inputs = llava_prompt(shape, device=args.device, dtype=dtype)
            num_tokens = inputs["input_ids"].shape[1]
            logger.info(
                "%s: decoder %.2f B params, %d tokens (%d visual), device %s, %d threads",
                name,
                decoder_params / 1e9,
                num_tokens,
                shape.image_tokens,
                args.device,
                torch.get_num_threads(),
            )
            full_time, _ = time_prefill(model, inputs, runs=args.runs)
            # the fastest a withdrawal at K = 0 can be: the unhooked model on a prompt of the kept (text) tokens only
            text_ids = inputs["input_ids"][inputs["input_ids"] != IMAGE_TOKEN_ID][None]
            text_time, _ = time_prefill(model, {"input_ids": text_ids}, runs=args.runs)
            full_decode, full_kv = time_decode(model, inputs, args.new_tokens)
            for k in ks:
                with dyvte.withdraw(model, layer=k):
                    t, times = time_prefill(model, inputs, runs=args.runs)
                    decode, kv = time_decode(model, inputs, args.new_tokens)
                ideal = 1 / dyvte.prefill_flops(model.config, num_tokens, shape.image_tokens, k).ratio
                measured = full_time / t
                rows.append(
                    (
                        text_time,
                        name,
                        k,
                        full_time,
                        t,
                        max(times) - min(times),
                        measured,
                        ideal,
                        measured / ideal,
                        full_decode,
                        decode,
                        full_kv,
                        kv,
                    )
                )
                logger.info("  K=%d done: %.3fs vs %.3fs", k, t, full_time)
            del model

    print(
        f"\nPrefill benchmark on {platform.processor() or platform.machine()} ({args.device}), "
        f"{args.runs} runs (median; spread = max-min of the withdrawn runs), decoder L={shape.num_layers} "
        f"d={shape.hidden_size}, prompt 35 text + {shape.image_tokens} visual + 40 text tokens\n"
    )
    print(
        "| dtype | K | prefill full (s) | prefill withdrawn (s) | spread (s) | speedup | FLOPs-ideal | "
        "measured/ideal | decode full (ms/tok) | decode withdrawn (ms/tok) | KV full (MB) | KV withdrawn (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for text_t, name, k, full_t, t, spread, sp, ideal, ratio, dec_f, dec_w, kv_f, kv_w in rows:
        if k == ks[0]:  # reference row: the unhooked model on the text tokens alone (no image, 75 tokens)
            print(
                f"| {name} | text-only prompt | {full_t:.3f} | {text_t:.3f} | - | {full_t / text_t:.2f}x | - | - |||||"
            )
        print(
            f"| {name} | {k} | {full_t:.3f} | {t:.3f} | {spread:.3f} | {sp:.2f}x | {ideal:.2f}x | {ratio:.2f} | "
            f"{dec_f * 1e3:.1f} | {dec_w * 1e3:.1f} | {kv_f / 2**20:.1f} | {kv_w / 2**20:.1f} |"
        )


if __name__ == "__main__":
    main()
