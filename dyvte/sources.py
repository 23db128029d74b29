"""Load a model + processor and a dataset split by name: ``"demo"`` or a local path. Used by the launchers."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

__all__ = ["load_model", "load_records"]

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def load_model(name: str = "demo", dtype: str = "float32"):
    """``(model, processor)``: the embedded demo (``"demo"``) or a local ``from_pretrained`` directory, in eval mode.

    A directory holding a peft adapter (``adapter_config.json``) loads the base model it names (``"demo"`` or a
    directory) and returns the ``PeftModel`` on it; dyvte unwraps it wherever it hooks the model.

    Raises:
        ValueError: unknown dtype (float16 is refused: it is ~100x slower than fp32 on CPU).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if name == "demo":
        from .demo import load_demo_model, load_demo_processor

        return load_demo_model(DTYPES[dtype]), load_demo_processor()
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(name)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist (use 'demo' for the embedded model)")
    if (path / "adapter_config.json").is_file():  # a peft adapter: load its base (by the name it records), then it
        import json

        from peft import PeftModel

        base, processor = load_model(
            json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"], dtype
        )
        return PeftModel.from_pretrained(base, path).eval(), processor
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=DTYPES[dtype]).eval()
    return model, AutoProcessor.from_pretrained(path)


def load_records(name: str = "demo", split: str = "test", limit: int | None = None):
    """A dataset of (image, question, answer[, qtype]) records.

    Args:
        name: ``"demo"`` (the digit-scenes splits), a ``save_to_disk`` directory, or a ``.json`` / ``.jsonl`` /
            ``.parquet`` file of records whose ``image`` field is a path (relative to the file) or an image.
        split: the split for ``"demo"`` and ``DatasetDict`` directories (ignored for single files).
        limit: keep the first ``limit`` records.
    """
    import datasets

    if name == "demo":
        from .demo import load_demo_dataset

        ds = load_demo_dataset(split)
    else:
        path = Path(name)
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        elif path.suffix in (".json", ".jsonl"):
            ds = datasets.load_dataset("json", data_files=str(path), split="train")
        elif path.suffix == ".parquet":
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        else:
            raise ValueError(f"{name}: expected 'demo', a save_to_disk directory, or a .json/.jsonl/.parquet file")
        if "image" in ds.column_names and ds.features["image"].dtype == "string":
            root = path.parent if path.is_file() else path
            ds = ds.map(lambda r: {"image": str((root / r["image"]).resolve())})
            ds = ds.cast_column("image", datasets.Image())
    missing = {"image", "question", "answer"} - set(ds.column_names)
    if missing:
        raise ValueError(f"{name}: records lack {sorted(missing)}")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds
