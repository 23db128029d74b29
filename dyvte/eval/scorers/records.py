"""Reading a benchmark's records: the parquet files of its HF ``datasets`` release, checked column by column.

Each benchmark module names the columns its loader needs (:data:`Reader.required`); a file missing one is refused
with a message naming the benchmark, the file, the missing columns and the columns it has. Images are the
``datasets`` ``Image`` feature as parquet stores it: a struct ``{"bytes": ..., "path": ...}``, passed on as is to the
harness (:func:`dyvte.data.records.open_image` decodes it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Loaded", "read_rows", "yes_no"]


@dataclass
class Loaded:
    """A benchmark's records, ready for :func:`dyvte.evaluate`, and what its scorer needs beside the predictions.

    Attributes:
        benchmark: the benchmark's name.
        records: one harness record per prompt: ``image``, ``question`` (the prompt, suffix included), ``answer`` (a
            single gold text for the harness's own exact-match column) and ``qtype`` (the split / subtask).
        gold: per record, the scorer's gold fields (the 10 answers, the POPE label, the MME image, the letter...).
        prompt: the instruction appended to every question (``""``: none).
    """

    benchmark: str
    records: list[dict[str, Any]]
    gold: list[dict[str, Any]] = field(repr=False)
    prompt: str = ""


def read_rows(path: str | Path, required: Sequence[str], benchmark: str) -> list[dict[str, Any]]:
    """The rows of a parquet file (``.parquet``) as dicts, after checking it holds every ``required`` column.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a parquet file, unreadable, empty, or missing a required column (the message lists the
            missing and the present columns and says whose layout is expected).
    """
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file (a {benchmark} parquet file is expected)")
    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for a file that is not parquet
        raise ValueError(f"--data {path}: cannot read it as parquet ({type(error).__name__}: {error})") from error
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ValueError(
            f"--data {path} is not in the {benchmark} layout: missing column(s) {', '.join(missing)} "
            f"(it has {', '.join(table.column_names) or 'none'}; the {benchmark} reader needs {', '.join(required)})"
        )
    if table.num_rows == 0:
        raise ValueError(f"--data {path}: no rows")
    return table.select(list(dict.fromkeys([*required, *table.column_names]))).to_pylist()


def with_prompt(question: str, prompt: str) -> str:
    """The question with the instruction on a new line (LLaVA-1.5's layout), or as is when ``prompt`` is empty."""
    return f"{question}\n{prompt}" if prompt else question


def yes_no(prediction: str) -> str | None:
    """``"yes"`` / ``"no"`` from a prediction's first word (lower-cased, punctuation stripped; ``not`` is a no), or
    ``None`` when the first word is neither (an unparseable answer, scored wrong)."""
    words = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in prediction.lower()).split()
    if not words:
        return None
    if words[0] == "yes":
        return "yes"
    if words[0] in ("no", "not"):
        return "no"
    return None


def check_label(value: Any, where: str) -> str:
    """A yes/no gold label, lower-cased (``"Yes"`` -> ``"yes"``).

    Raises:
        ValueError: anything else.
    """
    label = value.strip().lower() if isinstance(value, str) else None
    if label not in ("yes", "no"):
        raise ValueError(f"{where}: the answer must be yes or no, got {value!r}")
    return label


def check_image(value: Any, where: str) -> Any:
    """A row's image cell, refused when empty.

    Raises:
        ValueError: ``None`` or a ``{"bytes": None, "path": None}`` struct.
    """
    if value is None or (isinstance(value, dict) and value.get("bytes") is None and not value.get("path")):
        raise ValueError(f"{where} has no image")
    return value
