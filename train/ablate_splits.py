"""How many validation records the exit heads' calibration needs: the Platt reference and the Learn-then-Test split.

    python train/ablate_splits.py                                     # the demo -> runs/ablate-splits/demo
    python train/ablate_splits.py --model checkpoints/demo-lora-vtw \
        --cache_dir runs/ablate-heads-lora/labels                     # the withdrawal-adapted demo, merged

Heads are trained exactly as ``train/ablate_heads.py``'s "agreement 24k" row (the committed train records
0..23,999), then Platt-scaled on validation records ``0..R-1`` and certified (savings family, Learn-then-Test,
tolerance 0.01, δ = 0.1) on validation records ``R..C-1`` for each ``R/C-R`` of ``--splits``. Every split is scored
on the same validation records 15,000..19,999, which no split uses: they are drawn from the demo's seeded
validation stream (``dyvte.demo.build_dataset``, prefix-stable: records 0..14,999 are the committed ones) and are
not part of the committed data. The test split is not read: this chooses the default split sizes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))  # ablate_heads, also when imported from elsewhere (the tests)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ablate_heads import ROWS, label_caches, oracle_share, relative_flops, train_row, write_outputs  # noqa: E402

from dyvte.exits.rules import agrees_at, certify_thresholds, exit_savings, head_targets  # noqa: E402
from dyvte.policies.exit_heads import (
    first_exit,  # noqa: E402
    head_inputs,  # noqa: E402
)
from dyvte.train.runs import quiet_lightning, runs_dir  # noqa: E402
from dyvte.utils.io import write_text_atomic  # noqa: E402

log = logging.getLogger("ablate_splits")

#: validation records labelled, in caches named like train/ablate_heads.py's (its 0..499 / 500..4,999 caches reused)
PARTS = (("val", 0, 500), ("calib", 500, 5000), ("valx", 5000, 20000))
SCORED = (15000, 20000)  # validation records every split is scored on


def validation_columns(model: str, root: Path, batch_size: int) -> dict[str, np.ndarray]:
    """Label (once) and load validation records 0..19,999 of the demo's seeded stream."""
    from datasets import load_from_disk

    from dyvte.data.sources import load_model
    from dyvte.demo.data import DatasetSizes, build_dataset
    from dyvte.exits.labels import build_label_cache

    loaded, records, net = [], None, None
    for name, start, stop in PARTS:
        path = root / f"{name}-validation-{start}-{stop}"
        if not (path / "done.json").is_file():
            if net is None:
                net, processor = load_model(model)
                if hasattr(net, "merge_and_unload"):  # a LoRA adapter: label the merged model
                    net = net.merge_and_unload().eval()
                records = build_dataset(0, DatasetSizes(train=0, validation=PARTS[-1][2], test=0))["validation"]
            log.info("labelling validation records %d..%d into %s", start, stop - 1, path)
            began = time.perf_counter()
            cache = build_label_cache(net, processor, records.select(range(start, stop)), batch_size=batch_size)
            cache.save_to_disk(str(path))
            seconds = time.perf_counter() - began
            write_text_atomic(path / "done.json", json.dumps({"seconds": seconds, "samples": stop - start}) + "\n")
        loaded.append(load_from_disk(str(path)).with_format("numpy")[:])
    return {k: np.concatenate([part[k] for part in loaded]) for k in loaded[0] if k != "index"}


def share(columns: dict, flops: np.ndarray, logits: torch.Tensor, thresholds: torch.Tensor) -> tuple[float, float]:
    """(share of the oracle's savings, disagreement) of ``thresholds`` on ``columns``."""
    exits = first_exit(logits, thresholds).numpy()
    return oracle_share(columns, flops, exits), float(1 - agrees_at(columns["match"], exits).mean())


def main(argv: list[str] | None = None) -> dict:
    """Run the split-size ablation; writes ``table.md`` and ``results.json`` and returns the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo", help="'demo' or a demo-shaped model / LoRA adapter directory")
    parser.add_argument("--cache_dir", default=str(runs_dir("ablate-heads") / "labels"), help="label caches")
    parser.add_argument("--output_dir", default=None, help="default: runs/ablate-splits/<model name>")
    parser.add_argument("--splits", default="500/4500,500/14500,2000/13000,4000/11000,2000/8000")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--label_batch_size", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    quiet_lightning()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    out = Path(args.output_dir or runs_dir("ablate-splits") / Path(args.model).name).absolute()
    try:
        splits = [(int(r), int(c)) for r, c in (s.split("/") for s in args.splits.split(","))]
    except ValueError:
        splits = []
    if not splits or any(r < 1 or c < 1 or r + c > SCORED[0] for r, c in splits):
        raise SystemExit(f"--splits: R/C pairs with R, C >= 1 and R + C <= {SCORED[0]} expected, got {args.splits!r}")
    root = Path(args.cache_dir)
    options = argparse.Namespace(**vars(args), val_samples=500, calib_samples=4500, train_samples=24000)
    caches = label_caches("demo", root, options, names=("train", "val"))  # never the test split
    columns = validation_columns(args.model, root, args.label_batch_size)
    flops = relative_flops(columns, args.model)  # (20000, L+1)
    features = head_inputs(columns)
    a, b = SCORED
    scored = {k: v[a:b] for k, v in columns.items()}
    row = next(r for r in ROWS if r.name == "agreement 24k")
    results: dict = {"model": args.model, "tolerance": args.tolerance, "delta": args.delta, "splits": {}}
    for seed in range(args.seeds):
        heads = train_row(row, caches, seed, 40)
        with torch.no_grad():
            logits = heads(features).float()  # (20000, L-1)
        for ref, cal in splits:
            reference = (features[:ref], head_targets({"match": columns["match"][:ref]}, "agreement"))
            chosen = certify_thresholds(
                heads,
                features[ref : ref + cal],
                columns["match"][ref : ref + cal],
                args.tolerance,
                args.delta,
                reference,
                savings=exit_savings(flops[:ref]),
            )
            thresholds = torch.tensor([math.inf if t is None else t for t in chosen.logits])
            got = share(scored, flops[a:b], logits[a:b], thresholds)
            results["splits"].setdefault(f"{ref}/{cal}", []).append(got)
            log.info("seed %d, reference %d / calibration %d: share %.3f, disagreement %.4f", seed, ref, cal, *got)
    lines = [
        f"{args.model}: heads 'agreement 24k', {args.seeds} seeds, tolerance {args.tolerance:g}, delta {args.delta:g};"
        f" scored on validation records {a:,}..{b - 1:,}",
        "",
        "| Platt reference / calibration records | share of the oracle's savings | disagreement |",
        "|---|---|---|",
    ]
    for key, values in results["splits"].items():
        shares, dis = np.array(values).T
        lines.append(
            f"| {key} | {100 * shares.mean():.1f}% ({100 * shares.min():.1f}–{100 * shares.max():.1f}%) | "
            f"{100 * dis.mean():.2f}% |"
        )
    write_outputs(out, "\n".join(lines), results, "split-size table")
    return results


if __name__ == "__main__":
    main()
