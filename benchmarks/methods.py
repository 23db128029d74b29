"""Wall clock of every method at matched prefill-FLOPs budgets, on a LLaVA-1.5-7B-shaped random-weight model.

The decoder has LLaVA-1.5-7B's layer shape (d = 4096, FFN 11008, 32 heads of 128, vocabulary 32064) with ``--layers``
of its 32 layers (all 32 need 27 GB in fp32); the prompt is LLaVA-1.5's: 35 text + 576 visual + 40 text tokens. The
vision tower is a small CLIP with a [CLS] token (FasterVLM scores with it; its cost is the same for every method).
For each FLOPs target, each method gets its largest budget whose prefill FLOPs (``dyvte.prefill_flops``, detailed
convention) stay at or below the target:

* static withdrawal: the largest K;
* exit heads: heads whose biases make them fire at that same K on every input (random weights have no meaningful
  exit decision, so this row measures what the heads *cost* on top of static withdrawal at the same exit);
* FasterVLM / random: the most visual tokens kept before the LLM;
* FastV at ``--fastv-layer``: the most visual tokens kept after that layer.

It prints, per method and target: the budget, relative FLOPs, median prefill time (``logits_to_keep=1``, KV cache on,
as ``generate`` does), measured speedup, FLOPs-ideal speedup and their ratio, and the KV-cache bytes the prefill left
(read from the real cache). On a CUDA device the same script runs in bf16.

    python benchmarks/methods.py                      # CPU fp32, 8 of 32 layers, targets 70/50/30%, 3 runs
    python benchmarks/methods.py --layers 32 --dtype bf16 --device cuda
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import dyvte
from dyvte.engine.compat import cache_out
from dyvte.eval.benchmark import (
    DTYPES,
    LlavaShape,
    add_shape_arguments,
    build_random_llava,
    kv_cache_bytes,
    llava_prompt,
    matmul_gflops,
    median_time,
    shape_from_args,
    threads,
)
from dyvte.policies.exit_heads import ExitHeads
from dyvte.policies.fastv import kept_count

logger = logging.getLogger("methods")


@dataclass
class Setting:
    """One method at one budget: its name, its context on the model, and the token counts its FLOPs follow."""

    method: str
    budget: str
    context: object
    flops: float


def forced_heads(model, layer: int) -> ExitHeads:
    """Exit heads that fire at exit layer ``layer`` (>= 1) for every input: zero output weights, +/-30 biases."""
    heads = ExitHeads.for_model(model)
    with torch.no_grad():
        for index, head in enumerate(heads.heads):
            head[-1].weight.zero_()
            head[-1].bias.fill_(30.0 if index == layer - 1 else -30.0)
    return heads.to(model.dtype)


def settings(model, tokens: int, visual: int, target: float, fastv_layer: int) -> list[Setting]:
    """Each method's largest budget within ``target`` relative prefill FLOPs."""
    cfg = model.config
    num_layers = cfg.text_config.num_hidden_layers

    def ratio(**kw) -> float:
        return float(dyvte.prefill_flops(cfg, **kw).flops) / float(dyvte.prefill_flops(cfg, tokens, visual).full)

    out = []
    static = [k for k in range(num_layers + 1) if ratio(num_tokens=tokens, num_visual=visual, exit_layer=k) <= target]
    if static:
        k = max(static)
        flops = ratio(num_tokens=tokens, num_visual=visual, exit_layer=k)
        out.append(Setting("static", f"K={k}", lambda k=k: dyvte.withdraw(model, layer=k), flops))
        if k >= 1:
            heads = forced_heads(model, k)
            out.append(Setting("exit heads", f"exit={k}", lambda h=heads: dyvte.withdraw(model, heads=h), flops))
    keeps = [n for n in range(visual + 1) if ratio(num_tokens=tokens - visual + n, num_visual=n) <= target]
    if keeps:
        keep = max(keeps)
        flops = ratio(num_tokens=tokens - visual + keep, num_visual=keep)
        for method in ("fastervlm", "random"):
            context = lambda m=method, n=keep: dyvte.prune(model, m, keep=n)  # noqa: E731
            out.append(Setting(method, f"keep {keep}/{visual}", context, flops))
    ratios = [r / 1000 for r in range(1001)]
    fits = [
        r
        for r in ratios
        if ratio(
            num_tokens=tokens,
            num_visual=visual,
            exit_layer=fastv_layer,
            visual_after=int(kept_count(torch.tensor(visual), r)),
        )
        <= target
    ]
    if not fits:
        logger.info(
            "fastv K=%d cannot reach %.0f%% of the FLOPs (even keeping no visual token)", fastv_layer, 100 * target
        )
    if fits:
        r = min(fits)
        after = int(kept_count(torch.tensor(visual), r))
        flops = ratio(num_tokens=tokens, num_visual=visual, exit_layer=fastv_layer, visual_after=after)
        context = lambda r=r: dyvte.prune(model, "fastv", ratio=r, layer=fastv_layer)  # noqa: E731
        out.append(Setting(f"fastv K={fastv_layer}", f"keep {after}/{visual}", context, flops))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser, LlavaShape.llava_7b(num_layers=8))  # smoke runs: smaller --hidden/--ffn/--heads
    parser.add_argument("--targets", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    parser.add_argument("--fastv-layer", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per point (median reported)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", default=None, help="also write the table (Markdown) to this file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = DTYPES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    device = torch.device(args.device)

    shape = shape_from_args(args)
    model = build_random_llava(shape, dtype=dtype, device=args.device)
    inputs = llava_prompt(shape, device=args.device, dtype=dtype)
    tokens, visual = inputs["input_ids"].shape[1], shape.image_tokens

    @torch.inference_mode()
    def prefill() -> object:
        return cache_out(model(**inputs, logits_to_keep=1, use_cache=True))

    rows = []
    with threads(args.threads):
        base_kv = kv_cache_bytes(prefill())  # the warm-up run
        base, times = median_time(prefill, args.runs, 0, device)
        logger.info("full: %.3f s", base)
        rows.append(("full", "—", "—", 1.0, base, times, base_kv))
        for target in args.targets:
            for s in settings(model, tokens, visual, target, args.fastv_layer):
                with s.context():
                    kv = kv_cache_bytes(prefill())  # the warm-up run
                    seconds, times = median_time(prefill, args.runs, 0, device)
                logger.info("%s %s %s: %.3f s", f"{target:.0%}", s.method, s.budget, seconds)
                rows.append((f"≤ {target:.0%}", s.method, s.budget, s.flops, seconds, times, kv))

        # why this dtype: on a CPU without bf16 matrix units, bf16 matmuls are far slower than fp32 (measured here)
        speeds = {n: matmul_gflops(d, device) for n, d in DTYPES.items()} if device.type == "cpu" else {}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    lines = [
        f"{shape.num_layers} decoder layers of d={shape.hidden_size}, FFN {shape.intermediate_size}, "
        f"{shape.num_heads} heads (LLaVA-1.5-7B: 32 x 4096, 11008, 32), {tokens} tokens "
        f"({visual} visual), {str(dtype).removeprefix('torch.')}, {name}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, median of {args.runs} runs after one warm-up run (spread: the fastest and "
        "slowest run). Command: `" + " ".join(["python", "benchmarks/methods.py", *sys.argv[1:]]) + "`.",
        "",
        *(
            [
                "Matmul throughput on this CPU (512 x 512, same threads): "
                + ", ".join(f"{n} {g:.1f} GFLOP/s" for n, g in speeds.items())
                + ".",
                "",
            ]
            if speeds
            else []
        ),
        "| budget | method | setting | rel. FLOPs | prefill (s) | spread (s) | speedup | FLOPs-ideal | measured/ideal "
        "| KV (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for target, method, budget, flops, seconds, times, kv in rows:
        speedup, ideal = base / seconds, 1 / flops
        lines.append(
            f"| {target} | {method} | {budget} | {flops:.3f} | {seconds:.3f} | {min(times):.3f}–{max(times):.3f} | "
            f"{speedup:.2f}× | {ideal:.2f}× | "
            f"{speedup / ideal:.2f} | {kv / 2**20:.1f} |"
        )
    lines.append(
        f"\nA method missing at a budget cannot reach it: FastV at K = {args.fastv_layer} keeps every visual token "
        f"in its first {args.fastv_layer} layers."
    )
    text = "\n".join(lines)
    print("\n" + text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
