"""``dyvte report``'s text and figures: the report's Markdown (:func:`render`), the matched-FLOPs table, the heads'
promise, the included benchmark tables and the exit-layer histogram. :mod:`dyvte.cli.report` runs the methods and
writes what these make.
"""

from __future__ import annotations

import platform
from collections import defaultdict
from pathlib import Path

import torch

from dyvte.eval.harness import OVERALL, format_per_type, method_kind

__all__ = ["DTYPE_NAMES", "PROMISE_MARK", "included", "matched", "plot_exit_layers", "promise", "render"]

PROMISE_MARK = "<!-- promise -->"

#: how the report names each --dtype
DTYPE_NAMES = {"float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16"}


def promise(results: list, heads_dir: str) -> str:
    """The calibrated heads' promise (tolerance, δ, calibration size) next to the disagreement realized here."""
    from dyvte.policies.exit_heads import ExitHeads

    config = ExitHeads.from_pretrained(heads_dir).config
    calibration = config.calibration
    calibrated = next((r for r in results if r.method.startswith("heads") and "calibrated" in r.method), None)
    if calibration is None or calibrated is None:
        return f"`{heads_dir}` holds no calibrated thresholds (trained with --data.splits.calib_samples 0)."
    m = calibrated.metrics[OVERALL]
    full = results[0].metrics[OVERALL]
    kept = "kept" if 1 - m["agreement"] <= calibration["tolerance"] else "NOT kept"
    gap = m["accuracy"] - full["accuracy"]
    return (
        f"`{calibrated.method}`: thresholds certified by Learn-then-Test on {calibration['samples']} held-out "
        f"calibration samples ({calibration['errors']} disagreements there) to keep the share of answers that differ "
        f"from the full model's at most {calibration['tolerance']:g}, except with probability "
        f"{calibration['delta']:g}. On this split: disagreement {1 - m['agreement']:.4f} (promise {kept}), accuracy "
        f"{m['accuracy']:.3f} against the full model's {full['accuracy']:.3f} ({100 * gap:+.2f} pt), relative prefill "
        f"FLOPs {m['relative_flops']:.3f}."
    )


