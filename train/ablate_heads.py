"""Ablation of the DyVTE exit heads on the demo: label rule, inputs, width, class balance, training size.

    python train/ablate_heads.py                       # every row, 3 seeds -> runs/ablate-heads/{table.md,results.json}
    python train/ablate_heads.py --rows "agreement,kl η=0.01"   # some rows only (exact row names)
    python train/ablate_heads.py --seeds 1 --train_samples 600 --calib_samples 1000   # a quick look
    python train/ablate_heads.py --model checkpoints/demo-lora-vtw --cache_dir runs/ablate-heads-lora/labels \
        --output_dir runs/ablate-heads-lora --rows "agreement 24k"   # the withdrawal-adapted demo, merged

Data: the committed digit-scenes splits (``checkpoints/demo-data``: train 24,000 / validation 15,000 / test 2,000).
Heads train on the first 3,000 (or 12,000, 24,000) training records, labelled in caches of 12,000, validate on
validation records 0..1999 (also the reference the calibration Platt-scales each head on), and their thresholds are
calibrated (Learn-then-Test, :func:`dyvte.exits.rules.certify_thresholds`) on validation records 2000..14999 at
``--tolerance`` / ``--delta``, exactly as ``train/fit.py`` does. Nothing is chosen on the test split: each row is
then scored once on it.

Scoring is exact and offline: before a row exits no token has left, so the heads read the cached full-model
features and the exit layer, answer and prefill FLOPs at that layer come from the label cache (``dyvte.exits.rules``;
tests/exits/test_rules.py checks this against the engine). Each row: accuracy, agreement with the full model, relative
prefill FLOPs, the share of the oracle's FLOPs savings, and the promised tolerance next to the disagreement
realized on test; mean and spread over ``--seeds`` trainings. The static-K row picks K with the same
Learn-then-Test promise (K walked down from L-1).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dyvte.data.sources import load_config  # noqa: E402
from dyvte.eval.flops import relative_flops_per_exit  # noqa: E402
from dyvte.exits.labels import smallest_safe_layer  # noqa: E402
from dyvte.exits.risk import learn_then_test  # noqa: E402
from dyvte.exits.rules import agrees_at, certify_thresholds, exit_savings, head_targets, outcome  # noqa: E402
from dyvte.policies.exit_heads import (  # noqa: E402
    ExitHeads,
    ExitHeadsConfig,
    first_exit,  # noqa: E402
    head_inputs,
)
from dyvte.train.label_data import HeadTensorData  # noqa: E402
from dyvte.train.module import ExitHeadsModule  # noqa: E402
from dyvte.train.runs import quiet_lightning, runs_dir  # noqa: E402
from dyvte.utils.io import write_text_atomic  # noqa: E402

log = logging.getLogger("ablate_heads")


@dataclass(frozen=True)
class Row:
    """One ablation row: how the heads are trained."""

    name: str
    rule: str = "agreement"
    extra: tuple[str, ...] = ()
    head_size: int | None = None
    balance: bool = True
    train: int = 3000
    eta: float = 0.01
    family: str = "savings"
    layer_change: bool = False
    members: int = 1  # > 1: the average of this many sets of heads trained apart
    visual: bool = False  # heads that also read the visual tokens' pooled states (caches labelled with them)


ROWS = [
    Row("agreement"),
    Row("kl η=0.01", rule="kl", eta=0.01),
    Row("kl η=0.05", rule="kl", eta=0.05),
    Row("dyvte (monotone)", rule="dyvte"),
    Row("dyvte-layer (paper)", rule="dyvte-layer"),
    Row("agreement + lens", extra=("lens",)),
    Row("agreement + attn", extra=("attn",)),
    Row("agreement h=4 (0.1 default)", head_size=4),
    Row("agreement h=64", head_size=64),
    Row("agreement h=256", head_size=256),
    Row("agreement unbalanced", balance=False),
    Row("agreement 12k", train=12000),
    Row("agreement 24k", train=24000),
    Row("agreement 24k platt (one level)", train=24000, family="platt"),
]

#: training records are labelled in caches of this many (a larger row reuses the smaller rows' caches)
TRAIN_CHUNK = 12000
#: ``valtrain``: heads' training records from the validation handwriting pool, after the 15,000 records that scale and
#: calibrate (validation records 15000.. of the same deterministic stream), labelled in caches of this many
VALTRAIN_START, VALTRAIN_CHUNK = 15000, 24000


@dataclass
class Scope:
    """What a row is scored against: the test and calibration caches, their per-K FLOPs and oracles."""

    test: dict
    flops: np.ndarray  # (N, L+1) test
    oracle: float
    full_accuracy: float
    calib: dict
    calib_flops: np.ndarray  # (N_c, L+1)
    delta: float
    savings: torch.Tensor  # (L-1,) what an exit at K = j + 1 saves, on the validation records


def score(heads: torch.nn.Module, row: Row, caches: dict, scope: Scope, tolerance: float) -> dict:
    """Calibrate ``heads`` at ``tolerance`` and score them on the calibration split and on test."""
    extra, visual = list(row.extra) or None, row.visual
    reference = (head_inputs(caches["val"], extra, visual), head_targets(caches["val"], row.rule, row.eta))
    calib = scope.calib
    savings = scope.savings if row.family == "savings" else None
    cal = certify_thresholds(
        heads, head_inputs(calib, extra, visual), calib["match"], tolerance, scope.delta, reference, savings=savings
    )
    thresholds = torch.tensor([math.inf if t is None else t for t in cal.logits])  # (L-1,) logit thresholds
    out = {"tolerance": tolerance, "calib_errors": cal.result.errors, "level": cal.result.parameter}
    for name, columns, flops in (("", scope.test, scope.flops), ("calib_", calib, scope.calib_flops)):
        with torch.no_grad():
            logits = heads(head_inputs(columns, extra, visual)).float()
        exits = first_exit(logits, thresholds).numpy()
        res = outcome(columns, exits)
        out[f"{name}accuracy"] = float(res["correct"].mean())
        out[f"{name}full_accuracy"] = float(np.asarray(columns["correct"])[:, -1].mean())
        out[f"{name}agreement"] = float(res["agree"].mean())
        out[f"{name}flops"] = float(flops[np.arange(len(exits)), exits].mean())
        out[f"{name}share"] = oracle_share(columns, flops, exits)
    log.info("%s at tolerance %g: %s", row.name, tolerance, out)
    return out


def table_row(
    name: str, scored: list[dict], full_accuracy: float, tolerance: float, calib_cell: str | None = None
) -> str:
    """One Markdown row: mean (min–max) over seeds of the test figures."""

    def cell(key: str, fmt: str) -> str:
        values = [s[key] for s in scored]
        return f"{np.mean(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"

    accuracy = np.mean([s["accuracy"] for s in scored])
    disagreement = 1 - np.mean([s["agreement"] for s in scored])
    shares = [s["share"] for s in scored]
    cells = [name] + ([calib_cell] if calib_cell is not None else [])
    cells += [
        f"{cell('accuracy', '.3f')} ({100 * (accuracy - full_accuracy):+.2f})",
        cell("agreement", ".3f"),
        f"{disagreement:.4f} (≤ {tolerance:g})",
        cell("flops", ".3f"),
        f"{np.mean(shares):.0%} ({min(shares):.0%}–{max(shares):.0%})",
    ]
    return "| " + " | ".join(cells) + " |"


def label_caches(
    data: str,
    root: Path,
    args: argparse.Namespace,
    names: tuple[str, ...] = ("train", "val", "calib", "test"),
    visual: bool = False,
) -> dict[str, dict[str, np.ndarray]]:
    """Label (once) and load the train / val / calib / test caches (those in ``names``); ``visual``: caches that
    also keep the visual tokens' pooled states (folders ending in ``-visual``)."""
    from datasets import load_from_disk

    from dyvte.data.sources import load_model
    from dyvte.exits.labels import build_label_cache

    val_end = args.val_samples + args.calib_samples
    train_stop = max(r.train for r in ROWS) if args.train_samples is None else args.train_samples
    chunks = [(a, min(a + TRAIN_CHUNK, train_stop)) for a in range(0, train_stop, TRAIN_CHUNK)]  # labelled apart
    valtrain = [
        (VALTRAIN_START + a, VALTRAIN_START + min(a + VALTRAIN_CHUNK, train_stop))
        for a in range(0, train_stop, VALTRAIN_CHUNK)
    ]
    parts = (
        [("train", "train", a, b) for a, b in chunks]
        + [("valtrain", "validation", a, b) for a, b in valtrain]
        + [
            ("val", "validation", 0, args.val_samples),
            ("calib", "validation", args.val_samples, val_end),
            ("test", "test", 0, 2000),
        ]
    )
    parts = [part for part in parts if part[0] in names]
    model = processor = None
    loaded: dict[str, list[dict[str, np.ndarray]]] = {}
    for name, split, start, stop in parts:
        path = root / f"{name}-{split}-{start}-{stop}{'-visual' if visual else ''}"
        if not (path / "done.json").is_file():
            if model is None:
                model, processor = load_model(args.model)
                if hasattr(model, "merge_and_unload"):  # a LoRA adapter (demo-lora-vtw): label the merged model
                    model = model.merge_and_unload().eval()
            records = split_records(data, split, start, stop)
            log.info("labelling %d %s records (%s %d..%d) into %s", stop - start, name, split, start, stop - 1, path)
            began = time.perf_counter()
            cache = build_label_cache(
                model, processor, records, batch_size=args.label_batch_size, progress=False, visual_inputs=visual
            )
            cache.save_to_disk(str(path))
            seconds = time.perf_counter() - began
            write_text_atomic(path / "done.json", json.dumps({"seconds": seconds, "samples": stop - start}) + "\n")
        loaded.setdefault(name, []).append(load_from_disk(str(path)).with_format("numpy")[:])
    return {name: {k: np.concatenate([c[k] for c in cs]) for k in cs[0]} for name, cs in loaded.items()}


