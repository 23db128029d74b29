"""Serving benchmark: withdrawal under dynamic caches, static caches and a compiled decoding forward.

For each exit policy (none, static K, per-row K, exit heads) and each decoding mode (dynamic cache, static cache,
static cache + ``torch.compile``d forward, as ``generate`` compiles it), greedy-generates ``--new-tokens`` tokens for a
batch of LLaVA-1.5-like prompts on a random-weight model and prints one table row: whether the tokens equal those of
the dynamic cache under the same policy, the prefill time, the median decode time per step, dyvte's own host syncs
(prefill / per decode step, counted by :class:`dyvte.engine.syncs.SyncCounter` in an eager run of the same mode), and,
for
the compiled mode, the graphs dynamo built and its graph breaks.

    python benchmarks/serving.py                              # tiny shape, fp32, every mode (compiling takes minutes)
    python benchmarks/serving.py --modes dynamic static       # no compile
    python benchmarks/serving.py --dtype bf16 --layers 32 --hidden 4096 --ffn 11008 --heads 32   # LLaVA-7B shape
    python benchmarks/serving.py --device cpu --smoke --output /tmp/serving.md    # seconds: the code path, tiny
    benchmarks/gpu.sh docs/gpu.md                             # the GPU run: LLaVA-7B shape, bf16, static + compiled

On CPU ``generate`` compiles only when told to (``compile_config._compile_all_devices``); this script does so, with
``mode="default"`` (CUDA graphs, ``"reduce-overhead"``, are used on a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import dyvte
from dyvte.engine.syncs import SyncCounter
from dyvte.eval.benchmark import (
    DTYPES,
    LlavaShape,
    StepClock,
    add_shape_arguments,
    build_random_llava,
    llava_prompt,
    threads,
)
from dyvte.utils.devices import check_device

logger = logging.getLogger("serving")

MODES = ("dynamic", "static", "compiled")
TINY = LlavaShape(hidden_size=256, num_layers=8, intermediate_size=688, num_heads=4, num_kv_heads=4, image_size=112)


def policies(model: torch.nn.Module, batch: int) -> dict[str, Callable[[], Any]]:
    """The exit policies compared: a context manager factory each (``nullcontext`` for the full model)."""
    layers = model.config.text_config.num_hidden_layers
    heads = dyvte.ExitHeads.for_model(model)
    torch.manual_seed(0)
    for param in heads.parameters():
        torch.nn.init.normal_(param, std=0.5)
    heads = heads.to(model.dtype).eval()
    per_row = [(1 + row * (layers - 1) // max(batch - 1, 1)) for row in range(batch)]  # 1 .. L spread over rows
    return {
        "full": contextlib.nullcontext,
        f"static K={layers // 4}": lambda: dyvte.withdraw(model, layer=layers // 4),
        f"per-row K={per_row}": lambda: dyvte.withdraw(model, layer=per_row),
        "exit heads (random, p=0.5)": lambda: dyvte.withdraw(model, heads=heads, threshold=0.5),
    }


def generate_kwargs(mode: str, new_tokens: int, device: torch.device) -> dict[str, Any]:
    """``generate`` arguments of one decoding mode."""
    kwargs: dict[str, Any] = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    if mode in ("static", "compiled"):
        kwargs["cache_implementation"] = "static"
    if mode == "compiled":
        from transformers import CompileConfig

        config = CompileConfig(fullgraph=False, mode="reduce-overhead" if device.type == "cuda" else "default")
        config._compile_all_devices = True  # generate compiles on CPU only when told to
        kwargs["compile_config"] = config
    else:
        kwargs["disable_compile"] = True
    return kwargs


def timed_generate(model: torch.nn.Module, inputs: dict, kwargs: dict) -> tuple[torch.Tensor, float, float]:
    """Tokens, prefill seconds and median decode seconds per step of one greedy generate."""
    clock = StepClock(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, stopping_criteria=[clock], **kwargs)
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)]
    return out[:, inputs["input_ids"].shape[1] :], clock.stamps[0] - start, statistics.median(steps)


def count_syncs(model: torch.nn.Module, inputs: dict, kwargs: dict) -> tuple[int, float]:
    """dyvte's host syncs in the prefill and per decode step (mean over steps) of one eager generate."""
    counter = SyncCounter(model)
    try:
        with counter, torch.inference_mode():
            model.generate(**inputs, **kwargs)
    finally:
        counter.remove()
    return counter.calls[0], sum(counter.calls[1:]) / max(len(counter.calls) - 1, 1)


@contextlib.contextmanager
def dynamo_stats() -> Iterator[dict[str, int]]:
    """Graphs built and graph breaks recorded by dynamo inside the block."""
    from torch._dynamo.utils import counters

    counters.clear()
    stats: dict[str, int] = {}
    try:
        yield stats
    finally:
        stats["graphs"] = counters["stats"]["unique_graphs"]
        stats["breaks"] = sum(counters["graph_break"].values())


