"""Evaluate methods on a dataset: accuracy, agreement with the full model, exit layers, prefill FLOPs, wall clock.

    python train/evaluate.py                                     # demo test split: full model and every static K
    python train/evaluate.py --config configs/evaluate_demo.yaml
    python train/evaluate.py --config configs/evaluate_heads.yaml    # calibrated K and exit heads
    python train/evaluate.py --device cuda --dtype bfloat16      # on a GPU (float16 too; never float16 on CPU)
    python train/evaluate.py --samples 500 --seed 1              # 500 records drawn at random, stratified by qtype
    python train/evaluate.py --benchmark pope --data pope.parquet   # a standard benchmark's file, scored its way
    python train/evaluate.py --benchmark mme --data demo         # the demo's own MME-style set

Method strings: full, static:K[,K...], static:all, calibrated:DIR, heads:DIR[:P,...], fastervlm:R, random:R,
fastv:K:R (R = fraction of visual tokens pruned), A+B, and every kind registered with a method syntax
(``--plugins '["my_policy.py"]'`` imports files or modules that register exit policies or pruning methods first).
The full model is timed first and again after every other method; when the two timings drift apart by more than
10% of their mean, or the 1-minute load average exceeds the usable cores at the start or end, the printed table marks
its timing columns "(unreliable)" and says why (``dyvte.eval.timing.check_timings``).
Writes <output_dir>/results.json (every method's metrics, and under "timing" the two full-model timings' check:
reliable, reasons, drift, loads, cores), <output_dir>/<method>.json, and
<output_dir>/accuracy_vs_flops.png (default ``runs/eval`` under the working directory, ignored by git; with every
static K also oracle.json), logs where, and prints the tables. Nothing is written under checkpoints/.

``--benchmark pope|mme|gqa|textvqa|vqav2|scienceqa|mmbench --data FILE.parquet`` reads the benchmark's HF
``datasets`` parquet layout and adds its published scores per method to the output (:mod:`dyvte.eval.scorers`,
docs/guide.md "Standard benchmarks").

The job is :mod:`dyvte.cli.evaluate`; ``dyvte evaluate`` (the console script) and
``python -m dyvte evaluate`` run it too, with the same options.
"""

from dyvte.cli.evaluate import main, run  # noqa: F401  (main: the job, for scripts and tests that load this file)

if __name__ == "__main__":
    import sys

    from dyvte.cli import user_errors

    sys.exit(user_errors(run, None, None, "evaluate.py"))  # a refused input: one error line, status 2
