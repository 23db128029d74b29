"""The standard benchmarks' scorers: each reads its benchmark's public record layout and scores predictions by the
benchmark's published definition.

========== ====================================== ==========================================================
benchmark  module                                 headline (the paper-style table's column)
========== ====================================== ==========================================================
vqav2      :mod:`.vqa` (VQA accuracy)             VQAv2: accuracy x 100
gqa        :mod:`.vqa` (exact match)              GQA: accuracy x 100
textvqa    :mod:`.vqa` (VQA accuracy)             TextVQA: accuracy x 100
pope       :mod:`.pope`                           POPE F1: mean over the splits present of F1 x 100
mme        :mod:`.mme`                            MME-P / MME-C: perception / cognition totals
scienceqa  :mod:`.choice` (letter extraction)     SQA-IMG: accuracy x 100
mmbench    :mod:`.choice` (circular evaluation)   MMBench: circular accuracy x 100
========== ====================================== ==========================================================

:func:`load_benchmark` reads a file, :func:`score` scores the answers of :func:`dyvte.evaluate` on it, and
:func:`headline` picks the numbers a paper's table prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dyvte.eval.scorers.choice import MC_PROMPT, read_mmbench, read_scienceqa, score_choice, score_mmbench
from dyvte.eval.scorers.mme import read_mme, score_mme
from dyvte.eval.scorers.pope import read_pope, score_pope
from dyvte.eval.scorers.records import Loaded
from dyvte.eval.scorers.vqa import SHORT_ANSWER, read_gqa, read_textvqa, read_vqav2, score_gqa, score_vqa

__all__ = ["BENCHMARKS", "Benchmark", "Loaded", "check_benchmark", "headline", "load_benchmark", "score"]


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its reader, its scorer, its LLaVA-1.5 prompt and its table columns."""

    read: Callable[..., Loaded]
    score: Callable[[Loaded, list[str]], dict[str, Any]]
    prompt: str
    headline: Callable[[dict[str, Any]], dict[str, float]]


BENCHMARKS: dict[str, Benchmark] = {
    "pope": Benchmark(read_pope, score_pope, SHORT_ANSWER, lambda s: {"POPE F1": 100 * s["mean"]["f1"]}),
    "mme": Benchmark(
        read_mme,
        score_mme,
        SHORT_ANSWER,
        lambda s: {
            name: s[key]["total"]
            for name, key in (("MME-P", "perception"), ("MME-C", "cognition"))
            if s[key]["subtasks"]
        },
    ),
    "gqa": Benchmark(read_gqa, score_gqa, SHORT_ANSWER, lambda s: {"GQA": 100 * s["accuracy"]}),
    "textvqa": Benchmark(read_textvqa, score_vqa, SHORT_ANSWER, lambda s: {"TextVQA": 100 * s["accuracy"]}),
    "vqav2": Benchmark(read_vqav2, score_vqa, SHORT_ANSWER, lambda s: {"VQAv2": 100 * s["accuracy"]}),
    "scienceqa": Benchmark(read_scienceqa, score_choice, MC_PROMPT, lambda s: {"SQA-IMG": 100 * s["accuracy"]}),
    "mmbench": Benchmark(read_mmbench, score_mmbench, MC_PROMPT, lambda s: {"MMBench": 100 * s["circular"]}),
}


def check_benchmark(name: str) -> Benchmark:
    """The benchmark called ``name``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in BENCHMARKS:
        raise ValueError(f"--benchmark {name!r} is not a benchmark dyvte scores; choose one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def load_benchmark(name: str, path: str | Path, prompt: bool | str = True) -> Loaded:
    """Read a benchmark file.

    Args:
        name: one of :data:`BENCHMARKS`.
        path: the parquet file.
        prompt: ``True``: the benchmark's LLaVA-1.5 instruction after each question; ``False``: none (a model such
            as the demo's, whose vocabulary lacks those words); a string: that instruction.

    Raises:
        ValueError: an unknown benchmark, or a file not in its layout (see each reader).
        FileNotFoundError: no such file.
    """
    benchmark = check_benchmark(name)
    text = benchmark.prompt if prompt is True else (prompt or "")
    return benchmark.read(path, prompt=text)


def score(loaded: Loaded, predictions: list[str]) -> dict[str, Any]:
    """The benchmark's metrics of ``predictions`` (one per record of ``loaded``, in order).

    Raises:
        ValueError: a different number of predictions than records.
    """
    if len(predictions) != len(loaded.records):
        raise ValueError(f"{loaded.benchmark}: {len(predictions)} predictions for {len(loaded.records)} records")
    return BENCHMARKS[loaded.benchmark].score(loaded, predictions)


def headline(name: str, scores: dict[str, Any]) -> dict[str, float]:
    """The numbers a paper's table prints for ``name`` (column -> value), from :func:`score`'s metrics."""
    return BENCHMARKS[name].headline(scores)
