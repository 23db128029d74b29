"""The shift check's false-alarm and detection rates at n = 200 rows, on the demo label caches (issue 31).

Draws of 200 records from a cache are scored by the committed demo heads offline (the heads' logits on the cached
features, the rows reaching each head at the certified thresholds) and tested with
:func:`dyvte.policies.shift.shift_report` at alpha = 0.01: on the calibration, validation and test caches (no shift:
the rate of ``shifted`` is the false-alarm rate) and on validation records of one question type only, or all but one
(a shift: the rate is the detection rate)::

    python benchmarks/shift_check.py [LABELS_DIR]   # default: runs/ablate-heads/labels
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import torch

from dyvte.demo import demo_checkpoint_dir
from dyvte.policies.exit_heads import ExitHeads, head_inputs
from dyvte.policies.shift import reached, shift_report

log = logging.getLogger("shift_check")
DRAW = 200
CACHES = ("calib-validation-2000-15000", "val-validation-0-2000", "test-test-0-2000")


def scored(heads: ExitHeads, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The heads' logits, the reach mask and the question types of a label cache."""
    import datasets

    columns = datasets.load_from_disk(str(path)).with_format("numpy")[:]
    with torch.no_grad():
        logits = heads(head_inputs(columns, None))
    return logits.numpy(), reached(logits, heads.exit_logits()).numpy(), np.asarray(columns["qtype"])


def rate(heads: ExitHeads, logits: np.ndarray, reach: np.ndarray, pool: np.ndarray, draws: int, seed: int) -> float:
    """Share of ``draws`` draws of ``DRAW`` records from ``pool`` that the check calls shifted."""
    rng = np.random.default_rng(seed)
    ref = heads.config.score_reference
    hits = 0
    for _ in range(draws):
        rows = rng.choice(pool, DRAW, replace=len(pool) < DRAW)
        hits += shift_report([logits[rows, j][reach[rows, j]] for j in range(heads.num_heads)], ref).shifted
    return hits / draws


def main(labels: Path) -> None:
    """Print the rates."""
    heads = ExitHeads.from_pretrained(demo_checkpoint_dir("demo-exit-heads"))
    for name in CACHES:
        logits, reach, qtypes = scored(heads, labels / name)
        print(f"{name}: false alarms at n={DRAW}: {rate(heads, logits, reach, np.arange(len(logits)), 2000, 0):.4f}")
        if name.startswith("val"):
            for qtype in np.unique(qtypes):
                only = rate(heads, logits, reach, np.flatnonzero(qtypes == qtype), 500, 1)
                without = rate(heads, logits, reach, np.flatnonzero(qtypes != qtype), 500, 2)
                print(f"  only {qtype}: detection {only:.3f}; all but {qtype}: detection {without:.3f}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/ablate-heads/labels"))
