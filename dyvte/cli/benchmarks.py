"""The standard benchmarks on the command line: ``evaluate --benchmark NAME --data PATH`` and ``report --benchmarks
NAME=PATH ...`` (the paper-style table: one row per method, one column per benchmark's headline score, with the
relative prefill FLOPs and the measured prefill time, as VTW's and FasterVLM's tables are laid out).

``--data demo`` (``NAME=demo``) builds the demo's own POPE- or MME-style set from its test scenes
(:mod:`dyvte.demo.benchmarks`, :data:`DEMO_SCENES` scenes) and reads it back through the benchmark's reader.
"""

from __future__ import annotations

import json
import logging
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

import dyvte
from dyvte.eval.harness import OVERALL
from dyvte.eval.methods import Full, Method
from dyvte.eval.scorers import Loaded, check_benchmark, headline, load_benchmark, score
from dyvte.eval.timing import machine_load, usable_cores

__all__ = ["DEMO_SCENES", "benchmark_data", "parse_benchmarks", "run_table", "score_results", "table_markdown"]

log = logging.getLogger("benchmarks")

#: scenes of the demo test split behind ``--data demo`` (POPE: up to 6 questions per scene and split; MME: 8)
DEMO_SCENES = 100
#: the benchmarks the demo has a set for
DEMO_BENCHMARKS = ("pope", "mme")
#: what ``report --benchmarks`` writes into ``--output_dir``
TABLE_OUTPUTS = ("benchmarks.md", "benchmarks.json")


def _prompt(option: str, data: str) -> bool | str:
    """``--benchmark_prompt``: ``auto`` (LLaVA-1.5's instruction, none on the demo's sets: its vocabulary lacks those
    words), ``llava``, ``none`` or the instruction's text."""
    if option == "auto":
        return data != "demo"
    return {"llava": True, "none": False}.get(option, option)


def benchmark_data(name: str, data: str, prompt: str = "auto", scenes: int = DEMO_SCENES) -> Loaded:
    """The records of benchmark ``name`` from the parquet file ``data`` (or the demo's set, ``data="demo"``).

    Raises:
        ValueError: an unknown benchmark, ``demo`` for a benchmark the demo has no set for, or a file not in the
            benchmark's layout.
        FileNotFoundError: no such file.
    """
    check_benchmark(name)
    text = _prompt(prompt, data)
    if data != "demo":
        return load_benchmark(name, data, text)
    if name not in DEMO_BENCHMARKS:
        raise ValueError(f"--data demo: the demo has a {' and a '.join(DEMO_BENCHMARKS)} set, not {name!r}")
    from dyvte.demo.benchmarks import build_mme, build_pope, held_out_scenes, write_benchmark

    picked = held_out_scenes(scenes)
    rows = build_pope(picked) if name == "pope" else build_mme(picked)
    with tempfile.TemporaryDirectory(prefix="dyvte-demo-bench-") as folder:  # read back through the public layout
        return load_benchmark(name, write_benchmark(rows, Path(folder) / f"{name}.parquet"), text)


def parse_benchmarks(specs: list[str]) -> dict[str, str]:
    """``["pope=PATH", "mme=demo"]`` -> ``{"pope": "PATH", "mme": "demo"}``.

    Raises:
        ValueError: an entry without ``=``, an unknown benchmark, or one named twice.
    """
    out: dict[str, str] = {}
    for spec in specs:
        name, eq, path = str(spec).partition("=")
        if not eq or not path:
            raise ValueError(f"--benchmarks {spec!r}: write NAME=PATH, e.g. pope=pope.parquet or mme=demo")
        check_benchmark(name)
        if name in out:
            raise ValueError(f"--benchmarks names {name} twice")
        out[name] = path
    return out


def score_results(loaded: Loaded, results: list[dyvte.EvalResult]) -> dict[str, dict[str, Any]]:
    """Per method: the benchmark's ``scores`` and ``headline`` of its answers."""
    out = {}
    for result in results:
        scores = score(loaded, result.answers)
        out[result.method] = {"scores": scores, "headline": headline(loaded.benchmark, scores)}
    return out


def table_markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """The paper-style table: method, each benchmark column, relative prefill FLOPs, prefill ms per sample."""
    lines = [
        "| method | " + " | ".join(columns) + " | rel. prefill FLOPs | prefill ms/sample |",
        "|---" * (len(columns) + 3) + "|",
    ]
    for row in rows:
        cells = [f"{row['scores'][c]:.1f}" if c in row["scores"] else "—" for c in columns]
        lines.append(
            f"| {row['method']} | " + " | ".join(cells) + f" | {row['relative_flops']:.3f} | {row['prefill_ms']:.2f} |"
        )
    return "\n".join(lines)


def run_table(
    mllm, processor, sets: dict[str, Loaded], methods: list[Method], batch_size: int, max_new_tokens: int
) -> tuple[str, dict[str, Any]]:
    """Every method (the full model first) on every benchmark set: the table's Markdown and its JSON.

    A method's relative FLOPs and prefill time are its means over every record of every set (weighted by records).
    """
    load_start = machine_load()
    per_method: dict[str, dict[str, Any]] = {}
    details: dict[str, Any] = {}
    for name, loaded in sets.items():
        kwargs = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "progress": False}
        full = dyvte.evaluate(mllm, processor, loaded.records, Full(), **kwargs)
        results = [full] + [
            dyvte.evaluate(mllm, processor, loaded.records, m, reference=full, **kwargs) for m in methods
        ]
        details[name] = {"prompt": loaded.prompt, "records": len(loaded.records), **score_results(loaded, results)}
        for r in results:
            row = per_method.setdefault(r.method, {"method": r.method, "scores": {}, "n": 0, "flops": 0.0, "ms": 0.0})
            row["scores"].update(details[name][r.method]["headline"])
            m, n = r.metrics[OVERALL], m_samples(r)
            row["n"] += n
            row["flops"] += m["relative_flops"] * n
            row["ms"] += m["prefill_ms"] * n
    rows = [
        {
            "method": row["method"],
            "scores": row["scores"],
            "relative_flops": row["flops"] / row["n"],
            "prefill_ms": row["ms"] / row["n"],
        }
        for row in per_method.values()
    ]
    columns = list(dict.fromkeys(c for row in rows for c in row["scores"]))
    loads = (load_start, machine_load())
    cores = usable_cores()
    loaded_note = (
        f" The machine was busy (1-minute load above its {cores} usable cores): the prefill times are noisy; the "
        "FLOPs and scores are not affected."
        if any(x is not None and x > cores for x in loads)
        else ""
    )
    text = "\n".join(
        [
            table_markdown(rows, columns),
            "",
            f"Greedy, {max_new_tokens} new tokens, batches of {batch_size}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads on {platform.machine()} ({cores} usable cores, 1-minute load "
            + "/".join("-" if x is None else f"{x:.2f}" for x in loads)
            + " at start/end). Records: "
            + ", ".join(f"{name} {d['records']}" for name, d in details.items())
            + ". Prompts: "
            + "; ".join(
                f"{name}: {json.dumps(d['prompt']) if d['prompt'] else 'the question alone'}"
                for name, d in details.items()
            )
            + "."
            + loaded_note,
        ]
    )
    return text, {"rows": rows, "benchmarks": details, "load": loads}


def m_samples(result: dyvte.EvalResult) -> int:
    """How many records ``result`` covers."""
    return int(result.metrics[OVERALL]["samples"])
