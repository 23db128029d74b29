"""Train DyVTE exit heads on a frozen MLLM (default: the embedded demo model and digit-scenes data).

    python train/fit.py                                   # demo model + data -> runs/fit-demo/exit-heads
    python train/fit.py --config configs/fit_demo.yaml    # the same, from YAML
    python train/fit.py --trainer.strategy ddp --trainer.devices 2    # two processes on CPU
    python train/fit.py --trainer.accelerator cuda --trainer.devices 1    # label and train on a GPU
    python train/fit.py --ckpt_path last                 # resume: the newest runs/fit-demo/logs/*/checkpoints/last.ckpt
    python train/fit.py --data.source.data llava_format.json --image_folder images/   # LLaVA JSON
    python train/fit.py --data.labels.on_the_fly true --data.labels.rule dyvte-layer     # the paper's on-the-fly labels
    python train/fit.py --output_dir checkpoints/demo-exit-heads --overwrite true   # regenerate the committed heads

Outputs, all under ``<repo>/runs`` (ignored by git; a run never modifies a tracked file unless ``--output_dir``
points at one, as in the last command):

* ``runs/fit-demo/exit-heads``: the heads (``ExitHeads.save_pretrained``) and ``training.json`` (timings and the
  per-head validation precision / recall / exit rate that the run also logs as a table);
* ``runs/fit-demo/logs/version_N``: Lightning's CSV logs (``metrics.csv``, ``hparams.yaml``, ``config.yaml``) and
  ``checkpoints/last.ckpt`` (heads only, rewritten at the end of every epoch);
* ``runs/label-cache/<split>-<samples>-<key>``: labels and head inputs, computed once per (model weights, data,
  split, samples, the records' digests with their images' bytes, agree, loss_ratio); later runs reuse them and say so
  (``--data.labels.relabel true`` labels again).

The device is Lightning's: ``--trainer.accelerator`` / ``--trainer.devices`` (default: the CPU); ``--device cuda:N``
is short for ``--trainer.accelerator cuda --trainer.devices [N]`` (``cuda``: ``--trainer.devices 1``; ``cpu``:
``--trainer.accelerator cpu``), and giving both with different values is refused. The labelling model is loaded on
the CPU and moved to each rank's device (``trainer.strategy.root_device``), so labels, head features and training all
run there. Labelling runs in float32 (``--dtype`` is refused).

The common options of every ``dyvte`` command, ``--image_folder``, ``--skip_bad_rows`` and ``--prompt_template``, are
short for ``--data.source.*``; ``--samples`` and ``--seed`` are refused (the splits are sized and seeded by
``--data.splits.*``). ``--help`` shows the common options and examples on one screen, ``--help all`` every option.

Every path is logged at INFO. Lightning checkpoints hold only the heads; training never runs the MLLM after labelling.

Ctrl-C or SIGTERM during training exits non-zero (1, SIGTERM 143) with an error line that names the checkpoint, the
epochs it holds and the exact command that resumes (the same arguments plus ``--ckpt_path <last.ckpt>``); an
unfinished epoch is run again from its start. ``--ckpt_path last`` resumes from the newest ``last.ckpt`` of the same
log folder, and is refused when there is none. A resumed run ends with the uninterrupted run's heads, bit for bit
(the checkpoint carries the random generators' states, so the shuffles are the same).

Validation never reuses training records: with a single records file and no ``--data.source.val_data`` (or
``--data.source.val_split`` equal to ``--data.source.train_split``), ``--data.splits.val_samples`` records
(``--data.splits.val_fraction`` of them when null) are held out at random (``--data.splits.split_seed``); the log and
``training.json`` (``validation_split``) say so. A configuration that can run no optimizer step
(``--trainer.max_epochs 0``, ``--trainer.max_steps 0``, ``--trainer.limit_train_batches 0``), an ``--output_dir`` that
is a file or a missing ``--ckpt_path`` is refused before labelling; a run that ends with no step writes no heads.
Held out is checked to be apart: validation or calibration records that are copies of training records (or
calibration of validation records; compared by question, answer, earlier turns and image bytes) are warned about,
and refused above 5% unless ``--allow_overlap true``.

The output folder is written as a whole at the end (a temporary sibling swapped in), so no file of an earlier run
survives beside the new heads. An ``--output_dir`` that holds earlier heads is refused before any work unless
``--overwrite true``; the default ``runs/fit-<model>/exit-heads`` is the exception, replaced with a warning that
names what it replaced (so that this command can be rerun as the README shows); give ``--output_dir`` to keep a
run. A folder that holds anything but heads is never replaced, and one that cannot be written is refused first.

The job is :mod:`dyvte.cli.fit`; ``dyvte fit`` (the console script) and
``python -m dyvte fit`` run it too, with the same options.
"""

from dyvte.cli.fit import main  # noqa: F401  (main: the job, for scripts and tests that load this file)

if __name__ == "__main__":
    import sys

    from dyvte.cli import user_errors

    sys.exit(user_errors(main, None, None, "fit.py"))  # a refused input: one error line, status 2
