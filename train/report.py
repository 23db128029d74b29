"""The comparison report: every method on the demo test split, at matched prefill FLOPs.

    python train/report.py                     # writes runs/report/report.md, accuracy_vs_flops.png, exit_layers.png
    python train/report.py --samples 500       # a quicker, noisier pass (500 records, seeded, stratified by qtype)
    python train/report.py --output_dir docs --overwrite true   # regenerate the committed docs/report.md and PNGs
    python train/report.py --benchmarks pope=pope.parquet mme=mme.parquet   # the paper-style benchmark table
    python train/report.py --benchmarks pope=demo mme=demo --output_dir docs     # docs/benchmarks.md, on the demo

Methods: static K (every K), calibrated K, exit heads (threshold sweep), FasterVLM / FastV (K = 2) / random keeping
50/25/10/5% of the visual tokens, and FasterVLM + exit heads. Accuracy, agreement with the full model, relative
prefill FLOPs (dyvte.prefill_flops, detailed convention), measured prefill time and speedup, KV-cache bytes after the
prefill (dyvte.prefill_kv_bytes), and for each FLOPs target the best accuracy each method reaches at or below it. The
wall clock at LLaVA-7B shapes comes from ``benchmarks/methods.py --output docs/wallclock.md`` (included as is).

The job is :mod:`dyvte.cli.report`; ``dyvte report`` (the console script) and
``python -m dyvte report`` run it too, with the same options.
"""

from dyvte.cli.report import main, run  # noqa: F401  (main: the job, for scripts and tests that load this file)

if __name__ == "__main__":
    import sys

    from dyvte.cli import user_errors

    sys.exit(user_errors(run, None, None, "report.py"))  # a refused input: one error line, status 2
