"""Prefill benchmark: full model vs visual-token withdrawal at several K, against the FLOPs ideal.

Builds a random-weight Llama-shaped decoder (~0.8 B parameters by default) inside a real
``LlavaForConditionalGeneration`` and a LLaVA-1.5-like prompt (35 text + 576 visual + 40 text tokens), then prints,
per dtype and K: median prefill time (``logits_to_keep=1``, KV cache on, as ``generate`` does), measured speedup,
FLOPs-ideal speedup (``dyvte.prefill_flops``, detailed convention, decoder + LM head), their ratio, the median
per-token decode time over 16 generated tokens, and the KV-cache bytes after them.

    python benchmarks/prefill.py                      # bf16 and fp32, K in 0 4 8 12 16 20 24 of 24, 3 runs
    python benchmarks/prefill.py --dtypes bf16 --runs 5 --layers 24 --hidden 1536

``--family qwen3_5`` times a Qwen3.5-shaped hybrid decoder instead (:class:`dyvte.eval.benchmark.Qwen3_5Shape`: the 9B
dims, 4 layers = 3 Gated DeltaNet + 1 full attention, 35 text + 576 visual + 40 text tokens): prefill with and
without withdrawal at every K, the FLOPs ideal, how much of it the wall clock delivers when most layers are linear,
and the cache: KV bytes of the full-attention layers (which shrink) next to the linear layers' state (which does not).

    python benchmarks/prefill.py --family qwen3_5 --dtypes bf16 --runs 3
"""

from __future__ import annotations

import argparse
import logging
import platform

import torch

import dyvte
from dyvte.engine.compat import cache_out
from dyvte.eval.benchmark import (
    DTYPES,
    IMAGE_TOKEN_ID,
    LlavaShape,
    Qwen3_5Shape,
    add_shape_arguments,
    build_random_llava,
    build_random_qwen3_5,
    kv_cache_bytes,
    llava_prompt,
    qwen3_5_prompt,
    recurrent_state_bytes,
    shape_from_args,
    threads,
    time_decode,
    time_prefill,
)
from dyvte.eval.flops import layer_flops

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
    parser.add_argument("--family", default="llava", choices=["llava", "qwen3_5"], help="decoder shape to time")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.family == "qwen3_5":
        with threads(args.threads):
            shape = Qwen3_5Shape()
            print(hybrid_table(shape, hybrid_rows(shape, args.dtypes, args.runs, args.device)))
        return

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


def hybrid_rows(shape: Qwen3_5Shape, dtypes: list[str], runs: int, device: str = "cpu") -> list[dict]:
    """Per dtype and exit layer K (``0 .. L``): median prefill times, FLOPs ideal and the cache after the prefill."""
    rows = []
    for name in dtypes:
        model = build_random_qwen3_5(shape, dtype=DTYPES[name], device=device)
        inputs = qwen3_5_prompt(shape, device=device)
        tokens, visual = inputs["input_ids"].shape[1], shape.image_tokens
        cfg = model.config
        per_layer = [float(layer_flops(cfg, tokens, index=i)) for i in range(shape.num_layers)]
        linear = sum(
            f for f, kind in zip(per_layer, cfg.text_config.layer_types, strict=True) if kind != "full_attention"
        )
        share = linear / sum(per_layer)
        logger.info(
            "%s: %d tokens (%d visual), linear layers hold %.0f%% of the decoder FLOPs",
            name,
            tokens,
            visual,
            100 * share,
        )
        full_time, _ = time_prefill(model, inputs, runs=runs)
        for k in range(shape.num_layers + 1):
            with dyvte.withdraw(model, layer=k):
                t, times = time_prefill(model, inputs, runs=runs) if k < shape.num_layers else (full_time, [0.0])
                with torch.inference_mode():
                    cache = cache_out(model(**inputs, logits_to_keep=1, use_cache=True))
            ideal = 1 / dyvte.prefill_flops(cfg, tokens, visual, k).ratio
            rows.append(
                {
                    "dtype": name,
                    "K": k,
                    "full": full_time,
                    "withdrawn": t,
                    "spread": max(times) - min(times),
                    "speedup": full_time / t,
                    "ideal": ideal,
                    "kv": kv_cache_bytes(cache),
                    "state": recurrent_state_bytes(cache),
                    "linear_share": share,
                }
            )
            logger.info("  K=%d done: %.3fs vs %.3fs", k, t, full_time)
        del model
    return rows


def hybrid_table(shape: Qwen3_5Shape, rows: list[dict]) -> str:
    """The markdown table of :func:`hybrid_rows` on ``shape``."""
    lines = [
        f"\nQwen3.5-shaped prefill on {platform.processor() or platform.machine()}: {shape.num_layers} layers "
        f"(3 Gated DeltaNet + 1 full attention) at the 9B dims (d={shape.hidden_size}, FFN {shape.intermediate_size}),"
        f" 35 text + {shape.image_tokens} visual + 40 text tokens, {torch.get_num_threads()} threads; "
        f"linear layers: {100 * rows[0]['linear_share']:.0f}% of the decoder FLOPs\n",
        "| dtype | K | prefill full (s) | prefill withdrawn (s) | spread (s) | speedup | FLOPs-ideal | measured/ideal "
        "| KV (MB) | linear state (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['K']} | {r['full']:.3f} | {r['withdrawn']:.3f} | {r['spread']:.3f} | "
            f"{r['speedup']:.2f}x | {r['ideal']:.2f}x | {r['speedup'] / r['ideal']:.2f} | {r['kv'] / 2**20:.2f} | "
            f"{r['state'] / 2**20:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
