"""VTW calibration: the per-layer KL curve of a model on a few samples, and the static exit layer it chooses.

    python train/calibrate.py                                   # demo model, 100 validation samples, eta 3e-3
    python train/calibrate.py --config configs/calibrate_demo.yaml
    python train/calibrate.py --threshold 1e-3 --samples 20 --positions answer   # 20 records, stratified by qtype
    python train/calibrate.py --device cuda --dtype bfloat16    # on a GPU (the batches follow the model)
    python train/calibrate.py --config configs/calibrate_demo.yaml --output checkpoints/demo-calibration \
        --overwrite true                                        # regenerate the committed demo calibration

Writes <output>/calibration.json (default ``<repo>/runs/calibrate-demo``, ignored by git; load it with
dyvte.Calibration.load or dyvte.withdraw(model, calibration=dir)), logs where, and prints the KL curve and the layer
each of --report_thresholds would choose.

The job is :mod:`dyvte.cli.calibrate`; ``dyvte calibrate`` (the console script) and
``python -m dyvte calibrate`` run it too, with the same options.
"""

from dyvte.cli.calibrate import main, run  # noqa: F401  (main: the job, for scripts and tests that load this file)

if __name__ == "__main__":
    import sys

    from dyvte.cli import user_errors

    sys.exit(user_errors(run, None, None, "calibrate.py"))  # a refused input: one error line, status 2