def split_records(data: str, split: str, start: int, stop: int):
    """Records ``start..stop-1`` of ``split``; on the demo, records past the committed split come from the same
    deterministic stream (:func:`dyvte.demo.data.build_records`, prefix-stable with ``checkpoints/demo-data``)."""
    from dyvte.data.sources import load_records

    if data == "demo":
        from dyvte.demo import load_demo_dataset
        from dyvte.demo.data import build_records

        if stop > len(load_demo_dataset(split)):
            return build_records(split, start, stop)
    return load_records(data, split, stop).select(range(start, stop))


def bench_parser(doc: str, seeds: int, output: str) -> argparse.ArgumentParser:
    """The options the heads benchmarks (``benchmarks/heads_savings.py``, ``writer_shift.py``, ``margin_shift.py``)
    share: seeds, epochs, the promise, the label caches and the table's path."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=seeds)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--cache_dir", default=str(runs_dir("ablate-heads") / "labels"), help="label caches")
    parser.add_argument("--output", default=output, help="the Markdown table")
    return parser


def bench_caches(
    cache_dir: str, train: int, names: tuple[str, ...], visual: bool = False
) -> dict[str, dict[str, np.ndarray]]:
    """Logging as the benchmarks print it, then the demo's label caches ``names`` (the first ``train`` training
    records; validation 0..1999 and 2000..14999, test 0..1999), labelled once (``visual``: with the visual tokens'
    pooled states)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    quiet_lightning()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    sizes = argparse.Namespace(val_samples=2000, calib_samples=13000, train_samples=train, model="demo")
    sizes.label_batch_size = 64
    return label_caches("demo", Path(cache_dir), sizes, names=names, visual=visual)


