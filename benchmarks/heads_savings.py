"""Toward 75% of the oracle's savings: the exit heads' candidates, ranked on validation records only.

Every row trains heads as ``train/ablate_heads.py`` does (Lightning, ``ExitHeadsModule`` defaults, 40 epochs, the
first ``train`` training records; past the committed 24,000 the records come from the same deterministic training
stream), Platt-scales them on validation records 0..1999, certifies their thresholds by Learn-then-Test at
``--tolerance`` / ``--delta`` on validation records 2000..8999 and scores them on **held-out validation records
9000..14999**, which no row trains, scales or calibrates on. The test split is not read.

Rows (one change each against the first):

* ``agreement 24k``: the committed recipe (head j learns "the answer equals the full model's at K = j + 1 and every
  later K"; the savings family: P(unsafe) <= μ · savings_j / max savings);
* ``agreement-layer``: head j learns ``match[K]`` only, exactly the risk of a first exit at K;
* ``kl η``: soft-risk targets (the answer-position KL at K below η);
* ``+ attn`` / ``+ lens``: the final prompt token's attention mass on the visual tokens / the logit lens's top-1
  probability and entropy as extra inputs;
* ``family flat`` / ``family savings^0.5``: the same heads, other threshold families (one level for every head; risk
  in proportion to the square root of the savings);
* ``per-qtype Platt``: the same heads, Platt-scaled per question type (needs each request's question type at run
  time, which ``withdraw`` does not have: offline only);
* ``monotone (geometric mean of heads k-1, k)``: an exit needs the evidence of two consecutive heads;
* ``36k`` / ``48k`` / ``96k``: more training records (labelled once into the caches, ≈ 110 records per second).

    python benchmarks/heads_savings.py --seeds 2 --output runs/heads-savings/table.md
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

import ablate_heads as ab  # noqa: E402

from dyvte.exits.risk import default_grid, learn_then_test  # noqa: E402
from dyvte.exits.rules import exit_savings, head_targets, platt_scaling  # noqa: E402
from dyvte.policies.exit_heads import head_inputs  # noqa: E402

log = logging.getLogger("heads_savings")

#: calibration cache rows (validation records 2000..14999): the first CALIB calibrate, the rest are held out
CALIB = 7000


@dataclass(frozen=True)
class Candidate:
    """One row: how the heads are trained (``train``) and how their thresholds are formed (``family``, ``platt``,
    ``smooth``)."""

    name: str
    train: ab.Row
    family: str = "savings"  # "savings" | "savings^0.5" | "flat"
    platt: str = "global"  # "global" | "qtype"
    smooth: bool = False


def _row(name: str, **kw) -> ab.Row:
    return ab.Row(name, **({"train": 24000} | kw))


BASE = _row("agreement 24k")
CANDIDATES = [
    Candidate("agreement 24k (committed recipe)", BASE),
    Candidate("agreement-layer", _row("agreement-layer", rule="agreement-layer")),
    Candidate("kl η=0.01", _row("kl 0.01", rule="kl", eta=0.01)),
    Candidate("kl η=0.003", _row("kl 0.003", rule="kl", eta=0.003)),
    Candidate("+ attn", _row("attn", extra=("attn",))),
    Candidate("+ lens", _row("lens", extra=("lens",))),
    Candidate("family flat", BASE, family="flat"),
    Candidate("family savings^0.5", BASE, family="savings^0.5"),
    Candidate("per-qtype Platt (offline only)", BASE, platt="qtype"),
    Candidate("monotone (geometric mean of heads k-1, k)", BASE, smooth=True),
    Candidate("36k training records", _row("36k", train=36000)),
    Candidate("48k training records", _row("48k", train=48000)),
    Candidate("96k training records", _row("96k", train=96000)),
]


def subset(columns: dict[str, np.ndarray], rows: slice) -> dict[str, np.ndarray]:
    """``columns`` restricted to ``rows``."""
    return {k: v[rows] for k, v in columns.items()}


def safe_probability(
    logits: np.ndarray, qtypes: np.ndarray, reference: tuple[torch.Tensor, torch.Tensor, np.ndarray], per_qtype: bool
) -> np.ndarray:
    """``(N, L-1)`` Platt-scaled P(safe) of each head, scaled on ``reference`` ``(logits, targets, qtypes)``, once or
    per question type."""
    ref_logits, ref_targets, ref_qtypes = reference
    out = np.zeros(logits.shape)
    groups = np.unique(ref_qtypes) if per_qtype else [None]
    for group in groups:
        ref = slice(None) if group is None else ref_qtypes == group
        rows = slice(None) if group is None else qtypes == group
        a, b = platt_scaling(ref_logits[ref], ref_targets[ref])
        out[rows] = torch.sigmoid(a * torch.as_tensor(logits[rows], dtype=torch.float64) + b).numpy()
    return out


def exits_at(probability: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """``(N,)`` first K = j + 1 whose head's P(unsafe) is at most ``levels[j]`` (L when none)."""
    fire = (1.0 - probability) <= levels[None]
    return np.where(fire.any(1), fire.argmax(1) + 1, probability.shape[1] + 1)


