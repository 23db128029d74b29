"""``dyvte calibrate``: VTW calibration, the per-layer KL curve of a model on a few samples and the static exit layer
it chooses.

``python train/calibrate.py`` runs the same job with the same options (examples in its docstring). Writes
``<output>/calibration.json`` (default ``runs/calibrate-demo`` under the working directory) and prints the KL curve.
    python train/calibrate.py --device cuda --dtype bfloat16    # on a GPU (the batches follow the model)
Needs the ``dyvte[train]`` extra (jsonargparse).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from jsonargparse import CLI  # noqa: E402

import dyvte  # noqa: E402
from dyvte.cli.help import (  # noqa: E402
    COMMON,
    HelpOption,
    defaults_of,
    format_help,
    help_request,
    option_lines,
    source_options,
)
from dyvte.cli.shared import check_data_options  # noqa: E402
from dyvte.data.fingerprints import short_digests, split_digests  # noqa: E402
from dyvte.data.records import build_inputs, iter_batches  # noqa: E402
from dyvte.data.sources import check_dtype, load_model, load_records  # noqa: E402
from dyvte.exits.kl import POSITIONS  # noqa: E402
from dyvte.policies.calibrated import FILENAME  # noqa: E402
from dyvte.train.runs import check_output_folder, is_default, runs_dir  # noqa: E402
from dyvte.utils.checks import check_positive_int  # noqa: E402
from dyvte.utils.devices import check_device  # noqa: E402
from dyvte.utils.io import staged_dir  # noqa: E402

log = logging.getLogger("calibrate")


def check_arguments(
    threshold: float,
    report_thresholds: list[float],
    positions: str,
    samples: int,
    batch_size: int,
    dtype: str,
    device: str = "cpu",
    seed: int = 0,
    image_folder: str | None = None,
    output: str | None = None,
    overwrite: bool = False,
) -> str | None:
    """Refuse bad arguments before the model is loaded or anything is written (each message names its option).

    Returns:
        What the run will replace in ``output`` (:func:`dyvte.train.runs.check_output_folder`), or ``None``.
    """
    for name, eta in [("--threshold", threshold), *(("--report_thresholds", t) for t in report_thresholds)]:
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta > 0:
            raise ValueError(f"{name}: a KL threshold eta must be a number > 0, got {eta!r}")
    if positions not in POSITIONS:
        raise ValueError(f"--positions must be one of {POSITIONS}, got {positions!r}")
    check_data_options(samples, seed, image_folder, samples_optional=False)
    check_positive_int("--batch_size", batch_size)
    check_dtype(dtype, check_device(device, "--device"), option="--dtype")
    if output is None:
        return None
    return check_output_folder(
        "--output",
        output,
        overwrite=overwrite,
        default=is_default(output, runs_dir("calibrate-demo")),
        marks=(FILENAME,),
        what="calibration",
    )


def main(
    model: str = "demo",
    data: str = "demo",
    split: str = "validation",
    samples: int = 100,
    seed: int = 0,
    threshold: float = 3e-3,
    report_thresholds: list[float] = (1e-3, 3e-3, 1e-2),
    positions: str = "first",
    batch_size: int = 50,
    dtype: str = "float32",
    device: str = "cpu",
    prompt_template: str | None = None,
    image_folder: str | None = None,
    skip_bad_rows: bool = False,
    output: str = str(runs_dir("calibrate-demo")),
    overwrite: bool = False,
) -> dyvte.Calibration:
    """Calibrate the static exit layer.

    Args:
        model: "demo" or a local model directory.
        data: "demo", a save_to_disk directory or a .json/.jsonl/.parquet records file.
        split: dataset split to calibrate on (never the test split you report).
        samples: a seeded random subset of this many records of the split, stratified by qtype, in dataset order
            (VTW used 20).
        seed: the seed of the ``samples`` draw.
        threshold: eta saved in the calibration file.
        report_thresholds: other etas whose chosen layer is printed.
        positions: "first" (first answer position, as VTW) or "answer" (every teacher-forced answer position).
        batch_size: rows per forward.
        dtype: float32 or bfloat16 (float16 only with a CUDA --device: it is ~100x slower than float32 on CPU).
        device: where the model runs: cpu, cuda or cuda:N (the batches follow it).
        prompt_template: prompt format string with {question} and the image placeholder, e.g.
            "USER: <image>\\n{question} ASSISTANT:", for a model without a chat template (dyvte.data.prompts).
        image_folder: resolve relative image paths against this folder (default: the records file's folder).
        skip_bad_rows: skip bad records (missing or corrupt image, empty question or answer), counted in the log,
            instead of failing on the first.
        output: directory for calibration.json (pass checkpoints/demo-calibration --overwrite true to regenerate the
            committed one).
        overwrite: replace an ``output`` folder that holds an earlier calibration, as a whole, when this run
            completes; without it such a folder is refused before any work (the default ``runs/calibrate-demo`` is
            replaced with a warning). A folder holding anything else is never replaced.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    replacing = check_arguments(  # before any work
        threshold,
        report_thresholds,
        positions,
        samples,
        batch_size,
        dtype,
        device,
        seed,
        image_folder,
        output,
        overwrite,
    )
    if replacing:
        log.log(logging.INFO if overwrite else logging.WARNING, "%s", replacing)
    mllm, processor = load_model(model, dtype, prompt_template, device=device)
    records = load_records(
        data, split, image_folder=image_folder, skip_bad_rows=skip_bad_rows, sample=samples, seed=seed
    )
    batches = [
        build_inputs(processor, recs, with_answers=positions == "answer", offset=i * batch_size)
        for i, recs in enumerate(iter_batches(records, batch_size, processor=processor))
    ]
    cal = dyvte.calibrate(mllm, batches, threshold=threshold, positions=positions, processor=processor)
    cal.record_digests = short_digests(
        split_digests(records)
    )  # train/evaluate.py refuses to evaluate K on these records
    with staged_dir(output) as folder:  # the whole folder or nothing: no file of an earlier run survives
        cal.save(folder)
    file = Path(output) / FILENAME
    print(f"\nKL(P_withdrawn || P_full) at the {positions} answer position(s), {cal.num_samples} samples of {split}:\n")
    print("| K | mean KL |\n|---|---|")
    for k, kl in enumerate(cal.kl_per_layer):
        print(f"| {k} | {kl:.3g} |")
    print("\n| eta | chosen K |\n|---|---|")
    for eta in sorted({threshold, *report_thresholds}):
        print(f"| {eta:g} | {cal.with_threshold(eta).layer} |")
    log.info("calibration written to %s (eta=%g, K=%d)", file.absolute(), threshold, cal.layer)
    return cal


def short_help(prog: str) -> str:
    """``calibrate``'s short help: the common options, its main options and examples (``--help all``: every one)."""
    defaults = defaults_of(main)
    common = option_lines(list(COMMON), defaults)
    own = [
        *source_options(defaults, "the split to calibrate on, never the one you report"),
        HelpOption(
            "--threshold ETA", f"the KL threshold saved with the chosen layer (default: {defaults['threshold']:g})"
        ),
        HelpOption(
            "--positions WHERE", f"first (VTW) or answer: where the KL is measured (default: {defaults['positions']})"
        ),
        HelpOption("--output DIR", "where calibration.json goes (default: runs/calibrate-demo)"),
        HelpOption("--overwrite true", "replace an --output that holds an earlier calibration (refused without)"),
        HelpOption("--config FILE", "options from a YAML file (configs/calibrate_demo.yaml)"),
    ]
    return format_help(
        prog,
        "VTW calibration: the per-layer KL curve of a model on a few samples and the static exit layer it chooses.",
        [("common options (the same on every dyvte command)", common), ("calibrate options", own)],
        [
            f"{prog} --samples 20 --threshold 1e-3 --positions answer",
            f"{prog} --model path/to/llava --data records.jsonl --image_folder images/ --device cuda --dtype bfloat16",
        ],
    )


def run(args: list[str] | None = None, prog: str | None = None) -> dyvte.Calibration:
    """Run :func:`main` on the command line, parsed by jsonargparse as ``python train/calibrate.py`` parses it.

    ``-h`` / ``--help`` prints the short help (:func:`short_help`), ``--help all`` every option.

    Args:
        args: command-line arguments (default: ``sys.argv[1:]``).
        prog: the program name in usage and help messages (default: the script's file name).
    """
    mode, args = help_request(sys.argv[1:] if args is None else args)
    if mode == "short":
        print(short_help(prog or Path(sys.argv[0]).name))
        raise SystemExit(0)
    return CLI(main, as_positional=False, args=args, **({"prog": prog} if prog else {}))