def spread(values: list[float], fmt: str) -> str:
    """``mean (min–max)`` of ``values``."""
    return f"{np.mean(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def write_table(path: str | Path, table: str) -> None:
    """Write the Markdown ``table`` to ``path`` and log both."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, table + "\n")
    log.info("wrote %s\n%s", out, table)


def relative_flops(columns: dict[str, np.ndarray], model: str) -> np.ndarray:
    """``(N, L+1)`` each sample's prefill FLOPs at exit layer K = 0..L relative to the full model."""
    return relative_flops_per_exit(load_config(model), columns["tokens"], columns["visual"]).numpy()


def oracle_share(columns: dict[str, np.ndarray], flops: np.ndarray, exits: np.ndarray) -> float:
    """The share of the per-sample oracle's prefill-FLOPs savings that exiting at ``exits`` ``(N,)`` recovers
    (``flops``: ``(N, L+1)`` from :func:`relative_flops`)."""
    rows = np.arange(len(exits))
    oracle = flops[rows, oracle_layers(columns)].mean()
    return float((1 - flops[rows, exits].mean()) / (1 - oracle))


def write_outputs(out: Path, table: str, results: dict, what: str) -> None:
    """Write ``table.md`` and ``results.json`` under ``out`` and log the table."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "table.md", table + "\n")
    write_text_atomic(out / "results.json", json.dumps(results, indent=1) + "\n")
    log.info("%s (also in %s):\n%s", what, out / "table.md", table)


def reads_visual(heads: torch.nn.Module) -> bool:
    """Whether ``heads`` read the visual tokens' pooled states besides the text features (their config says)."""
    return bool(getattr(getattr(heads, "config", None), "visual_inputs", False))