def matched(results: list, targets: list[float]) -> str:
    """For each FLOPs target, the best accuracy of each method family at or below it."""
    families: dict[str, list] = defaultdict(list)
    for r in results[1:]:
        families[method_kind(r.method)].append(r)
    lines = ["| method | " + " | ".join(f"≤ {t:.0%} FLOPs" for t in targets) + " |", "|---" * (len(targets) + 1) + "|"]
    for family, group in families.items():
        cells = []
        for target in targets:
            ok = [r for r in group if r.flops <= target + 1e-9]
            best = max(ok, key=lambda r: r.accuracy, default=None)
            cells.append("—" if best is None else f"{best.accuracy:.3f} ({best.method.split(' ', 1)[-1]})")
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(
    results: list,
    again,
    targets: list[float],
    samples: int,
    split: str,
    heads_name: str,
    batch_size: int,
    wallclock_path: str,
    mixed_path: str = "docs/mixed.md",
    decode_path: str = "docs/decode.md",
    dtype: str = "float32",
    benchmarks_path: str = "docs/benchmarks.md",
) -> str:
    """The report's Markdown (``results[0]`` is the full model; ``again`` is its second timed pass)."""
    full = results[0]
    base_ms = (full.metrics[OVERALL]["prefill_ms"] + again.metrics[OVERALL]["prefill_ms"]) / 2
    base_kv = full.metrics[OVERALL]["kv_bytes"]
    rows = [
        "| method | accuracy | agreement | rel. prefill FLOPs | prefill ms/sample | p10–p90 over batches | "
        "measured speedup | KV cache after prefill (KB/sample) | rel. KV |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in [full, again, *results[1:]]:
        m = r.metrics[OVERALL]
        rows.append(
            f"| {r.method} | {m['accuracy']:.3f} | {m['agreement']:.3f} | {m['relative_flops']:.3f} | "
            f"{m['prefill_ms']:.2f} | {m['prefill_ms_p10']:.2f}–{m['prefill_ms_p90']:.2f} | "
            f"{base_ms / m['prefill_ms']:.2f}× | {m['kv_bytes'] / 1024:.1f} | "
            f"{m['kv_bytes'] / base_kv:.3f} |"
        )
    wallclock = Path(wallclock_path)
    realistic = (
        wallclock.read_text().strip()
        if wallclock.is_file()
        else f"(not measured yet: run `python benchmarks/methods.py --output {wallclock_path}`)"
    )
    return "\n".join(
        [
            "# dyvte comparison report",
            "",
            f"Demo model on the {split} split ({samples} samples), greedy, {DTYPE_NAMES.get(dtype, dtype)}, "
            f"torch {torch.__version__}, "
            f"{torch.get_num_threads()} CPU threads on {platform.machine()}. One timed pass per method over the split "
            f"in batches of {batch_size} after one untimed warm-up batch (prefill = time to the first generated "
            "token, vision encoder included); the spread is the 10th–90th percentile of the per-batch prefill time "
            f"per sample over the {-(-samples // batch_size)} batches (batches differ in content as well as in noise). "
            "The full model is timed first and again after every other method; speedups are against the mean of "
            "the two passes, and their gap is the machine's drift over the run. "
            "FLOPs: text decoder + LM head on one position, 2 FLOPs per "
            "multiply-add, dense attention, GQA-aware (`dyvte.prefill_flops`, detailed convention), relative to "
            "the full model. Regenerate with `python train/report.py`.",
            "",
            "![accuracy vs FLOPs](accuracy_vs_flops.png)",
            "",
            "## The exit heads' promise",
            "",
            PROMISE_MARK,
            "",
            "## Matched FLOPs: best accuracy at or below each budget",
            "",
            matched(results, targets),
            "",
            "## Every setting",
            "",
            "\n".join(rows),
            "",
            "Exit heads in a batch: each row exits at its own layer and its FLOPs and KV bytes are counted as if it "
            "were served alone (batch 1, DyVTE's setting); after an exit the later layers run each group of rows at "
            "its own width (grouped execution, below), and the heads' per-layer decision adds its own cost, so their "
            f"measured time in batches of {batch_size} on this tiny model is dominated by per-call costs. Static K, "
            "calibrated K and the pruning methods shorten every row at once. The realistic-shape table below times "
            "the heads at batch 1, and the mixed-exit section times a grouped batch.",
            "",
            "## Standard benchmarks (paper-style table)",
            "",
            "Each method's headline score on benchmark files in their public layouts (`dyvte.eval.scorers`), with "
            "its relative prefill FLOPs and prefill time: `train/report.py --benchmarks`, included from "
            f"`{benchmarks_path}`:",
            "",
            included(benchmarks_path, "train/report.py --benchmarks pope=demo mme=demo --output_dir docs"),
            "",
            "## Accuracy per question type",
            "",
            format_per_type(results, "accuracy"),
            "",
            f"## Exit layers of `{heads_name}` per question type",
            "",
            "![exit layers](exit_layers.png)",
            "",
            "## Wall clock at realistic shapes",
            "",
            "On the demo's 2.6 M-parameter model the wall clock above is dominated by per-call costs. The table below "
            "is every method at matched FLOPs budgets on a random-weight decoder shaped like LLaVA-1.5-7B's "
            f"(`benchmarks/methods.py`, included from `{wallclock_path}`):",
            "",
            realistic,
            "",
            "## Mixed exits in a batch (grouped execution)",
            "",
            "A prefill whose rows leave at different layers runs each layer after an exit once per group of rows "
            "(rows still in, rows that left), each at its own width (docs/design.md §4). "
            f"`benchmarks/mixed.py`, included from `{mixed_path}`:",
            "",
            included(mixed_path, "benchmarks/mixed.py"),
            "",
            "## Decode",
            "",
            "Time per output token, tokens/s, KV bytes and peak memory per method and batch size, with the bytes a "
            f"step reads and which of weights or KV bounds it. `benchmarks/decode.py`, included from `{decode_path}`:",
            "",
            included(decode_path, "benchmarks/decode.py"),
        ]
    )


def included(path: str, script: str) -> str:
    """The Markdown file at ``path`` as is, or a line saying it was not measured yet (never an invented figure)."""
    file = Path(path)
    return file.read_text().strip() if file.is_file() else f"(not measured yet: run `python {script}`)"


def plot_exit_layers(result, num_layers: int, path: Path) -> None:
    """PNG: histogram of exit layers per question type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = sorted(set(result.qtypes))
    fig, axes = plt.subplots(1, len(types), figsize=(2.4 * len(types), 2.6), sharey=True)
    for ax, qtype in zip(axes, types, strict=True):
        layers = [e for e, q in zip(result.exit_layers, result.qtypes, strict=True) if q == qtype]
        ax.hist(layers, bins=range(num_layers + 2), align="left", rwidth=0.85)
        ax.set_title(qtype)
        ax.set_xticks(range(num_layers + 1))
        ax.set_xlabel("exit layer")
    axes[0].set_ylabel("samples")
    fig.suptitle(result.method, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
