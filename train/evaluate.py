"""Evaluate methods on a dataset: accuracy, agreement with the full model, exit layers, prefill FLOPs, wall clock.

    python train/evaluate.py                                     # demo test split: full model and every static K
    python train/evaluate.py --config configs/evaluate_demo.yaml
    python train/evaluate.py --config configs/evaluate_heads.yaml    # calibrated K and exit heads

Method strings: full, static:K[,K...], static:all, calibrated:DIR, heads:DIR[:P,...], fastervlm:R, random:R,
fastv:K:R (R = fraction of visual tokens pruned). Writes <output_dir>/results.json (every method's metrics),
<output_dir>/<method>.json, and <output_dir>/accuracy_vs_flops.png (default ``<repo>/runs/eval``, ignored by git;
with every static K also oracle.json), logs where, and prints the tables. Nothing is written under checkpoints/.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from jsonargparse import CLI  # noqa: E402

import dyvte  # noqa: E402
from dyvte.evaluate import format_histogram, format_per_type, format_table, oracle_exit, plot_sweep  # noqa: E402
from dyvte.methods import Full, parse_method  # noqa: E402
from dyvte.registry import resolve  # noqa: E402
from dyvte.sources import load_model, load_records  # noqa: E402
from dyvte.training import REPO_ROOT  # noqa: E402


def main(
    model: str = "demo",
    data: str = "demo",
    split: str = "test",
    samples: int | None = None,
    methods: list[str] = ("full", "static:all"),
    batch_size: int = 100,
    max_new_tokens: int = 4,
    dtype: str = "float32",
    output_dir: str = str(REPO_ROOT / "runs" / "eval"),
) -> list[dyvte.EvalResult]:
    """Run each method over the dataset and report.

    Args:
        model: "demo" or a local model directory.
        data: "demo", a save_to_disk directory or a .json/.jsonl/.parquet records file.
        split: dataset split.
        samples: evaluate the first N records (default: all).
        methods: method strings (see the module docstring); the full model always runs first (the reference).
        batch_size: rows per generate call.
        max_new_tokens: generation length.
        dtype: float32 or bfloat16.
        output_dir: where JSON and PNG go (default ``<repo>/runs/eval``).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    mllm, processor = load_model(model, dtype)
    records = load_records(data, split, samples)
    num_layers = resolve(mllm).num_layers
    chosen = [m for spec in methods for m in parse_method(spec, num_layers) if not isinstance(m, Full)]
    out = Path(output_dir)
    kwargs = {"batch_size": batch_size, "max_new_tokens": max_new_tokens}
    full = dyvte.evaluate(mllm, processor, records, Full(), **kwargs)
    results = [full] + [dyvte.evaluate(mllm, processor, records, m, reference=full, **kwargs) for m in chosen]
    for r in results:
        r.save(out / (re.sub(r"[^A-Za-z0-9=.,-]+", "_", r.method) + ".json"))
    (out / "results.json").write_text(json.dumps({r.method: r.metrics for r in results}, indent=1) + "\n")
    plot_sweep(results, out / "accuracy_vs_flops.png", title=f"{model} / {split} ({len(records)} samples)")
    print(f"\n{model} on {data}/{split}, {len(records)} samples, {dtype}\n")
    print(format_table(results))
    print("\naccuracy per question type\n")
    print(format_per_type(results, "accuracy"))
    print("\nagreement with the full model per question type\n")
    print(format_per_type(results, "agreement"))
    static = {int(r.method.split("=")[1]): r for r in results if r.method.startswith("static K=")}
    static[num_layers] = static.get(num_layers, full)
    if sorted(static) == list(range(num_layers + 1)):
        summarize(full, static, [r for r in results[1:] if not r.method.startswith("static")], num_layers, out)
    logging.getLogger("evaluate").info(
        "results written to %s (results.json, one JSON per method, accuracy_vs_flops.png)", out.absolute()
    )
    return results


def summarize(full, static: dict, others: list, num_layers: int, out: Path, tolerance: float = 0.005) -> None:
    """Oracle per-sample exit, and each method's cheapest setting within ``tolerance`` of the full accuracy."""
    layers, oracle_flops = oracle_exit(full, static)
    oracle = sum(oracle_flops) / len(oracle_flops)
    print("\nsmallest safe exit layer per sample (withdrawal at every K' >= K gives the full model's answer)\n")
    print(format_histogram(layers, full.qtypes, num_layers))
    target = full.accuracy - tolerance

    def cheapest(results: list) -> tuple[str, float, float] | None:
        ok = [r for r in results if r.accuracy >= target]
        best = min(ok, key=lambda r: r.flops, default=None)
        return None if best is None else (best.method, best.accuracy, best.flops)

    rows = [("full", full.accuracy, 1.0), ("oracle per-sample exit", full.accuracy, oracle)]
    groups: dict[str, list] = {"static": list(static.values())}
    for r in others:
        groups.setdefault(r.method.split(" ")[0], []).append(r)
    for group in groups.values():
        best = cheapest(group)
        if best is not None:
            rows.append(best)
    print(f"\ncheapest setting of each method with accuracy >= full - {tolerance:g} ({target:.3f})\n")
    print("| method | accuracy | rel. prefill FLOPs | share of the oracle's savings |\n|---|---|---|---|")
    for name, acc, flops in rows:
        share = (1 - flops) / (1 - oracle) if oracle < 1 else float("nan")
        print(f"| {name} | {acc:.3f} | {flops:.3f} | {share:.0%} |")
    summary = {"oracle_relative_flops": oracle, "smallest_safe_layer": layers, "cheapest_within_tolerance": rows}
    (out / "oracle.json").write_text(json.dumps(summary) + "\n")


if __name__ == "__main__":
    CLI(main, as_positional=False)
