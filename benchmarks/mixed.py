"""Mixed-exit batch prefill: grouped execution vs the whole batch at its widest row, against the rows' FLOPs ideal.

A batch whose rows leave at different layers (``withdraw(layer=[K_0, ..., K_{B-1}])``, what exit heads produce) is
prefilled grouped (the default: the layers after an exit run rows still in and rows that left as separate calls,
docs/design.md §4 "Grouped execution") and ungrouped (``handle.grouped = False``: every layer at the batch's widest
row). Each distinct row is also prefilled alone. The FLOPs ideal of a row is the full row's measured time times its
relative prefill FLOPs (``dyvte.prefill_flops``, detailed convention, decoder + LM head); the batch's ideal is the sum
over its rows. Prompts are LLaVA-1.5-like (35 text + 576 visual + 40 text tokens, every row the same length).

    python benchmarks/mixed.py --threads 2                               # 8 of LLaVA-7B's 32 layers, fp32, CPU
    python benchmarks/mixed.py --threads 2 --demo-mix 8                  # the demo heads' exits on 8 test records
    python benchmarks/mixed.py --gpu                                     # GPU: bf16, all 32 layers (exits x 4)

``--demo-mix N`` runs the demo model with the demo exit heads (threshold 0.8, checkpoints/README.md) on the first N
test records and uses their exit layers (the demo decoder has 8 layers, as the CPU shape here).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform

import torch

import dyvte
from dyvte.eval.benchmark import DTYPES, LlavaShape, build_random_llava, llava_prompt, median_time, threads

logger = logging.getLogger("mixed")

DEFAULT_EXITS = (1, 1, 3, 3, 5, 5, 8, 8)  # of 8 layers; 8 = never leaves


def demo_exits(records: int, threshold: float = 0.8) -> list[int]:
    """Exit layers the demo heads choose on the first ``records`` demo test records."""
    from dyvte.data.records import build_inputs
    from dyvte.data.sources import load_model, load_records

    model, processor = load_model("demo")
    batch = list(load_records("demo", "test", records))
    inputs = build_inputs(processor, batch, dtype=model.dtype)
    heads = dyvte.ExitHeads.from_pretrained("checkpoints/demo-exit-heads")
    with dyvte.withdraw(model, heads=heads, threshold=threshold) as handle, torch.no_grad():
        model(**inputs, logits_to_keep=1)
    return handle.exit_layers.tolist()


def prefill(model: torch.nn.Module, inputs: dict, exits: list[int], grouped: bool, runs: int, warmup: int) -> float:
    """Median prefill time (``logits_to_keep=1``, KV cache on) under per-row exits."""
    with dyvte.withdraw(model, layer=exits) as handle, torch.inference_mode():
        handle.grouped = grouped
        seconds, _ = median_time(lambda: model(**inputs, logits_to_keep=1, use_cache=True), runs, warmup, model.device)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--exits",
        nargs="+",
        type=int,
        default=None,
        help="per-row exit layers (default: 1 1 3 3 5 5 8 8 scaled to --layers)",
    )
    parser.add_argument("--demo-mix", type=int, default=0, help="use the demo heads' exits on this many test records")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of LLaVA-7B's shape (32 = all)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--runs", type=int, default=1, help="timed runs of each batch (median)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-ungrouped", action="store_true", help="do not time the whole-batch run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gpu", action="store_true", help="GPU section: bf16, all 32 layers, 3 runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.gpu:
        args.layers, args.dtype, args.runs, args.device = 32, "bf16", max(args.runs, 3), "cuda"
    shape = LlavaShape.llava_7b(num_layers=args.layers)
    if args.demo_mix:
        exits = [round(k * args.layers / 8) for k in demo_exits(args.demo_mix)]
        source = f"demo heads (threshold 0.8) on the first {args.demo_mix} demo test records, scaled to L={args.layers}"
    else:
        exits = args.exits or [round(k * args.layers / 8) for k in DEFAULT_EXITS]
        source = "given"
    dtype = DTYPES[args.dtype]
    warmup = 1 if args.device == "cuda" else 0  # a CPU batch run takes a minute: the rows alone warm the kernels
    with threads(args.threads):
        model = build_random_llava(shape, dtype=dtype, device=args.device)
        batch = llava_prompt(shape, batch=len(exits), device=args.device, dtype=dtype)
        one = {key: value[:1] for key, value in batch.items()}
        num_tokens = one["input_ids"].shape[1]
        logger.info("exits %s (%s); %d tokens per row; %d threads", exits, source, num_tokens, torch.get_num_threads())
        alone = {}
        for layer in sorted(set(exits) | {args.layers}):
            alone[layer] = prefill(model, one, [layer], True, 3 if args.device == "cuda" else 1, 1)
            logger.info("row alone, exit %d: %.3f s", layer, alone[layer])
        grouped = prefill(model, batch, exits, True, args.runs, warmup)
        logger.info("batch grouped: %.3f s", grouped)
        ungrouped = None if args.skip_ungrouped else prefill(model, batch, exits, False, args.runs, warmup)
        if ungrouped is not None:
            logger.info("batch ungrouped: %.3f s", ungrouped)

    full_row = alone[args.layers]
    ideal = sum(full_row * dyvte.prefill_flops(model.config, num_tokens, shape.image_tokens, k).ratio for k in exits)
    rows = sum(alone[k] for k in exits)
    full_batch_ideal = full_row * len(exits)
    load = os.getloadavg()[0]
    print(
        f"\nMixed-exit batch prefill on {platform.processor() or platform.machine()} ({args.device}), {args.dtype}, "
        f"LLaVA-7B layer shape (d 4096, FFN 11008, 32 heads), {args.layers} layers, {torch.get_num_threads()} threads, "
        f"batch {len(exits)} x {num_tokens} tokens ({shape.image_tokens} visual), exits {exits} ({source}); "
        f"{args.runs} run(s) per batch; 1-min load average at the end: {load:.2f}\n"
    )
    print("| run | prefill (s) | / rows' FLOPs-ideal sum | / rows-alone sum |")
    print("|---|---|---|---|")
    print(f"| rows' FLOPs-ideal sum | {ideal:.2f} | 1.00 | {ideal / rows:.2f} |")
    print(f"| rows alone, measured sum | {rows:.2f} | {rows / ideal:.2f} | 1.00 |")
    print(f"| batch, grouped | {grouped:.2f} | {grouped / ideal:.2f} | {grouped / rows:.2f} |")
    if ungrouped is not None:
        print(f"| batch, ungrouped (widest row) | {ungrouped:.2f} | {ungrouped / ideal:.2f} | {ungrouped / rows:.2f} |")
    print(
        f"| full model, {len(exits)} x row alone | {full_batch_ideal:.2f} | {full_batch_ideal / ideal:.2f} | "
        f"{full_batch_ideal / rows:.2f} |"
    )


if __name__ == "__main__":
    main()
