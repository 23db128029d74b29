"""``dyvte evaluate``: methods on a dataset, with accuracy, agreement with the full model, exit layers, prefill FLOPs
and wall clock.

``python train/evaluate.py`` runs the same job with the same options; its docstring lists the method strings
(``full``, ``static:K``, ``heads:DIR``, ``fastervlm:R``, ``A+B``, registered kinds with ``--plugins``) and the
outputs (``results.json``, one JSON per method and ``accuracy_vs_flops.png`` under ``--output_dir``, default
``runs/eval``). Needs the ``dyvte[train,eval]`` extras (jsonargparse, torchmetrics, matplotlib).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from jsonargparse import CLI  # noqa: E402

import dyvte  # noqa: E402
from dyvte.cli.benchmarks import benchmark_data, score_results  # noqa: E402
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
from dyvte.data.fingerprints import Overlap, check_overlaps, count_in, split_digests  # noqa: E402
from dyvte.data.sources import check_dtype, load_model, load_records  # noqa: E402
from dyvte.engine.registry import resolve  # noqa: E402
from dyvte.eval.harness import format_histogram, format_per_type, format_table, oracle_exit, plot_sweep  # noqa: E402
from dyvte.eval.methods import (  # noqa: E402
    Compose,
    Full,
    Method,
    PolicyRun,
    PruningRun,
    allow_other_model,
    calibration_digests,
    check_method,
    load_plugins,
    parse_method,
)
from dyvte.eval.timing import TimingCheck, check_timings, machine_load, usable_cores  # noqa: E402
from dyvte.train.runs import check_output_folder, is_default, runs_dir  # noqa: E402
from dyvte.utils.checks import check_positive_int  # noqa: E402
from dyvte.utils.devices import check_device  # noqa: E402
from dyvte.utils.io import staged_dir, write_text_atomic  # noqa: E402

log = logging.getLogger("evaluate")


def check_arguments(
    samples: int | None,
    methods: list[str],
    batch_size: int,
    max_new_tokens: int,
    dtype: str,
    output_dir: str,
    device: str = "cpu",
    seed: int = 0,
    image_folder: str | None = None,
    overwrite: bool = False,
) -> str | None:
    """Refuse bad arguments before the model is loaded or anything is written (each message names its option).

    Returns:
        What the run will replace in ``output_dir`` (:func:`dyvte.train.runs.check_output_folder`), or ``None``.
    """
    check_data_options(samples, seed, image_folder)
    check_positive_int("--batch_size", batch_size)
    check_positive_int("--max_new_tokens", max_new_tokens)
    check_dtype(dtype, check_device(device, "--device"), option="--dtype")
    if isinstance(methods, str) or not all(isinstance(m, str) for m in methods):
        raise ValueError(f"--methods must be a list of method strings, e.g. '[full, \"static:all\"]', got {methods!r}")
    return check_output_folder(
        "--output_dir",
        output_dir,
        overwrite=overwrite,
        default=is_default(output_dir, runs_dir("eval")),
        marks=("results.json",),
        what="evaluation",
    )


def resolve_methods(
    specs: list[str], model, num_layers: int, processor=None, allow_other_models: bool = False
) -> list[Method]:
    """Every method of every string, checked against ``model`` (and its ``processor``) without running it; the full
    model left out.

    Exit heads and calibrations must have been made for ``model`` (their saved fingerprint: the same weights and,
    with ``processor``, the same tokenizer and chat template), unless ``allow_other_models`` (then a mismatch is
    logged as a warning).

    Raises:
        ValueError: a malformed string, a directory that does not load or does not fit the model, an out-of-range
            value (each message quotes the method string), or two different methods whose results would be saved
            under the same name.
    """
    chosen: list[Method] = []
    seen: dict[str, tuple[str, Method]] = {}  # output file name -> (method string, method)
    for spec in specs:
        for method in parse_method(spec, num_layers):
            if allow_other_models:
                allow_other_model(method)
            check_method(method, model, spec, processor)
            if isinstance(method, Full):
                continue  # the full model always runs first, as the reference
            name = file_name(method.name)
            if name in seen:
                if same_method(seen[name][1], method):
                    log.info("method %r repeats %s of %r: run once", spec, method.name, seen[name][0])
                    continue
                raise ValueError(
                    f"methods {seen[name][0]!r} and {spec!r} are different methods under one name "
                    f"({method.name!r}): their results would overwrite each other; give the heads or calibration "
                    "directories distinct names"
                )
            seen[name] = (spec, method)
            chosen.append(method)
    return chosen


def same_method(a: Method, b: Method) -> bool:
    """Whether two methods compute the same thing (options holding modules, such as exit heads, compare by config
    and weights)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, Compose):
        return same_method(a.outer, b.outer) and same_method(a.inner, b.inner)
    if isinstance(a, (PolicyRun, PruningRun)):
        kind = (a.policy, b.policy) if isinstance(a, PolicyRun) else (a.method, b.method)
        return (
            kind[0] == kind[1]
            and a.options.keys() == b.options.keys()
            and all(_same_value(a.options[k], b.options[k]) for k in a.options)
        )
    return a == b


