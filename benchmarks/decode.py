"""Decode benchmark: what withdrawal buys a serving batch, step by step, against its bytes bound.

A decode step reads every decoder weight and every row's KV cache once. Withdrawal leaves layers >= K without visual
entries, so the KV bytes per row fall by about (L - K) / L of the visual share; whether the step gets faster depends on
which of the two reads dominates. Per method and batch size this prints tokens/s, time per output token (one step),
the KV-cache bytes held, the peak memory of the decode, the bytes a step moves, which of weights or KV dominates them,
and the measured speedup next to the bytes-bound one ((weights + c * KV_full) / (weights + c * KV_method)). A step
reads the KV once for attention; a dynamic cache also appends with ``torch.cat``, which copies every layer's keys and
values (one more read and a write): ``c = 3`` with a dynamic cache (the CPU section), ``c = 1`` with a static one.

Methods: the full model, static K = 3 and 16 of 32 (scaled to the layers run), and per-row exits forced to a mix
(exit heads decide per row; forcing their exits gives the same cache, see docs/design.md §2).

CPU (default): LLaVA-7B's layer shape with 8 of its 32 layers, fp32, prompt 35 text + 576 visual + 40 text tokens.
A single row (the mix: its 8 rows) is prefilled once, then decoded at batch 1; the cache is repeated per row
(``Withdrawal.repeat_rows``) to batch 8 and 32 and decoded again, so the prompt grows by ``--steps`` tokens between
batch sizes (measured KV bytes reflect it). Greedy, one model call per token (``dyvte.eval.benchmark.greedy_steps``).

GPU (``--gpu``, runs unchanged when a device is lent): bf16, all 32 layers, each batch size prefilled for real and
decoded by ``generate`` with a static cache and the compiled forward (``benchmarks/serving.py``'s modes).

    python benchmarks/decode.py --threads 2                 # CPU, 8 layers, batch 1 / 8 / 32
    python benchmarks/decode.py --gpu                       # GPU section
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

import dyvte
from dyvte.engine.compat import cache_out, cache_repeat_rows
from dyvte.engine.registry import resolve
from dyvte.eval.benchmark import (
    DTYPES,
    LlavaShape,
    build_random_llava,
    greedy_steps,
    kv_cache_bytes,
    llava_prompt,
    threads,
)

logger = logging.getLogger("decode")

MIX_OF_8 = (1, 1, 3, 3, 5, 5, 8, 8)  # exits of 8 rows, of 8 layers (benchmarks/mixed.py's default batch)


@dataclass
class Row:
    """One table row."""

    method: str
    batch: int
    step_s: float  # median time of one decode step (= time per output token of each row)
    kv_bytes: int  # KV cache held during the steps (after the last one)
    peak_bytes: int | None  # peak memory of the decode (GPU: allocated; CPU: the process's resident set)
    weight_bytes: int  # decoder layers + LM head, read once per step
    tokens_equal: bool | None = None  # the repeated rows decode the same tokens as the row they repeat
    fastest_s: float | None = None  # the fastest step (the least disturbed on a shared machine)
    kv_passes: int = 3  # times a step moves the KV bytes: attention read + torch.cat's read and write (dynamic cache)


def methods(layers: int, mix: tuple[int, ...]) -> dict[str, list[int] | None]:
    """Method name -> exit layers of the prefilled rows (``None``: the unhooked model)."""
    low, mid = max(1, round(3 * layers / 32)), round(16 * layers / 32)
    scaled = [round(k * layers / 8) for k in mix]
    return {
        "full": None,
        f"static K={low} (3 of 32)": [low],
        f"static K={mid} (16 of 32)": [mid],
        f"mixed exits {scaled}": scaled,
    }


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights one decode step reads: every decoder layer and the LM head."""
    layers = resolve(model).layers
    params = [p for layer in layers for p in layer.parameters()] + list(model.get_output_embeddings().parameters())
    return sum(p.numel() * p.element_size() for p in params)


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, int | None]]:
    """The peak memory inside the block: GPU bytes allocated, or on Linux the process's peak resident set (reset
    through ``/proc/self/clear_refs``); ``None`` where neither can be read."""
    out: dict[str, int | None] = {"peak": None}
    status = Path("/proc/self/status")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
    try:
        yield out
    finally:
        if device.type == "cuda":
            out["peak"] = torch.cuda.max_memory_allocated(device)
        elif status.exists():
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out["peak"] = int(line.split()[1]) * 1024