def oracle_layers(columns: dict[str, np.ndarray]) -> np.ndarray:
    """Each sample's smallest K with the full model's answer at K and every later exit layer (L if none)."""
    return smallest_safe_layer(torch.as_tensor(np.asarray(columns["match"], dtype=bool))).numpy()


def train_row(row: Row, caches: dict, seed: int, epochs: int) -> torch.nn.Module:
    """Train one row's heads with Lightning (the module ``train/fit.py`` uses) on cached tensors; with
    ``row.members`` M > 1, M sets trained apart (seeds ``seed * M .. seed * M + M - 1``: each its own initialisation
    and batch order) and folded into their average (:meth:`ExitHeads.average`)."""
    extra, visual = list(row.extra) or None, row.visual
    train = caches["train"]
    n = min(row.train, len(train["match"]))
    sub = {k: v[:n] for k, v in train.items()}
    tensors = {
        "train": (head_inputs(sub, extra, visual), head_targets(sub, row.rule, row.eta)),
        "val": (head_inputs(caches["val"], extra, visual), head_targets(caches["val"], row.rule, row.eta)),
    }
    num_layers, hidden = sub["match"].shape[1], sub["features"].shape[-1] // 2
    config = ExitHeadsConfig("llava", hidden, num_layers, extra_inputs=extra, label_rule=row.rule, visual_inputs=visual)
    sets = []
    for member_seed in range(seed * row.members, (seed + 1) * row.members):
        L.seed_everything(member_seed, verbose=False)
        data = HeadTensorData(tensors["train"], tensors["val"], config)
        module = ExitHeadsModule(head_size=row.head_size, balance=row.balance, layer_change=row.layer_change)
        trainer = L.Trainer(
            accelerator="cpu",
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, datamodule=data)
        sets.append(module.heads.eval())
    return sets[0] if len(sets) == 1 else ExitHeads.average(sets)


