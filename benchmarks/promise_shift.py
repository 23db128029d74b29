"""The default ``--margin`` of ``train/fit.py``, chosen on validation data; the writer shift of the test split reported.

Heads are trained as ``benchmarks/fit_sizes.py`` trains them (``train/ablate_heads.py``'s ``train_row``: Lightning,
``ExitHeadsModule`` defaults, the first ``--train`` training records, Platt reference validation records 0..1999).
Their thresholds are certified (Learn-then-Test, ``dyvte.exits.rules.certify_thresholds``, savings family) on
validation records 2000..8999 with each margin (``--margins``) and each grouping (pooled; per ``qtype``, every group
at δ / G) and scored on **held-out validation records 9000..14999**, which no setting calibrates on: the share of the
oracle's prefill savings, the realized disagreement with the full model overall and in the worst question type.
The default margin is chosen from that table only.

Then, reported apart and used for nothing: the same certified heads on the demo's test split, whose handwriting pool
is disjoint from training and validation (the demo's own writer shift): realized disagreement overall and worst
qtype, and in how many seeds each stays within the tolerance.

    python benchmarks/promise_shift.py --seeds 5 --cache_dir runs/ablate-heads/labels
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

log = logging.getLogger("promise_shift")

#: calibration cache rows (validation records 2000..14999): the first CALIB calibrate, the rest are held out
CALIB = 7000


def subset(columns: dict[str, np.ndarray], rows: slice) -> dict[str, np.ndarray]:
    """``columns`` restricted to ``rows``."""
    return {k: v[rows] for k, v in columns.items()}


def score(heads: torch.nn.Module, columns: dict, flops: np.ndarray, thresholds: torch.Tensor) -> dict[str, float]:
    """Share of oracle savings, disagreement overall and in the worst qtype (and which) of ``heads`` at
    ``thresholds`` on ``columns``."""
    with torch.no_grad():
        exits = first_exit(heads(head_inputs(columns, None, ab.reads_visual(heads))).float(), thresholds).numpy()
    wrong = ~outcome(columns, exits)["agree"]
    qtypes = np.asarray(columns["qtype"]).astype(str)
    per_type = {q: float(wrong[qtypes == q].mean()) for q in np.unique(qtypes)}
    worst = max(per_type, key=per_type.get)
    return {
        "share": ab.oracle_share(columns, flops, exits),
        "disagreement": float(wrong.mean()),
        "worst": per_type[worst],
        "worst_qtype": worst,
    }


def cell(values: list[float], fmt: str) -> str:
    """``mean (min–max)``."""
    return f"{np.mean(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def main(argv: list[str] | None = None) -> list[dict]:
    """Train, certify and score; print the two markdown tables; return the rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=12000, help="training records (the first N)")
    parser.add_argument("--margins", default="0,0.1,0.25,0.5")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--cache_dir", default="runs/ablate-heads/labels")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ab.quiet_lightning()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    sizes = argparse.Namespace(val_samples=2000, calib_samples=13000, train_samples=args.train, model="demo")
    sizes.label_batch_size = 64
    caches = ab.label_caches("demo", Path(args.cache_dir), sizes)
    cal = subset(caches["calib"], slice(0, CALIB))  # validation records 2000..8999
    held = subset(caches["calib"], slice(CALIB, None))  # validation records 9000..14999: never calibrated on
    test = caches["test"]
    flops = {"held": ab.relative_flops(held, "demo"), "test": ab.relative_flops(test, "demo")}
    savings = torch.as_tensor(exit_savings(ab.relative_flops(caches["val"], "demo")))
    reference = (head_inputs(caches["val"], None), head_targets(caches["val"], "agreement", 0.01))
    margins = [float(m) for m in args.margins.split(",")]
    rows = []
    for seed in range(args.seeds):
        began = time.perf_counter()
        heads = ab.train_row(ab.Row(f"{args.train}", train=args.train), caches, seed, args.epochs)
        log.info("seed %d trained in %.0f s", seed, time.perf_counter() - began)
        for grouping in ("pooled", "qtype"):
            groups = None if grouping == "pooled" else cal["qtype"]
            for margin in margins:
                cert = certify_thresholds(
                    heads,
                    head_inputs(cal, None),
                    cal["match"],
                    args.tolerance,
                    args.delta,
                    reference,
                    savings,
                    groups=groups,
                    margin=margin,
                )
                thresholds = torch.tensor([math.inf if x is None else x for x in cert.logits])
                row = {"seed": seed, "grouping": grouping, "margin": margin}
                for name, columns in (("held", held), ("test", test)):
                    row |= {f"{name}_{k}": v for k, v in score(heads, columns, flops[name], thresholds).items()}
                rows.append(row)
                log.info("%s", row)
    head = (
        f"{args.seeds} seeds (mean, min–max); heads trained on training records 0..{args.train - 1}, certified at "
        f"tolerance {args.tolerance:g}, δ = {args.delta:g} on validation records 2000..8999 ({CALIB:,})"
    )
    lines = [
        f"Selection (held-out validation records 9000..14999, never calibrated on); {head}:",
        "",
        "| grouping | margin | share of oracle savings | disagreement | worst-qtype disagreement |",
        "|---|---:|---|---|---|",
    ]
    shift = [
        "",
        f"Writer shift (test split, disjoint handwriting; reported, not used for choosing); {head}:",
        "",
        "| grouping | margin | share of oracle savings | disagreement | seeds ≤ tolerance | worst-qtype disagreement "
        "| seeds worst qtype ≤ tolerance |",
        "|---|---:|---|---|---:|---|---:|",
    ]
    for grouping in ("pooled", "qtype"):
        for margin in margins:
            group = [r for r in rows if (r["grouping"], r["margin"]) == (grouping, margin)]

            def col(key: str, scale: float = 1.0, group=group) -> list[float]:
                return [scale * r[key] for r in group]

            lines.append(
                f"| {grouping} | {margin:g} | {cell(col('held_share', 100), '.0f')}% | "
                f"{cell(col('held_disagreement'), '.4f')} | {cell(col('held_worst'), '.4f')} |"
            )
            ok = sum(d <= args.tolerance for d in col("test_disagreement"))
            ok_worst = sum(d <= args.tolerance for d in col("test_worst"))
            shift.append(
                f"| {grouping} | {margin:g} | {cell(col('test_share', 100), '.0f')}% | "
                f"{cell(col('test_disagreement'), '.4f')} | {ok}/{len(group)} | {cell(col('test_worst'), '.4f')} | "
                f"{ok_worst}/{len(group)} |"
            )
    print("\n".join(lines + shift))
    return rows


if __name__ == "__main__":
    main()