def _same_value(x: object, y: object) -> bool:
    if isinstance(x, torch.nn.Module) or isinstance(y, torch.nn.Module):
        if type(x) is not type(y) or getattr(x, "config", None) != getattr(y, "config", None):
            return False
        ours, theirs = x.state_dict(), y.state_dict()
        return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    return x == y


def file_name(method_name: str) -> str:
    """The JSON file name of a method's result (``<name>.json``, unsafe characters replaced)."""
    return re.sub(r"[^A-Za-z0-9=.,-]+", "_", method_name) + ".json"


def main(
    model: str = "demo",
    data: str = "demo",
    split: str = "test",
    samples: int | None = None,
    seed: int = 0,
    methods: list[str] = ("full", "static:all"),
    batch_size: int = 100,
    max_new_tokens: int = 4,
    dtype: str = "float32",
    device: str = "cpu",
    prompt_template: str | None = None,
    image_folder: str | None = None,
    skip_bad_rows: bool = False,
    output_dir: str = str(runs_dir("eval")),
    plugins: list[str] = (),
    allow_other_model: bool = False,
    overwrite: bool = False,
    allow_overlap: bool = False,
    benchmark: str | None = None,
    benchmark_prompt: str = "auto",
) -> list[dyvte.EvalResult]:
    """Run each method over the dataset and report.

    Every argument and every method string (heads and calibration directories loaded and checked against the model,
    every K in range) is checked before the first forward; nothing is written unless every method ran.

    Args:
        model: "demo" or a local model directory.
        data: "demo", a save_to_disk directory or a .json/.jsonl/.parquet records file.
        split: dataset split.
        samples: evaluate a seeded random subset of this many records, stratified by qtype, in dataset order
            (default: all).
        seed: the seed of the ``samples`` draw.
        methods: method strings (see the module docstring); the full model always runs first (the reference).
        batch_size: rows per generate call.
        max_new_tokens: generation length.
        dtype: float32 or bfloat16 (float16 only with a CUDA --device: it is ~100x slower than float32 on CPU).
        device: where the model runs: cpu, cuda or cuda:N (the inputs follow it).
        prompt_template: prompt format string with {question} and the image placeholder, e.g.
            "USER: <image>\\n{question} ASSISTANT:", for a model without a chat template (dyvte.data.prompts).
        image_folder: resolve relative image paths against this folder (default: the records file's folder).
        skip_bad_rows: skip bad records (missing or corrupt image, empty question or answer), counted in the log,
            instead of failing on the first.
        output_dir: where JSON and PNG go (default ``runs/eval`` under the working directory).
        plugins: ``.py`` files or module names to import first: they register exit policies or pruning methods
            (with a method syntax) that ``methods`` may then name.
        allow_other_model: run exit heads (heads:DIR) and calibrations (calibrated:DIR) on this model although
            their saved model fingerprint (weights, tokenizer) is another model's; each mismatch is logged as a
            warning. Without it, that is an error before any forward: their promise was measured on the other model.
        overwrite: replace an ``output_dir`` that holds an earlier evaluation (its ``results.json``), as a whole,
            when this run completes; without it such a folder is refused before any work (the default ``runs/eval``
            is replaced with a warning). A folder holding anything else is never replaced.
        allow_overlap: evaluate calibrated thresholds (``heads:DIR``, ``calibrated:DIR``) even when more than 5% of
            the records are ones they were calibrated on; any such record is warned about.
        benchmark: score ``data`` as this standard benchmark (pope, mme, gqa, textvqa, vqav2, scienceqa, mmbench):
            ``data`` is a parquet file in the benchmark's HF ``datasets`` layout (:mod:`dyvte.eval.scorers`), or
            ``demo`` for the demo's own POPE / MME-style set; each method's benchmark scores go to ``results.json``
            under ``"benchmark"`` and are printed. ``split`` is not used and ``samples`` is refused.
        benchmark_prompt: the instruction after each benchmark question: ``auto`` (LLaVA-1.5's for the benchmark,
            none on the demo's sets), ``llava``, ``none`` or the text itself.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    replacing = check_arguments(  # before any work
        samples, methods, batch_size, max_new_tokens, dtype, output_dir, device, seed, image_folder, overwrite
    )
    loaded = None
    if benchmark is not None:  # the file is read and checked before the model loads
        if samples is not None:
            raise ValueError(
                "--samples does not apply with --benchmark (it would break MME's pairs and MMBench's circular "
                "groups): write a smaller benchmark file instead"
            )
        loaded = benchmark_data(benchmark, data, benchmark_prompt)
    load_plugins(list(plugins))
    mllm, processor = load_model(model, dtype, prompt_template, device=device)
    num_layers = resolve(mllm).num_layers
    chosen = resolve_methods(list(methods), mllm, num_layers, processor, allow_other_model)  # before any forward
    if loaded is not None:
        records = loaded.records
    else:
        records = load_records(
            data, split, image_folder=image_folder, skip_bad_rows=skip_bad_rows, sample=samples, seed=seed
        )
    if len(records) == 0:
        raise ValueError(f"--data {data} --split {split} holds no records to evaluate")
    check_calibration_overlap(chosen, records, allow_overlap, f"--data {data} --split {split}")  # before any forward
    if replacing:
        log.log(logging.INFO if overwrite else logging.WARNING, "%s", replacing)
    kwargs = {"batch_size": batch_size, "max_new_tokens": max_new_tokens}
    load_start = machine_load()
    full = dyvte.evaluate(mllm, processor, records, Full(), **kwargs)
    results = [full] + [dyvte.evaluate(mllm, processor, records, m, reference=full, **kwargs) for m in chosen]
    for result in results:
        warn_if_shifted(result)
    timing = time_again(mllm, processor, records, full, load_start, kwargs)
    scores = None if loaded is None else {"name": benchmark, "prompt": loaded.prompt, **score_results(loaded, results)}
    with staged_dir(output_dir) as out:  # the whole folder or nothing: no file of an earlier run survives
        write_results(results, timing, out, model, data, split, dtype, device, len(records), num_layers, scores)
    log.info(
        "results written to %s (results.json, one JSON per method, accuracy_vs_flops.png)", Path(output_dir).absolute()
    )
    return results


def check_calibration_overlap(methods: list[Method], records, allow: bool, what: str) -> None:
    """Refuse, before any forward, to evaluate calibrated thresholds on the records that calibrated them.

    Heads saved by ``train/fit.py`` and calibrations saved by ``train/calibrate.py`` keep the digests of their
    calibration records (:func:`dyvte.eval.methods.calibration_digests`); the records evaluated are compared with them
    (:mod:`dyvte.data.fingerprints`): a warning for any overlap, an error above 5% unless ``allow``.

    Raises:
        ValueError: naming the method, the counts and ``--allow_overlap``.
    """
    stored = [(method.name, digests) for method in methods if (digests := calibration_digests(method)) is not None]
    if not stored:
        return
    evaluated = split_digests(records)
    check_overlaps(
        [
            Overlap(f"records of {what}", f"records {name} was calibrated on", count_in(evaluated, d), len(evaluated))
            for name, d in stored
        ],
        allow,
        "thresholds evaluated on their own calibration records look better than they are on new records (the promise "
        "is about new records)",
        log=log,
    )


def warn_if_shifted(result: dyvte.EvalResult) -> None:
    """Log a warning when the method's exit-head scores did not look like their calibration records' (the
    ``shift`` report of a ``heads:`` method, :func:`dyvte.policies.shift.shift_report`)."""
    shift = result.shift
    if shift is None:
        return
    if shift["shifted"]:
        tested = [h for h in shift["heads"] if h["p_value"] is not None]
        worst = min(tested, key=lambda h: h["p_value"])
        log.warning(
            "%s: the exit heads' scores shifted (head %d: KS %.3g, Bonferroni p = %.3g < alpha = %g, %d rows): %s",
            result.method,
            worst["head"],
            worst["statistic"],
            min(1.0, worst["p_value"] * shift["tested"]),
            shift["alpha"],
            worst["n"],
            shift["meaning"],
        )
    else:
        log.info("%s: shift check: the exit heads' scores look like their calibration records'", result.method)


def write_results(
    results: list[dyvte.EvalResult],
    timing: TimingCheck,
    out: Path,
    model: str,
    data: str,
    split: str,
    dtype: str,
    device: str,
    samples: int,
    num_layers: int,
    benchmark: dict | None = None,
) -> None:
    """Write every result, ``results.json`` and the plot into ``out`` and print the tables (with ``benchmark``: the
    benchmark's scores per method, :func:`dyvte.cli.benchmarks.score_results`, saved under ``"benchmark"``)."""
    full = results[0]
    for r in results:
        r.save(out / file_name(r.method))
    saved = {**{r.method: r.metrics for r in results}, "timing": timing.record()}
    if benchmark is not None:
        saved["benchmark"] = benchmark
    write_text_atomic(out / "results.json", json.dumps(saved, indent=1) + "\n")
    plot_sweep(results, out / "accuracy_vs_flops.png", title=f"{model} / {split} ({samples} samples)")
    print(f"\n{model} on {data}/{split}, {samples} samples, {dtype} on {device}\n")
    print(format_table(results, unreliable=not timing.reliable))
    print(timing_note(timing))
    if benchmark is not None:
        print(f"\n{benchmark['name']} scores (dyvte.eval.scorers)\n")
        print(benchmark_markdown(results, benchmark))
    print("\naccuracy per question type\n")
    print(format_per_type(results, "accuracy"))
    print("\nagreement with the full model per question type\n")
    print(format_per_type(results, "agreement"))
    static = {int(r.method.split("=")[1]): r for r in results if r.method.startswith("static K=")}
    static[num_layers] = static.get(num_layers, full)
    if sorted(static) == list(range(num_layers + 1)):
        summarize(full, static, [r for r in results[1:] if not r.method.startswith("static")], num_layers, out)


def benchmark_markdown(results: list[dyvte.EvalResult], benchmark: dict) -> str:
    """One row per method: the benchmark's headline scores, relative prefill FLOPs and prefill time."""
    columns = list(dict.fromkeys(c for r in results for c in benchmark[r.method]["headline"]))
    lines = ["| method | " + " | ".join(columns) + " | rel. prefill FLOPs | prefill ms/sample |"]
    lines.append("|---" * (len(columns) + 3) + "|")
    for r in results:
        m, head = r.metrics["all"], benchmark[r.method]["headline"]
        cells = " | ".join(f"{head[c]:.1f}" for c in columns)
        lines.append(f"| {r.method} | {cells} | {m['relative_flops']:.3f} | {m['prefill_ms']:.2f} |")
    return "\n".join(lines)


def time_again(mllm, processor, records, full: dyvte.EvalResult, load_start: float | None, kwargs: dict) -> TimingCheck:
    """The full model timed again after every method, checked against its first pass and the machine's load."""
    again = dyvte.evaluate(mllm, processor, records, Full(), reference=full, **kwargs)
    if again.answers != full.answers:
        log.warning("the full model answered differently on its second pass: generation is not deterministic")
    first_ms, again_ms = full.metrics["all"]["prefill_ms"], again.metrics["all"]["prefill_ms"]
    return check_timings(first_ms, again_ms, load_start, machine_load(), usable_cores())


def timing_note(timing: TimingCheck) -> str:
    """One paragraph under the table: whether its timing columns can be trusted, and why not."""
    loads = "/".join("-" if x is None else f"{x:.2f}" for x in (timing.load_start, timing.load_end))
    seen = f"full-model drift {timing.drift:.1%} (limit {timing.max_drift:.0%}), load {loads} on {timing.cores} cores"
    if timing.reliable:
        return f"\ntimings: {seen}"
    return "\ntiming columns UNRELIABLE: " + "; ".join(timing.reasons) + f" ({seen})"


def summarize(
    full: dyvte.EvalResult,
    static: dict[int, dyvte.EvalResult],
    others: list[dyvte.EvalResult],
    num_layers: int,
    out: Path,
    tolerance: float = 0.005,
) -> None:
    """Oracle per-sample exit, and each method's cheapest setting within ``tolerance`` of the full accuracy."""
    layers, oracle_flops = oracle_exit(full, static)
    oracle = sum(oracle_flops) / len(oracle_flops)
    print("\nsmallest safe exit layer per sample (withdrawal at every K' >= K gives the full model's answer)\n")
    print(format_histogram(layers, full.qtypes, num_layers))
    target = full.accuracy - tolerance

    def cheapest(results: list[dyvte.EvalResult]) -> tuple[str, float, float] | None:
        ok = [r for r in results if r.accuracy >= target]
        best = min(ok, key=lambda r: r.flops, default=None)
        return None if best is None else (best.method, best.accuracy, best.flops)

    rows = [("full", full.accuracy, 1.0), ("oracle per-sample exit", full.accuracy, oracle)]
    groups: dict[str, list] = {"static": list(static.values())}
    for r in others:
        groups.setdefault(r.method.split(" ")[0], []).append(r)
    for group in groups.values():
        best = cheapest(group)
        if best is not None:
            rows.append(best)
    print(f"\ncheapest setting of each method with accuracy >= full - {tolerance:g} ({target:.3f})\n")
    print("| method | accuracy | rel. prefill FLOPs | share of the oracle's savings |\n|---|---|---|---|")
    for name, acc, flops in rows:
        share = (1 - flops) / (1 - oracle) if oracle < 1 else float("nan")
        print(f"| {name} | {acc:.3f} | {flops:.3f} | {share:.0%} |")
    summary = {"oracle_relative_flops": oracle, "smallest_safe_layer": layers, "cheapest_within_tolerance": rows}
    write_text_atomic(out / "oracle.json", json.dumps(summary) + "\n")


def short_help(prog: str) -> str:
    """``evaluate``'s short help: the common options, its main options and examples (``--help all``: every one)."""
    defaults = defaults_of(main)
    common = option_lines(list(COMMON), defaults)
    own = [
        *source_options(defaults),
        HelpOption(
            "--methods LIST",
            "method strings, the full model always first: full, static:K[,K...], static:all, calibrated:DIR, "
            "heads:DIR[:P,...], fastervlm:R, random:R, fastv:K:R, A+B "
            f"(default: {json.dumps(list(defaults['methods']))})",
        ),
        HelpOption(
            "--benchmark NAME",
            "score --data as a standard benchmark: pope, mme, gqa, textvqa, vqav2, scienceqa, mmbench (--data: its "
            "parquet file, or demo for the demo's POPE / MME-style set)",
        ),
        HelpOption("--output_dir DIR", "where results.json, one JSON per method and the plot go (default: runs/eval)"),
        HelpOption("--overwrite true", "replace an --output_dir that holds an earlier evaluation (refused without)"),
        HelpOption("--plugins LIST", "files or modules that register more exit policies or pruning methods"),
        HelpOption("--config FILE", "options from a YAML file (configs/evaluate_demo.yaml)"),
    ]
    return format_help(
        prog,
        "Run method strings over a dataset: accuracy, agreement with the full model, exit layers, prefill FLOPs and "
        "wall clock.",
        [("common options (the same on every dyvte command)", common), ("evaluate options", own)],
        [
            f'{prog} --methods \'["full", "heads:runs/fit-demo/exit-heads", "static:7"]\'',
            f"{prog} --data records.jsonl --image_folder images/ --samples 500 --seed 1 --device cuda",
            f"{prog} --benchmark pope --data pope.parquet --methods '[\"heads:runs/fit-demo/exit-heads\"]'",
        ],
    )


def run(args: list[str] | None = None, prog: str | None = None) -> list[dyvte.EvalResult]:
    """Run :func:`main` on the command line, parsed by jsonargparse as ``python train/evaluate.py`` parses it.

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
