"""How many records the demo's ``train/fit.py`` labels: the savings each split size buys, measured on validation data.

The main job's cost is labelling (one record ≈ 7 ms on 2 idle cores) plus training, so its split sizes (training
records T, the Platt reference P, calibration records C) are chosen by what they buy: for each (T, P, C) the heads are
trained exactly as ``train/fit.py`` trains them (Lightning, ``ExitHeadsModule`` defaults, ``--epochs``), certified by
Learn-then-Test at ``--tolerance`` on the first C calibration records with the first P validation records as the Platt
reference, and scored on a **selection set**: the last ``--select`` records of the demo's validation split, never used
by any setting for training, Platt scaling or calibration. The test split is not read.

Every record comes from the label caches of ``train/ablate_heads.py`` (labelled once; this script labels what is
missing). Prints one markdown row per setting: records labelled, the selection set's share of the oracle's savings,
its disagreement with the full model (promised ≤ ``--tolerance``) and accuracy change, mean and range over seeds.

    python benchmarks/fit_sizes.py --seeds 2
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

import ablate_heads as ab  # noqa: E402

from dyvte.exits.rules import certify_thresholds, exit_savings, head_targets, outcome  # noqa: E402
from dyvte.policies.exit_heads import first_exit, head_inputs  # noqa: E402

log = logging.getLogger("fit_sizes")


def subset(columns: dict[str, np.ndarray], rows: slice) -> dict[str, np.ndarray]:
    return {k: v[rows] for k, v in columns.items()}


def score(heads, columns, flops, thresholds) -> dict[str, float]:
    with torch.no_grad():
        exits = first_exit(heads(head_inputs(columns, None)).float(), thresholds).numpy()
    res = outcome(columns, exits)
    return {
        "share": ab.oracle_share(columns, flops, exits),
        "disagreement": float(1 - res["agree"].mean()),
        "delta_pt": 100 * float(res["correct"].mean() - np.asarray(columns["correct"])[:, -1].mean()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", default="3000,6000,12000,24000")
    parser.add_argument("--platt", default="500,1000,2000")
    parser.add_argument("--calib", default="1000,2000,4000,8000")
    parser.add_argument("--select", type=int, default=5000, help="selection records: the validation split's last")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--cache_dir", default="runs/ablate-heads/labels")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ab.quiet_lightning()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    sizes = argparse.Namespace(val_samples=2000, calib_samples=13000, train_samples=24000, model="demo")
    sizes.label_batch_size = 64
    caches = ab.label_caches("demo", Path(args.cache_dir), sizes, names=("train", "val", "calib"))
    calib_all = caches["calib"]  # validation records 2000..14999
    n_calib = len(calib_all["match"])
    select = subset(calib_all, slice(n_calib - args.select, n_calib))
    pool = subset(calib_all, slice(0, n_calib - args.select))  # calibration records come from here
    trains = [int(x) for x in args.train.split(",")]
    platts = [int(x) for x in args.platt.split(",")]
    calibs = [int(x) for x in args.calib.split(",")]
    if max(calibs) > len(pool["match"]):
        raise ValueError(f"--calib: at most {len(pool['match'])} records are left besides the selection set")
    select_flops = ab.relative_flops(select, "demo")
    val_flops = ab.relative_flops(caches["val"], "demo")
    savings = torch.as_tensor(exit_savings(val_flops))
    rows = []
    for t in trains:
        for seed in range(args.seeds):
            began = time.perf_counter()
            heads = ab.train_row(ab.Row(f"{t}", train=t), caches, seed, args.epochs)
            seconds = time.perf_counter() - began
            for p in platts:
                val = subset(caches["val"], slice(0, p))
                reference = (head_inputs(val, None), head_targets(val, "agreement", 0.01))
                for c in calibs:
                    cal = subset(pool, slice(0, c))
                    cert = certify_thresholds(
                        heads, head_inputs(cal, None), cal["match"], args.tolerance, args.delta, reference, savings
                    )
                    thresholds = torch.tensor([math.inf if x is None else x for x in cert.logits])
                    out = score(heads, select, select_flops, thresholds)
                    rows.append({"train": t, "platt": p, "calib": c, "seed": seed, "train_s": seconds, **out})
                    log.info("%s", rows[-1])
    lines = [
        f"Selection set: demo validation records {15000 - args.select}..14999 (never trained, scaled or calibrated "
        f"on); tolerance {args.tolerance:g}, delta {args.delta:g}, {args.epochs} epochs, {args.seeds} seeds "
        "(mean, min–max).",
        "",
        "| train T | Platt P | calib C | records labelled | training s | share of oracle savings | disagreement "
        "(≤ tolerance) | Δ accuracy pt |",
        "|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for t in trains:
        for p in platts:
            for c in calibs:
                group = [r for r in rows if (r["train"], r["platt"], r["calib"]) == (t, p, c)]

                def cell(key: str, fmt: str, scale: float = 1.0, group=group) -> str:
                    v = [scale * r[key] for r in group]
                    return f"{np.mean(v):{fmt}} ({min(v):{fmt}}–{max(v):{fmt}})"

                lines.append(
                    f"| {t:,} | {p:,} | {c:,} | {t + p + c:,} | {np.mean([r['train_s'] for r in group]):.0f} "
                    f"| {cell('share', '.0f', 100)}% | {cell('disagreement', '.4f')} | {cell('delta_pt', '+.2f')} |"
                )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
