"""Evaluate methods on a dataset: accuracy, agreement with the full model, exit layers, prefill FLOPs, wall clock.

    python train/evaluate.py                                     # demo test split: full model and every static K
    python train/evaluate.py --config configs/evaluate_demo.yaml
    python train/evaluate.py --config configs/evaluate_heads.yaml    # calibrated K and exit heads

Method strings: full, static:K[,K...], static:all, calibrated:DIR, heads:DIR[:P,...], fastervlm:R, random:R,
fastv:K:R (R = fraction of visual tokens pruned). Writes <output_dir>/results.json (every method's metrics),
<output_dir>/<method>.json, and <output_dir>/accuracy_vs_flops.png; prints the tables.
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
from dyvte.evaluate import format_per_type, format_table, plot_sweep  # noqa: E402
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
        output_dir: where JSON and PNG go.
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
    print(f"\nwritten to {out}")
    return results


if __name__ == "__main__":
    CLI(main, as_positional=False)
