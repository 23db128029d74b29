"""Evaluate methods on a dataset: accuracy, agreement with the full model, exit layers, prefill FLOPs, wall clock.

    python train/eval.py                                     # demo test split: full model and every static K
    python train/eval.py --config configs/evaluate_demo.yaml
    python train/eval.py --config configs/evaluate_heads.yaml    # calibrated K and exit heads

Method strings: full, static:K[,K...], static:all, calibrated:DIR, heads:DIR[:P,...], fastervlm:R, random:R,
fastv:K:R (R = fraction of visual tokens pruned), A+B, and every kind registered with a method syntax
(``--plugins '["my_policy.py"]'`` imports files or modules that register exit policies or pruning methods first).
Writes <output_dir>/results.json (every method's metrics), <output_dir>/<method>.json, and
<output_dir>/accuracy_vs_flops.png (default ``runs/eval`` under the working directory, ignored by git; with every
static K also oracle.json), logs where, and prints the tables. Nothing is written under checkpoints/.

The job is :mod:`dyvte.cli.evaluate`; ``dyvte evaluate`` (the console script) and
``python -m dyvte evaluate`` run it too, with the same options.
"""

from dyvte.cli.evaluate import main, run  # noqa: F401  (main: the job, for scripts and tests that load this file)

if __name__ == "__main__":
    run()
