"""The default ``--margin`` against a handwriting shift built inside the validation pool (no test record is read).

The demo's test split draws its scenes from digit images that no training or validation scene uses; calibration
records and held-out validation records share one image pool, so a margin chosen on them sees no such shift
(``benchmarks/promise_shift.py``: every margin keeps the promise there, and the test split then breaks the pooled
promise in some seeds, ``benchmarks/writer_shift.py``). This benchmark rebuilds that shift from validation images
alone: the validation pool's digit images are split in two halves (per class, seeded), and new scenes are drawn from
each half with the demo's own scene sampler.

* one half: 2,000 records Platt-scale the heads, 7,000 certify their thresholds (Learn-then-Test at
  ``--tolerance`` / ``--delta``, pooled, with each margin);
* the other half: 9,000 records, digit images the first half never shows, measure the realized disagreement.

Both directions (A -> B and B -> A): a random halving makes one half harder than the other, and only the direction
from the easier half to the harder one shows what a shift can do to the promise. Heads are trained as the shipped ones
(``train/ablate_heads.py``'s ``agreement 24k``). Rule: the smallest margin whose disagreement on the other half stays
within the tolerance in every seed and both directions.

    python benchmarks/margin_shift.py --seeds 5 --output runs/margin-shift/table.md
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

import ablate_heads as ab  # noqa: E402

from dyvte.demo.data import (  # noqa: E402
    QuestionMix,
    SceneConfig,
    dataset_features,
    load_digit_images,
    render_scene,
    sample_record,
    split_digit_pools,
)
from dyvte.exits.rules import certify_thresholds, exit_savings, head_targets, outcome  # noqa: E402
from dyvte.policies.exit_heads import first_exit, head_inputs  # noqa: E402
from dyvte.utils.io import write_text_atomic  # noqa: E402

log = logging.getLogger("margin_shift")

SIZES = {"A": 9000, "B": 9000}
REFERENCE = 2000  # a half's first records: the Platt reference; the rest calibrate


def pool_halves(seed: int = 0, cfg: SceneConfig | None = None) -> dict[str, np.ndarray]:
    """The validation pool's digit images in two disjoint halves, split per class."""
    cfg = cfg or SceneConfig()
    pool = split_digit_pools(seed, cfg.pool_fractions)["validation"]
    _, targets = load_digit_images()
    rng = np.random.default_rng([seed, 2, 1797])
    halves: dict[str, list[int]] = {"A": [], "B": []}
    for cls in range(10):
        members = rng.permutation(pool[targets[pool] == cls])
        cut = len(members) // 2
        halves["A"] += members[:cut].tolist()
        halves["B"] += members[cut:].tolist()
    return {name: np.asarray(sorted(v), dtype=np.int64) for name, v in halves.items()}


def half_records(name: str, pool: np.ndarray, count: int, seed: int = 0, stream: int = 7, start: int = 0):
    """Scenes ``start..count-1`` drawn from ``pool`` alone, with the demo's question mix (a ``datasets.Dataset``);
    ``stream`` tells independent streams of scenes apart (7: the calibration and measuring scenes, 8: heads' training
    scenes, ``benchmarks/heads_data.py``)."""
    import datasets
    from PIL import Image

    cfg = SceneConfig()
    names, p = QuestionMix().normalized()
    rng = np.random.default_rng([seed, stream, ord(name)])
    records = []
    for index in range(count):
        rec = sample_record(rng, pool, cfg, names[int(rng.choice(len(names), p=p))])
        if index >= start:  # earlier scenes are drawn (the stream advances) but not rendered
            rec["image"] = Image.fromarray(render_scene(rec["sources"], cfg))
            records.append(rec)
    return datasets.Dataset.from_list(records, features=dataset_features())


def labelled(path: Path, records, loaded: dict, visual: bool = False) -> dict[str, np.ndarray]:
    """The label cache at ``path`` as numpy columns, labelled first (``records()``: the scenes) unless a complete one
    is there; ``loaded`` keeps the demo model once loaded (``{}`` to start); ``visual``: with the visual tokens'
    pooled states, in ``path`` + ``-visual``."""
    from datasets import load_from_disk

    from dyvte.data.sources import load_model
    from dyvte.exits.labels import build_label_cache

    if visual:
        path = path.with_name(path.name + "-visual")
    if not (path / "done.json").is_file():
        if not loaded:
            loaded["model"], loaded["processor"] = load_model("demo")
        began = time.perf_counter()
        scenes = records()
        log.info("labelling %d scenes into %s", len(scenes), path)
        cache = build_label_cache(
            loaded["model"], loaded["processor"], scenes, batch_size=64, progress=False, visual_inputs=visual
        )
        cache.save_to_disk(str(path))
        write_text_atomic(path / "done.json", json.dumps({"seconds": time.perf_counter() - began}) + "\n")
    return load_from_disk(str(path)).with_format("numpy")[:]


