"""``dyvte report``: the comparison report, every method on the demo test split at matched prefill FLOPs.

``python train/report.py`` runs the same job with the same options (its docstring lists the methods and tables).
Writes ``report.md``, ``accuracy_vs_flops.png`` and ``exit_layers.png`` under ``--output_dir`` (default
``runs/report``). Needs the ``dyvte[train,eval]`` extras (jsonargparse, torchmetrics, matplotlib).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from jsonargparse import CLI  # noqa: E402

import dyvte  # noqa: E402
from dyvte.cli.benchmarks import TABLE_OUTPUTS, benchmark_data, parse_benchmarks, run_table  # noqa: E402
from dyvte.cli.evaluate import check_calibration_overlap, resolve_methods  # noqa: E402
from dyvte.cli.help import (  # noqa: E402
    COMMON,
    HelpOption,
    defaults_of,
    format_help,
    help_request,
    option_lines,
    source_options,
)

# included and matched were defined here and stay importable from here (``x as x``: an explicit re-export)
from dyvte.cli.report_text import (  # noqa: E402
    DTYPE_NAMES,
    PROMISE_MARK,
    plot_exit_layers,
    promise,
    render,
)
from dyvte.cli.report_text import included as included  # noqa: E402
from dyvte.cli.report_text import matched as matched  # noqa: E402
from dyvte.cli.shared import check_data_options  # noqa: E402
from dyvte.data.sources import check_dtype, load_model, load_records  # noqa: E402
from dyvte.engine.registry import resolve  # noqa: E402
from dyvte.eval.harness import plot_sweep  # noqa: E402
from dyvte.eval.methods import Full, load_plugins, parse_method  # noqa: E402
from dyvte.train.runs import check_output_files, is_default, runs_dir  # noqa: E402
from dyvte.utils.devices import check_device  # noqa: E402
from dyvte.utils.io import staged_files  # noqa: E402

log = logging.getLogger("report")


def main(
    model: str = "demo",
    data: str = "demo",
    split: str = "test",
    samples: int | None = None,
    seed: int = 0,
    heads: str = "checkpoints/demo-exit-heads",
    calibration: str = "checkpoints/demo-calibration",
    thresholds: list[float] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99),
    keep: list[float] = (0.5, 0.25, 0.1, 0.05),
    fastv_layer: int = 2,
    compose_threshold: float | None = None,
    targets: list[float] = (0.7, 0.5, 0.3),
    batch_size: int = 100,
    output_dir: str = str(runs_dir("report")),
    wallclock: str = "docs/wallclock.md",
    mixed: str = "docs/mixed.md",
    decode: str = "docs/decode.md",
    prompt_template: str | None = None,
    methods: list[str] = (),
    plugins: list[str] = (),
    device: str = "cpu",
    dtype: str = "float32",
    image_folder: str | None = None,
    skip_bad_rows: bool = False,
    overwrite: bool = False,
    allow_overlap: bool = False,
    benchmarks: list[str] = (),
    benchmark_prompt: str = "auto",
    table_methods: list[str] | None = None,
    benchmarks_table: str = "docs/benchmarks.md",
) -> None:
    """Run every method and write the report; with ``benchmarks``, the paper-style benchmark table instead.

    Args:
        model: "demo" or a local model directory.
        data: "demo" or a records file / directory.
        split: dataset split.
        samples: a seeded random subset of this many records, stratified by qtype, in dataset order (default: all).
        seed: the seed of the ``samples`` draw.
        heads: exit-heads directory.
        calibration: calibration directory.
        thresholds: exit-head P(exit) thresholds of the sweep (one raw threshold for every head).
        keep: fractions of visual tokens kept by the pruning methods.
        fastv_layer: FastV's K.
        compose_threshold: exit-head threshold used with FasterVLM and for the exit-layer histogram (``None``: the
            heads' calibrated thresholds).
        targets: relative-FLOPs targets of the matched-FLOPs table.
        batch_size: rows per generate call.
        output_dir: where report.md and the PNGs go.
        wallclock: the Markdown table written by ``benchmarks/methods.py --output`` (included as is).
        mixed: the mixed-exit batch prefill tables of ``benchmarks/mixed.py`` (included as is).
        decode: the decode table of ``benchmarks/decode.py`` (included as is).
        prompt_template: prompt format string with {question} for a model without a chat template (dyvte.data.prompts).
        methods: more method strings to run and report beside the built-in ones (any registered kind).
        plugins: ``.py`` files or module names to import first (they register the exit policies or pruning methods
            that ``methods`` names; see ``train/evaluate.py``).
        device: where the model runs: cpu, cuda or cuda:N.
        dtype: float32 (the committed report's) or bfloat16 (float16 only with a CUDA --device).
        image_folder: resolve relative image paths against this folder (default: the records file's folder).
        skip_bad_rows: skip bad records (missing or corrupt image, empty question or answer), counted in the log,
            instead of failing on the first.
        overwrite: replace the report.md and PNGs an earlier report left in ``output_dir`` (its other files are
            never touched); without it they are refused before any work (in the default ``runs/report`` they are
            replaced with a warning).
        allow_overlap: report calibrated thresholds even when more than 5% of the records are ones they were
            calibrated on (any such record is warned about).
        benchmarks: ``NAME=PATH`` entries (``pope=pope.parquet``, ``mme=demo``; on the command line also
            ``--benchmarks pope=A mme=B``): write the paper-style table instead of the report: one row per method
            (the full model and ``table_methods``), one column per benchmark's headline score
            (:mod:`dyvte.eval.scorers`), with relative prefill FLOPs and prefill time, into
            ``<output_dir>/benchmarks.md`` and ``benchmarks.json``.
        benchmark_prompt: the instruction after each benchmark question (``auto``: LLaVA-1.5's, none on the demo's
            sets; ``llava``; ``none``; or the text).
        table_methods: the table's methods (default: static K = 3L/4, ``calibrated:<calibration>``,
            ``heads:<heads>`` at their calibrated thresholds, FasterVLM keeping ``keep[1]`` of the visual tokens).
        benchmarks_table: the table written by ``--benchmarks`` (included in the report as is).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if benchmarks:
        return benchmark_table(
            model,
            list(benchmarks),
            benchmark_prompt,
            table_methods,
            heads,
            calibration,
            list(keep),
            batch_size,
            output_dir,
            prompt_template,
            list(plugins),
            device,
            dtype,
            overwrite,
            allow_overlap,
        )
    check_data_options(samples, seed, image_folder)  # before any work
    replacing = check_run(device, dtype, output_dir, OUTPUTS, overwrite, "report")
    if replacing:
        log.log(logging.INFO if overwrite else logging.WARNING, "%s", replacing)
    load_plugins(list(plugins))
    mllm, processor = load_model(model, dtype, prompt_template, device=device)
    records = load_records(
        data, split, image_folder=image_folder, skip_bad_rows=skip_bad_rows, sample=samples, seed=seed
    )
    num_layers = resolve(mllm).num_layers
    ratios = ",".join(f"{1 - k:g}" for k in keep)
    specs = [
        "static:all",
        f"calibrated:{calibration}",
        f"heads:{heads}",  # the heads' calibrated thresholds (their promise: see promise())
        f"heads:{heads}:" + ",".join(map(str, thresholds)),
        f"fastervlm:{ratios}",
        f"fastv:{fastv_layer}:{ratios}",
        f"random:{ratios}",
        f"fastervlm:{ratios}+heads:{heads}" + ("" if compose_threshold is None else f":{compose_threshold}"),
        *methods,
    ]
    chosen_methods = [m for spec in specs for m in parse_method(spec, num_layers)]
    check_calibration_overlap(chosen_methods, records, allow_overlap, f"--data {data} --split {split}")
    full = dyvte.evaluate(mllm, processor, records, Full(), batch_size=batch_size, max_new_tokens=4)
    results = [full] + [
        dyvte.evaluate(mllm, processor, records, m, reference=full, batch_size=batch_size, max_new_tokens=4)
        for m in chosen_methods
        if not (isinstance(m, dyvte.PolicyRun) and m.policy == "static" and m.options["layer"] == num_layers)
    ]
    # the full model timed again after every method: the two passes bracket the sweep, so their gap is this machine's
    # drift over the run; speedups are taken against their mean
    again = dyvte.evaluate(mllm, processor, records, Full(), reference=full, batch_size=batch_size, max_new_tokens=4)
    if again.answers != full.answers:
        raise RuntimeError("the full model answered differently on its second pass: generation is not deterministic")
    again = dataclasses.replace(again, method="full, timed again last")
    mark = "calibrated" if compose_threshold is None else f"p={compose_threshold:g}"
    chosen = next(r for r in results if r.method.startswith("heads") and mark in r.method)
    text = render(
        results,
        again,
        targets,
        len(records),
        split,
        chosen.method,
        batch_size,
        wallclock,
        mixed_path=mixed,
        decode_path=decode,
        dtype=dtype,
        benchmarks_path=benchmarks_table,
    )
    text = text.replace(PROMISE_MARK, promise(results, heads))
    with staged_files(output_dir) as out:  # the three files replace the earlier ones together, or none does
        plot_sweep(results, out / "accuracy_vs_flops.png", title=f"{model} / {split} ({len(records)} samples)")
        plot_exit_layers(chosen, num_layers, out / "exit_layers.png")
        (out / "report.md").write_text(text + "\n")
    print(text)
    log.info("report written to %s (%s)", Path(output_dir).absolute(), ", ".join(OUTPUTS))


#: the files report writes into --output_dir
OUTPUTS = ("report.md", "accuracy_vs_flops.png", "exit_layers.png")


def check_run(
    device: str, dtype: str, output_dir: str, outputs: tuple[str, ...], overwrite: bool, what: str
) -> str | None:
    """``--device``, ``--dtype`` and the files ``outputs`` of ``--output_dir`` checked before any work (the default
    ``runs/report`` may be written over; elsewhere only with ``overwrite``).

    Returns:
        ``None``, or a line saying which files the run will replace (to log once the other checks pass).
    """
    check_dtype(dtype, check_device(device, "--device"), option="--dtype")
    return check_output_files(
        "--output_dir",
        output_dir,
        outputs,
        overwrite=overwrite,
        default=is_default(output_dir, runs_dir("report")),
        what=what,
    )


def benchmark_table(
    model: str,
    benchmarks: list[str],
    prompt: str,
    table_methods: list[str] | None,
    heads: str,
    calibration: str,
    keep: list[float],
    batch_size: int,
    output_dir: str,
    prompt_template: str | None,
    plugins: list[str],
    device: str,
    dtype: str,
    overwrite: bool,
    allow_overlap: bool,
) -> None:
    """``report --benchmarks``: the paper-style table (:func:`main`'s ``benchmarks``); every file is read and every
    method checked before the first forward."""
    replacing = check_run(device, dtype, output_dir, TABLE_OUTPUTS, overwrite, "benchmark table")
    paths = parse_benchmarks(benchmarks)
    sets = {name: benchmark_data(name, path, prompt) for name, path in paths.items()}
    if replacing:
        log.log(logging.INFO if overwrite else logging.WARNING, "%s", replacing)
    load_plugins(plugins)
    mllm, processor = load_model(model, dtype, prompt_template, device=device)
    num_layers = resolve(mllm).num_layers
    if table_methods is None:
        keep_share = keep[1] if len(keep) > 1 else keep[0]
        table_methods = [
            f"static:{3 * num_layers // 4}",
            f"calibrated:{calibration}",
            f"heads:{heads}",
            f"fastervlm:{1 - keep_share:g}",
        ]
    chosen = resolve_methods(list(table_methods), mllm, num_layers, processor)
    for name, loaded in sets.items():
        check_calibration_overlap(chosen, loaded.records, allow_overlap, f"--benchmarks {name}")
    text, saved = run_table(mllm, processor, sets, chosen, batch_size, max_new_tokens=4)
    command = "python train/report.py --benchmarks " + " ".join(benchmarks)
    if not is_default(output_dir, runs_dir("report")):
        command += f" --output_dir {output_dir}"
    text = f"Generated by `{command}` ({model} model, {DTYPE_NAMES.get(dtype, dtype)}).\n\n{text}"
    with staged_files(output_dir) as out:
        (out / "benchmarks.md").write_text(text + "\n")
        (out / "benchmarks.json").write_text(json.dumps({"command": command, **saved}, indent=1) + "\n")
    print(text)
    log.info("benchmark table written to %s (%s)", Path(output_dir).absolute(), ", ".join(TABLE_OUTPUTS))


def short_help(prog: str) -> str:
    """``report``'s short help: the common options, its main options and examples (``--help all``: every one)."""
    defaults = defaults_of(main)
    common = option_lines(list(COMMON), defaults)
    own = [
        *source_options(defaults),
        HelpOption("--heads DIR", f"the exit heads (default: {defaults['heads']})"),
        HelpOption("--calibration DIR", f"the VTW calibration (default: {defaults['calibration']})"),
        HelpOption("--methods LIST", "more method strings to report beside the built-in ones (see dyvte evaluate)"),
        HelpOption(
            "--benchmarks NAME=PATH ...",
            "the paper-style table instead: one row per method, one column per benchmark (pope, mme, gqa, textvqa, "
            "vqav2, scienceqa, mmbench; PATH a parquet file, or demo for pope / mme) -> benchmarks.md",
        ),
        HelpOption("--output_dir DIR", "where report.md and its PNGs go (default: runs/report)"),
        HelpOption("--overwrite true", "replace the report.md and PNGs of an earlier report there (refused without)"),
    ]
    return format_help(
        prog,
        "The comparison report: every method (static K, calibrated K, exit heads, FasterVLM, FastV, random, "
        "compositions) at matched prefill FLOPs.",
        [("common options (the same on every dyvte command)", common), ("report options", own)],
        [
            f"{prog} --samples 500                # a quicker, noisier pass -> runs/report/report.md",
            f"{prog} --heads runs/fit-demo/exit-heads --calibration runs/calibrate-demo",
            f"{prog} --benchmarks pope=pope.parquet mme=mme.parquet --output_dir runs/table",
        ],
    )


def list_option(args: list[str], name: str) -> list[str]:
    """``args`` with ``NAME a b c`` (space-separated values up to the next option) written as ``NAME=["a","b","c"]``,
    the JSON list jsonargparse parses; ``NAME=[...]`` and ``NAME '[...]'`` stay as they are."""
    out: list[str] = []
    i = 0
    while i < len(args):
        if args[i] != name:
            out.append(args[i])
            i += 1
            continue
        values = []
        i += 1
        while i < len(args) and not args[i].startswith("--"):
            values.append(args[i])
            i += 1
        if len(values) == 1 and values[0].lstrip().startswith("["):
            out += [name, values[0]]
        else:
            out.append(f"{name}={json.dumps(values)}")
    return out


def run(args: list[str] | None = None, prog: str | None = None) -> None:
    """Run :func:`main` on the command line, parsed by jsonargparse as ``python train/report.py`` parses it.

    ``-h`` / ``--help`` prints the short help (:func:`short_help`), ``--help all`` every option.

    Args:
        args: command-line arguments (default: ``sys.argv[1:]``).
        prog: the program name in usage and help messages (default: the script's file name).
    """
    mode, args = help_request(sys.argv[1:] if args is None else args)
    args = list_option(args, "--benchmarks")
    if mode == "short":
        print(short_help(prog or Path(sys.argv[0]).name))
        raise SystemExit(0)
    return CLI(main, as_positional=False, args=args, **({"prog": prog} if prog else {}))