def cpu_rows(model, shape: LlavaShape, name: str, exits: list[int] | None, batches: list[int], steps: int) -> list[Row]:
    """Prefill ``len(exits)`` rows once, decode ``steps`` tokens at each batch size, repeating the rows in between."""
    first = max(1, len(exits or [1]))
    inputs = llava_prompt(shape, batch=first, device=model.device, dtype=model.dtype)
    suppress = resolve(model).visual_ids
    weights = weight_bytes(model)
    context = contextlib.nullcontext() if exits is None else dyvte.withdraw(model, layer=exits)
    rows = []
    with context as handle, torch.inference_mode():
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        cache, logits, mask, size = cache_out(out), out.logits[:, -1], inputs["attention_mask"], first
        times = 1
        for batch in batches:
            if batch < size or batch % size:
                continue  # the mix cannot be cut below its rows
            times = batch // size
            if times > 1:  # repeated: each row's copies sit next to it
                if handle is not None:
                    handle.repeat_rows(cache, times)
                else:
                    cache_repeat_rows(cache, times)
                logits, mask = logits.repeat_interleave(times, 0), mask.repeat_interleave(times, 0)
                size = batch
            with peak_memory(model.device) as peak:
                tokens, step_times = greedy_steps(model, logits, cache, mask, steps, suppress)
            # every copy of a row decodes that row's tokens (None: nothing was repeated)
            equal = torch.equal(tokens, tokens[::times].repeat_interleave(times, 0)) if times > 1 else None
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], steps)], 1)  # the cache now holds the steps too
            logits = _continue_from(tokens, model.config.text_config.vocab_size)
            rows.append(
                Row(
                    name,
                    batch,
                    statistics.median(step_times[1:]),
                    kv_cache_bytes(cache),
                    peak["peak"],
                    weights,
                    equal,
                    min(step_times[1:]),
                )
            )
            logger.info("%s, batch %d: %.1f ms per step", name, batch, 1e3 * rows[-1].step_s)
    return rows