def half_caches(root: Path, visual: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """Label (once) and load the two halves' label caches (``visual``: with the visual tokens' pooled states)."""
    halves, loaded, out = pool_halves(), {}, {}
    for name, count in SIZES.items():

        def records(name: str = name, count: int = count):
            return half_records(name, halves[name], count)

        out[name] = labelled(root / f"valhalf-{name}-0-{count}", records, loaded, visual)
    return out


def direction(source: dict[str, np.ndarray], held: dict[str, np.ndarray], visual: bool = False) -> dict:
    """What heads are certified on (``source``'s scenes after the first :data:`REFERENCE`, which Platt-scale) and
    measured on (``held``), with the FLOPs and savings the certification and the share read (``visual``: for heads
    that read the visual tokens' pooled states too)."""
    ref = {k: v[:REFERENCE] for k, v in source.items()}
    return {
        "cal": {k: v[REFERENCE:] for k, v in source.items()},
        "held": held,
        "flops": ab.relative_flops(held, "demo"),
        "savings": exit_savings(ab.relative_flops(ref, "demo")),
        "reference": (head_inputs(ref, None, visual), head_targets(ref, "agreement")),
    }


def measure(heads: torch.nn.Module, d: dict, margins: list[float], tolerance: float, delta: float) -> list[dict]:
    """Per margin: certify ``heads`` on ``d``'s calibration scenes (Learn-then-Test, pooled), then measure on its held
    scenes: ``margin``, ``calibration_rate``, ``share`` of the oracle's savings and ``disagreement``."""
    rows, visual = [], ab.reads_visual(heads)
    for margin in margins:
        cal = head_inputs(d["cal"], None, visual)
        cert = certify_thresholds(
            heads, cal, d["cal"]["match"], tolerance, delta, d["reference"], d["savings"], margin=margin
        )
        thresholds = torch.tensor([math.inf if x is None else x for x in cert.logits])
        with torch.no_grad():
            exits = first_exit(heads(head_inputs(d["held"], None, visual)).float(), thresholds).numpy()
        rows.append(
            {
                "margin": margin,
                "calibration_rate": int(cert.result.errors) / len(d["cal"]["match"]),
                "share": ab.oracle_share(d["held"], d["flops"], exits),
                "disagreement": float((~outcome(d["held"], exits)["agree"]).mean()),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """Train, certify on half A, score on half B; write and log the table; return the rows."""
    parser = ab.bench_parser(__doc__, 5, "runs/margin-shift/table.md")
    parser.add_argument("--train", type=int, default=24000, help="training records (the first N)")
    parser.add_argument("--margins", default="0,0.1,0.25,0.5")
    args = parser.parse_args(argv)
    caches = ab.bench_caches(args.cache_dir, args.train, ("train", "val"))
    halves = half_caches(Path(args.cache_dir))
    directions = {f"{a} -> {b}": direction(halves[a], halves[b]) for a, b in (("A", "B"), ("B", "A"))}
    margins = [float(m) for m in args.margins.split(",")]
    rows = []
    for seed in range(args.seeds):
        heads = ab.train_row(ab.Row("shipped", train=args.train), caches, seed, args.epochs)
        for name, d in directions.items():
            for row in measure(heads, d, margins, args.tolerance, args.delta):
                rows.append({"seed": seed, "direction": name} | row)
                log.info("%s", rows[-1])
    chosen = next(
        (m for m in margins if all(r["disagreement"] <= args.tolerance for r in rows if r["margin"] == m)), None
    )
    lines = [
        f"The validation pool's digit images in two halves; heads trained on training records 0..{args.train - 1}, "
        f"certified at tolerance {args.tolerance:g}, δ = {args.delta:g} on 7,000 scenes of one half, measured on "
        f"9,000 scenes of the other; {args.seeds} seeds (mean, min–max):",
        "",
        "| direction | margin | disagreement on calibration | share of oracle savings | disagreement "
        "| seeds ≤ tolerance |",
        "|---|---:|---|---|---|---:|",
    ]
    for direction, margin in [(d, m) for d in directions for m in margins]:
        group = [r for r in rows if (r["direction"], r["margin"]) == (direction, margin)]
        cal_rate = [r["calibration_rate"] for r in group]
        share = [100 * r["share"] for r in group]
        dis = [r["disagreement"] for r in group]
        ok = sum(d <= args.tolerance for d in dis)
        lines.append(
            f"| {direction} | {margin:g} | {np.mean(cal_rate):.4f} | {ab.spread(share, '.0f')}% | "
            f"{ab.spread(dis, '.4f')} | {ok}/{len(group)} |"
        )
    lines += ["", f"Chosen (smallest margin within the tolerance in every seed and both directions): {chosen}"]
    ab.write_table(args.output, "\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
