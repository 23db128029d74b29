"""Small benchmark files in the public layouts (HF ``datasets`` parquet, images as ``{"bytes", "path"}`` structs),
written by the tests themselves."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def image_cell(seed: int = 0, size: int = 48) -> dict[str, Any]:
    """A PNG in the ``datasets`` ``Image`` feature's parquet layout."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": f"image_{seed}.png"}


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    """``rows`` as a parquet file (column types inferred by pyarrow; the image column a struct of bytes and path)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def pope_rows(labels: list[str], splits: list[str]) -> list[dict[str, Any]]:
    """POPE rows (``lmms-lab/POPE`` columns) with the given labels and splits."""
    return [
        {
            "id": str(i),
            "question_id": str(i),
            "question": "Is there a dog in the image?",
            "answer": label,
            "image_source": f"COCO_val2014_{i:012d}",
            "image": image_cell(i),
            "category": split,
        }
        for i, (label, split) in enumerate(zip(labels, splits, strict=True))
    ]