def _continue_from(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """``(B, V)`` logits whose greedy pick is each row's last token: the next decode call then feeds the token the
    previous steps chose last (not yet in the cache)."""
    logits = torch.full((tokens.shape[0], vocab), -1.0, device=tokens.device)
    return logits.scatter(1, tokens[:, -1:], 1.0)


def gpu_rows(model, shape: LlavaShape, name: str, exits: list[int] | None, batches: list[int], steps: int) -> list[Row]:
    """Each batch size prefilled for real, then ``generate`` with a static cache and the compiled forward."""
    sys.path.insert(0, str(Path(__file__).parent))
    from serving import generate_kwargs, timed_generate  # the serving benchmark's decoding modes

    kwargs = generate_kwargs("compiled", steps, model.device)
    weights = weight_bytes(model)
    rows = []
    for batch in batches:
        if exits is not None and len(exits) > 1 and batch % len(exits):
            continue
        inputs = llava_prompt(shape, batch=batch, device=model.device, dtype=model.dtype)
        layers = None if exits is None else [exits[row % len(exits)] for row in range(batch)]
        context = contextlib.nullcontext() if layers is None else dyvte.withdraw(model, layer=layers)
        with context:
            timed_generate(model, inputs, kwargs)  # warm-up: compiles
            with peak_memory(model.device) as peak:
                _, _, step = timed_generate(model, inputs, kwargs)
            with torch.inference_mode():
                held = kv_cache_bytes(cache_out(model(**inputs, use_cache=True, logits_to_keep=1)))
        rows.append(Row(name, batch, step, held, peak["peak"], weights, kv_passes=1))  # static cache: no copy
        logger.info("%s, batch %d: %.2f ms per step", name, batch, 1e3 * step)
    return rows


def print_table(rows: list[Row], header: str) -> None:
    """The Markdown table, speedups against the full model at the same batch size (of the median steps, and where
    measured, of the fastest steps: on a shared machine the least disturbed)."""
    full = {row.batch: row for row in rows if row.method == "full"}
    print(header)
    print(
        "| method | batch | tokens/s | ms per output token (median / fastest step) | KV (MB) | peak memory (MB) | "
        "bytes moved per step (MB) | bound | decode speedup (median / fastest) | bytes-bound speedup | "
        "KV-bytes ratio | "
        "repeated rows decode alike |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ref = full.get(row.batch)
        speedup = f"{ref.step_s / row.step_s:.2f}x" if ref else "-"
        fastest = "-"
        if row.fastest_s is not None:
            fastest = f"{1e3 * row.fastest_s:.1f}"
            if ref and ref.fastest_s is not None:
                speedup += f" / {ref.fastest_s / row.fastest_s:.2f}x"
        moved = row.weight_bytes + row.kv_passes * row.kv_bytes
        bytes_bound = f"{(ref.weight_bytes + ref.kv_passes * ref.kv_bytes) / moved:.2f}x" if ref else "-"
        kv_ratio = f"{ref.kv_bytes / row.kv_bytes:.2f}x" if ref else "-"
        bound = "KV bytes" if row.kv_passes * row.kv_bytes > row.weight_bytes else "weights"
        peak = f"{row.peak_bytes / 2**20:.0f}" if row.peak_bytes else "-"
        alike = {None: "-", True: "yes", False: "NO"}[row.tokens_equal]
        print(
            f"| {row.method} | {row.batch} | {row.batch / row.step_s:.1f} | {1e3 * row.step_s:.1f} / {fastest} | "
            f"{row.kv_bytes / 2**20:.1f} | {peak} | {moved / 2**20:.0f} | {bound} | {speedup} | "
            f"{bytes_bound} | {kv_ratio} | {alike} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of LLaVA-7B's shape (32 = all)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument(
        "--steps", type=int, default=6, help="decode steps per batch size (median of all but the first)"
    )
    parser.add_argument("--mix", nargs="+", type=int, default=list(MIX_OF_8), help="exits of the mix, of 8 layers")
    parser.add_argument("--methods", nargs="+", default=None, help="method names to run (default: all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--gpu", action="store_true", help="GPU section: bf16, 32 layers, static cache, compiled")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.gpu:
        args.layers, args.dtype = 32, "bf16"
    device = "cuda" if args.gpu else "cpu"
    shape = LlavaShape.llava_7b(num_layers=args.layers)
    rows: list[Row] = []
    with threads(args.threads):
        model = build_random_llava(shape, dtype=DTYPES[args.dtype], device=device)
        for name, exits in methods(args.layers, tuple(args.mix)).items():
            if args.methods and not any(name.startswith(m) for m in args.methods):
                continue
            measure = gpu_rows if args.gpu else cpu_rows
            rows.extend(measure(model, shape, name, exits, sorted(args.batches), args.steps))
        num_threads = torch.get_num_threads()
    mode = "static cache + compiled forward" if args.gpu else "dynamic cache, eager, one call per token"
    device_name = torch.cuda.get_device_name() if args.gpu else platform.processor() or platform.machine()
    print_table(
        rows,
        f"\nDecode benchmark on {device_name} ({device}, {args.dtype}, {num_threads} threads, {mode}), LLaVA-7B "
        f"layer shape, {args.layers} layers, prompt 35 text + {shape.image_tokens} visual + 40 text tokens, "
        f"{args.steps} steps per batch size; 1-min load average at the end: {os.getloadavg()[0]:.2f}\n",
    )


if __name__ == "__main__":
    main()