#: ``--smoke``: the shape and lengths of a seconds-long CPU run of the same code path
SMOKE = LlavaShape(hidden_size=64, num_layers=4, intermediate_size=128, num_heads=4, num_kv_heads=4, image_size=56)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``: default ``sys.argv[1:]``); a CUDA ``--device`` without CUDA is an error here."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_shape_arguments(parser, TINY)
    parser.add_argument("--image-size", type=int, default=TINY.image_size, help="vision input (px), patch 14")
    parser.add_argument("--output", default=None, help="also write the Markdown table (with its header) to this file")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a seconds-long check of the same code path: a 4-layer d=64 shape, batch 2, 3 new tokens",
    )
    args = parser.parse_args(argv)
    try:
        check_device(args.device, "--device")
    except ValueError as error:
        parser.error(str(error))
    if args.smoke:
        args.layers, args.hidden, args.ffn, args.heads = (
            SMOKE.num_layers,
            SMOKE.hidden_size,
            SMOKE.intermediate_size,
            SMOKE.num_heads,
        )
        args.image_size, args.batch, args.new_tokens = SMOKE.image_size, 2, 3
    return args


def run(args: argparse.Namespace) -> list[tuple]:
    """One row per (policy, mode): ``(policy, mode, exits, same, prefill s, decode s/step, syncs, graphs)``."""
    shape = LlavaShape(
        hidden_size=args.hidden,
        num_layers=args.layers,
        intermediate_size=args.ffn,
        num_heads=args.heads,
        num_kv_heads=args.heads,
        image_size=args.image_size,
    )
    dtype = DTYPES[args.dtype]
    rows = []
    with threads(args.threads):
        model = build_random_llava(shape, dtype=dtype, device=args.device, attn="sdpa")
        inputs = llava_prompt(shape, batch=args.batch, device=args.device, dtype=dtype)
        device = model.device
        for name, context in policies(model, args.batch).items():
            reference = None
            for mode in args.modes:
                kwargs = generate_kwargs(mode, args.new_tokens, device)
                eager = generate_kwargs("static" if mode == "compiled" else mode, args.new_tokens, device)
                with context() as handle:
                    with dynamo_stats() as stats:
                        start = time.perf_counter()  # warm-up (the compiled mode compiles here); time the second
                        timed_generate(model, inputs, kwargs)
                        logger.info("%s / %s: warm-up %.1f s", name, mode, time.perf_counter() - start)
                        tokens, prefill, step = timed_generate(model, inputs, kwargs)
                    syncs = count_syncs(model, inputs, eager) if handle is not None else (0, 0.0)
                    exits = handle.exit_layers.tolist() if handle is not None else None
                if mode == "dynamic" or reference is None:
                    reference = tokens
                same = "yes" if torch.equal(tokens, reference) else "NO"
                graphs = f"{stats['graphs']} / {stats['breaks']}" if mode == "compiled" else "-"
                rows.append((name, mode, exits, same, prefill, step, syncs, graphs))
                logger.info("%s / %s: %.1f ms per step, tokens equal: %s", name, mode, 1e3 * step, same)
    return rows


def markdown(args: argparse.Namespace, rows: list[tuple]) -> str:
    """The table of :func:`run`'s rows under a header naming the machine, device, dtype, shape and lengths."""
    on_cuda = args.device.startswith("cuda")
    machine = torch.cuda.get_device_name(args.device) if on_cuda else platform.processor() or platform.machine()
    visual = (args.image_size // 14) ** 2
    lines = [
        f"Serving benchmark on {machine} ({args.device}, {args.dtype}, "
        f"SDPA attention, {torch.get_num_threads()} threads, torch {torch.__version__}), random-weight decoder "
        f"L={args.layers} d={args.hidden} FFN {args.ffn} {args.heads} heads, batch {args.batch} x (35 text + "
        f"{visual} visual + 40 text tokens), {args.new_tokens} new tokens. Exit heads have random weights (they time "
        "the heads' cost, not a meaningful exit decision); per-row K is a batch whose rows exit at different layers.",
        "",
        f"| policy | mode | exit layers | tokens = {args.modes[0]} | prefill (s) | decode (ms/step) | "
        "dyvte syncs prefill / step | dynamo graphs / breaks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, mode, exits, same, prefill, step, (s_pre, s_step), graphs in rows:
        lines.append(
            f"| {name} | {mode} | {exits or '-'} | {same} | {prefill:.3f} | {1e3 * step:.1f} | "
            f"{s_pre} / {s_step:g} | {graphs} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark, print its table and write it to ``--output`` when given; returns the table."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    text = markdown(args, run(args))
    print("\n" + text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
        logger.info("table written to %s", args.output)
    return text


if __name__ == "__main__":
    main()