def disagree(match: np.ndarray, exits: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: the answer at the exit layer differs from the full model's."""
    num_layers = match.shape[1]
    rows = np.arange(len(exits))
    return ~(match[rows, np.minimum(exits, num_layers - 1)] | (exits == num_layers))


def families(savings: np.ndarray) -> dict[str, Callable[[float], np.ndarray]]:
    """Threshold families: μ -> per-head P(unsafe) levels."""
    share = savings / savings.max()
    return {
        "savings": lambda mu: mu * share,
        "savings^0.5": lambda mu: mu * np.sqrt(share),
        "flat": lambda mu: np.full(len(share), mu),
    }


def evaluate(candidate: Candidate, heads: torch.nn.Module, data: dict, args: argparse.Namespace) -> dict:
    """Certify on the calibration rows and score on the held-out rows."""
    extra = list(candidate.train.extra) or None
    with torch.no_grad():
        logits = {name: heads(head_inputs(data[name], extra)).float().numpy() for name in ("val", "cal", "held")}
    reference = (
        torch.as_tensor(logits["val"], dtype=torch.float64),
        head_targets(data["val"], candidate.train.rule, candidate.train.eta).double(),
        np.asarray(data["val"]["qtype"]).astype(str),
    )
    prob = {
        name: safe_probability(
            logits[name], np.asarray(data[name]["qtype"]).astype(str), reference, candidate.platt == "qtype"
        )
        for name in ("cal", "held")
    }
    if candidate.smooth:
        for name, p in prob.items():
            q = p.copy()
            q[:, 1:] = np.sqrt(p[:, 1:] * p[:, :-1])
            prob[name] = q
    levels = families(data["savings"])[candidate.family]
    match = np.asarray(data["cal"]["match"], dtype=bool)
    result = learn_then_test(
        lambda mu: (int(disagree(match, exits_at(prob["cal"], levels(mu))).sum()), 0.0),
        len(match),
        args.tolerance,
        args.delta,
        1.0 - default_grid(),
    )
    mu = result.parameter
    exits = exits_at(prob["held"], levels(0.0 if mu is None else mu))
    wrong = disagree(np.asarray(data["held"]["match"], dtype=bool), exits)
    qtypes = np.asarray(data["held"]["qtype"]).astype(str)
    return {
        "mu": mu,
        "share": ab.oracle_share(data["held"], data["held_flops"], exits),
        "disagreement": float(wrong.mean()),
        "worst": max(float(wrong[qtypes == q].mean()) for q in np.unique(qtypes)),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    """Train, certify and score every candidate; log and write the Markdown table; return the rows."""
    parser = ab.bench_parser(__doc__, 2, "runs/heads-savings/table.md")
    parser.add_argument("--rows", default=None, help="comma-separated row-name prefixes (default: every row)")
    args = parser.parse_args(argv)
    wanted = [c for c in CANDIDATES if args.rows is None or any(c.name.startswith(p) for p in args.rows.split(","))]
    train_samples = max(c.train.train for c in wanted)
    caches = ab.bench_caches(args.cache_dir, train_samples, ("train", "val", "calib"))
    data = {
        "train": caches["train"],
        "val": caches["val"],
        "cal": subset(caches["calib"], slice(0, CALIB)),  # validation records 2000..8999
        "held": subset(caches["calib"], slice(CALIB, None)),  # validation records 9000..14999
    }
    data["held_flops"] = ab.relative_flops(data["held"], "demo")
    data["savings"] = exit_savings(ab.relative_flops(caches["val"], "demo")).numpy()
    trained: dict[tuple[ab.Row, int], torch.nn.Module] = {}
    rows = []
    for candidate in wanted:
        scored = []
        for seed in range(args.seeds):
            key = (candidate.train, seed)
            if key not in trained:
                began = time.perf_counter()
                trained[key] = ab.train_row(candidate.train, data, seed, args.epochs)
                log.info("%s seed %d trained in %.0f s", candidate.train.name, seed, time.perf_counter() - began)
            scored.append(evaluate(candidate, trained[key], data, args))
            log.info("%s seed %d: %s", candidate.name, seed, scored[-1])
        rows.append({"name": candidate.name, "seeds": scored})
    lines = [
        f"Held-out validation records 9000..14999 (6,000; never trained, scaled or calibrated on); thresholds "
        f"certified at tolerance {args.tolerance:g}, δ = {args.delta:g} on validation records 2000..8999 ({CALIB:,}); "
        f"mean (min–max) over {args.seeds} training seeds.",
        "",
        "| candidate | share of oracle savings | disagreement | worst-qtype disagreement |",
        "|---|---|---|---|",
    ]
    for row in rows:
        s = row["seeds"]
        lines.append(
            f"| {row['name']} | {ab.spread([100 * x['share'] for x in s], '.1f')}% | "
            f"{ab.spread([x['disagreement'] for x in s], '.4f')} | {ab.spread([x['worst'] for x in s], '.4f')} |"
        )
    ab.write_table(args.output, "\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