def main(argv: list[str] | None = None) -> dict:
    """Run the ablation and write ``table.md`` and ``results.json``; returns the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="demo", help="'demo' (the committed digit-scenes splits) or a directory")
    parser.add_argument("--model", default="demo", help="'demo' or a demo-shaped model / LoRA adapter directory")
    parser.add_argument("--output_dir", default=str(runs_dir("ablate-heads")))
    parser.add_argument("--cache_dir", default=str(runs_dir("ablate-heads") / "labels"), help="label caches")
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: every row)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--tolerance", type=float, default=0.005, help="the promise every row is certified at")
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--val_samples", type=int, default=2000)
    parser.add_argument("--calib_samples", type=int, default=13000)
    parser.add_argument(
        "--train_samples", type=int, default=None, help="records labelled for training (default: 12000)"
    )
    parser.add_argument("--label_batch_size", type=int, default=64)
    parser.add_argument("--sweep", default="0.005,0.01,0.015,0.02,0.03", help="tolerances swept for --sweep_row")
    parser.add_argument("--sweep_row", default="agreement 24k")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    quiet_lightning()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    out = Path(args.output_dir).absolute()
    data = args.data
    caches = label_caches(data, Path(args.cache_dir), args)
    test, calib = caches["test"], caches["calib"]
    num_layers = test["match"].shape[1]
    flops = relative_flops(test, args.model)  # (N, L+1)
    rows_idx = np.arange(len(flops))
    full_accuracy = float(test["correct"][:, num_layers].mean())
    oracle = float(flops[rows_idx, oracle_layers(test)].mean())
    oracle_accuracy = float(test["correct"][rows_idx, oracle_layers(test)].mean())
    results: dict = {"full_accuracy": full_accuracy, "oracle_flops": oracle, "tolerance": args.tolerance}
    results["delta"] = args.delta
    lines = [
        f"Demo test split (2,000 records); thresholds certified on {len(calib['match'])} held-out calibration "
        f"records at tolerance {args.tolerance:g} (at most {100 * args.tolerance:g}% of answers differ from the full "
        f"model's, except with probability {args.delta:g}); mean (min–max) over {args.seeds} training seeds.",
        "",
        "| row | accuracy (Δ pt) | agreement | disagreement (promised ≤) | rel. prefill FLOPs | "
        "share of oracle savings |",
        "|---|---|---|---|---|---|",
        f"| full model | {full_accuracy:.3f} | 1.000 | 0 | 1.000 | 0% |",
        f"| oracle (per-sample smallest safe K, test) | {oracle_accuracy:.3f} | 1.000 | 0 | {oracle:.3f} | 100% |",
    ]
    # static K, with the same promise: K walked down from L-1 while the disagreement is certified
    ks = list(range(num_layers - 1, -1, -1))
    static = learn_then_test(
        lambda k: (int((~agrees_at(calib["match"], np.full(len(calib["match"]), int(k)))).sum()), 1.0),
        len(calib["match"]),
        args.tolerance,
        args.delta,
        ks,
    )
    k = num_layers if static.parameter is None else int(static.parameter)
    res = outcome(test, torch.full((len(flops),), k))
    static_flops = float(flops[:, k].mean())
    results["static"] = {"K": k, "accuracy": float(res["correct"].mean()), "agreement": float(res["agree"].mean())}
    results["static"]["flops"] = static_flops
    lines.append(
        f"| static K={k} (certified the same way) | {res['correct'].mean():.3f} "
        f"({100 * (res['correct'].mean() - full_accuracy):+.2f}) | {res['agree'].mean():.3f} | "
        f"{1 - res['agree'].mean():.4f} (≤ {args.tolerance:g}) | {static_flops:.3f} | "
        f"{(1 - static_flops) / (1 - oracle):.0%} |"
    )
    wanted = None if args.rows is None else [name.strip() for name in args.rows.split(",")]
    unknown = sorted(set(wanted or []) - {r.name for r in ROWS})
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; rows: {[r.name for r in ROWS]}")
    calib_flops = relative_flops(calib, args.model)
    savings = exit_savings(relative_flops(caches["val"], args.model))
    scope = Scope(test, flops, oracle, full_accuracy, calib, calib_flops, args.delta, savings)
    for row in [r for r in ROWS if wanted is None or r.name in wanted]:
        scored = [
            score(train_row(row, caches, seed, args.epochs), row, caches, scope, args.tolerance)
            for seed in range(args.seeds)
        ]
        results[row.name] = {"row": vars(row) | {"extra": list(row.extra)}, "seeds": scored}
        lines.append(table_row(row.name, scored, full_accuracy, args.tolerance))
    sweep_lines = []
    if args.sweep:
        row = next(r for r in ROWS if r.name == args.sweep_row)
        heads = [train_row(row, caches, seed, args.epochs) for seed in range(args.seeds)]
        sweep_lines = [
            "",
            f"Tolerance sweep of '{row.name}' (the promise; the default tolerance is chosen on the calibration "
            "split: the largest whose certified thresholds keep the calibration accuracy within 0.5 pt):",
            "",
            "| tolerance | calibration: Δ accuracy, share | test accuracy (Δ pt) | agreement | "
            "disagreement (promised ≤) | rel. prefill FLOPs | share of oracle savings |",
            "|---|---|---|---|---|---|---|",
        ]
        results["sweep"] = {}
        for tolerance in [float(t) for t in args.sweep.split(",")]:
            scored = [score(h, row, caches, scope, tolerance) for h in heads]
            results["sweep"][str(tolerance)] = scored
            calib_cell = (
                f"{100 * np.mean([s['calib_accuracy'] - s['calib_full_accuracy'] for s in scored]):+.2f} pt, "
                f"{np.mean([s['calib_share'] for s in scored]):.0%}"
            )
            sweep_lines.append(table_row(f"{tolerance:g}", scored, full_accuracy, tolerance, calib_cell))
    lines += sweep_lines
    write_outputs(out, "\n".join(lines), results, "ablation table")
    return results


if __name__ == "__main__":
    main()
