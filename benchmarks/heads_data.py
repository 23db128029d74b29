"""Which handwriting should the exit heads learn from? Chosen on validation images alone (no test record is read).

The demo model trained on scenes of the training handwriting pool, so on the stored train split its answers are
surer than on handwriting it never saw: heads that learn there learn an optimistic picture of when the image is no
longer needed. A user's heads learn from the user's records, which the model has usually never seen. This benchmark
compares the two on the validation pool's two halves (``benchmarks/margin_shift.py``'s split of the validation
handwriting): heads learn either from ``--train`` training records (the stored train split) or from ``--train``
scenes of one half (a scene stream of their own, apart from the calibration scenes); each is Platt-scaled on 2,000 and
certified (Learn-then-Test at ``--tolerance`` / ``--delta``, each margin) on 7,000 scenes of that half, and measured
on 9,000 scenes of the other half, handwriting neither learning nor calibration saw. Both directions; mean (min–max)
over seeds. ``--layer_change`` adds rows with heads that also read their features' change since the previous layer;
``--members 3``: every row's heads are the average of three sets trained apart (``ExitHeads.average``);
``--visual_inputs``: heads that also read the visual tokens' pooled states (label caches of their own, ``*-visual``).

    python benchmarks/heads_data.py --seeds 2 --output runs/heads-data/table.md
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ablate_heads as ab  # noqa: E402
import margin_shift as ms  # noqa: E402

log = logging.getLogger("heads_data")

#: the heads' training scenes of each half: a stream apart from the calibration and measuring scenes
TRAIN_STREAM = 8
#: training scenes are labelled in caches of this many
CHUNK = 24000


def half_training_caches(root: Path, count: int, visual: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """Label (once, in chunks of :data:`CHUNK`) and load ``count`` training scenes of each validation half
    (``visual``: with the visual tokens' pooled states)."""
    halves, loaded, out = ms.pool_halves(), {}, {}
    for name in ("A", "B"):
        parts = []
        for start in range(0, count, CHUNK):
            stop = min(start + CHUNK, count)

            def records(name: str = name, start: int = start, stop: int = stop):
                return ms.half_records(name, halves[name], stop, stream=TRAIN_STREAM, start=start)

            parts.append(ms.labelled(root / f"valhalftrain-{name}-{start}-{stop}", records, loaded, visual))
        out[name] = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    """Train on each source, certify on one half, measure on the other; write and log the table; return the rows."""
    parser = ab.bench_parser(__doc__, 2, "runs/heads-data/table.md")
    parser.add_argument("--train", type=int, default=24000, help="training records or scenes per row")
    parser.add_argument("--margins", default="0,0.1")
    parser.add_argument("--layer_change", action="store_true", help="also rows with layer-change heads")
    parser.add_argument(
        "--members", type=int, default=1, help="every row's heads: the average of this many sets trained apart"
    )
    parser.add_argument(
        "--visual_inputs", action="store_true", help="heads that also read the visual tokens' pooled states"
    )
    parser.add_argument(
        "--sources",
        default="train,half",
        help="which rows: train (training handwriting), half (validation half), mix (half of the records from each)",
    )
    args = parser.parse_args(argv)
    visual = args.visual_inputs
    needs_train = bool({"train", "mix"} & set(args.sources.split(",")))
    caches = ab.bench_caches(args.cache_dir, args.train, ("train", "val") if needs_train else ("val",), visual)
    root = Path(args.cache_dir)
    halves = ms.half_caches(root, visual)
    own = half_training_caches(root, args.train, visual) if {"half", "mix"} & set(args.sources.split(",")) else {}
    margins = [float(m) for m in args.margins.split(",")]
    variants = [False, True] if args.layer_change else [False]
    rows = []
    for source, target in (("A", "B"), ("B", "A")):
        d = ms.direction(halves[source], halves[target], visual)
        names = {"train": "training handwriting", "half": "validation half", "mix": "both (half each)"}
        sources = [names[k] for k in args.sources.split(",")]
        for data, change in [(d_, c) for d_ in sources for c in variants]:
            train = {"training handwriting": caches.get("train"), "validation half": own.get(source)}.get(data)
            if train is None:  # both: the first half of the records from each, interleaved
                half = args.train // 2
                train = {
                    k: np.stack([caches["train"][k][:half], own[source][k][:half]], axis=1).reshape(
                        2 * half, *caches["train"][k].shape[1:]
                    )
                    for k in caches["train"]
                }
            for seed in range(args.seeds):
                row = ab.Row("heads", train=args.train, layer_change=change, members=args.members, visual=visual)
                heads = ab.train_row(row, {"train": train, "val": caches["val"]}, seed, args.epochs)
                for measured in ms.measure(heads, d, margins, args.tolerance, args.delta):
                    rows.append(
                        {"direction": f"{source} -> {target}", "data": data, "layer_change": change, "seed": seed}
                        | measured
                    )
                    log.info("%s", rows[-1])
    lines = [
        f"The validation pool's digit images in two halves; heads learn from {args.train:,} records of the named "
        f"handwriting{'' if args.members == 1 else f' (each the average of {args.members} sets of heads)'}"
        f"{', reading the visual tokens too' if visual else ''}, "
        f"are certified at tolerance {args.tolerance:g}, δ = {args.delta:g} on 7,000 scenes of one half "
        f"and measured on 9,000 scenes of the other; {args.seeds} seeds, mean (min–max):",
        "",
        "| direction | heads learn from | layer change | margin | share of oracle savings | disagreement "
        "| seeds ≤ tolerance |",
        "|---|---|---|---:|---|---|---:|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["direction"], r["data"], r["layer_change"], r["margin"]), []).append(r)
    for (direction, data, change, margin), group in sorted(groups.items(), key=lambda item: item[0]):
        dis = [r["disagreement"] for r in group]
        lines.append(
            f"| {direction} | {data} | {'yes' if change else 'no'} | {margin:g} | "
            f"{ab.spread([100 * r['share'] for r in group], '.1f')}% | {ab.spread(dis, '.4f')} | "
            f"{sum(d <= args.tolerance for d in dis)}/{len(group)} |"
        )
    ab.write_table(args.output, "\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
