"""Load a model + processor and a dataset split by name: ``"demo"`` or a local path. Used by the launchers."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dyvte.data.adapters import adapter_base, check_adapter
from dyvte.data.answers import gold_text
from dyvte.data.errors import DataError
from dyvte.data.images import small_images, warn_small
from dyvte.data.placement import CPU_DTYPES, DTYPES, check_dtype, check_placement
from dyvte.data.records import check_answer, check_question, open_image
from dyvte.data.subsets import subset_indices

__all__ = ["CPU_DTYPES", "DTYPES", "check_dtype", "check_placement", "load_model", "load_records"]

logger = logging.getLogger(__name__)

#: Fields every record needs (``qtype`` is optional).
REQUIRED = ("image", "question", "answer")
#: Records file suffixes :func:`load_records` reads.
SUFFIXES = (".json", ".jsonl", ".parquet")
EXPECTED = "expected 'demo', a save_to_disk directory, or a .json/.jsonl/.parquet records file"


def load_model(
    name: str = "demo",
    dtype: str = "float32",
    prompt_template: str | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict[str, Any] | None = None,
):
    """``(model, processor)``: the embedded demo (``"demo"``) or a local ``from_pretrained`` directory, in eval mode.

    ``prompt_template`` (a format string with ``{question}``, :mod:`dyvte.data.prompts`) is attached to the processor,
    so that every prompt built from it uses the template instead of the chat template (a model without one needs it).

    A directory holding a peft adapter (``adapter_config.json``) loads the base model it names (``"demo"`` or a
    directory) and returns the ``PeftModel`` on it; dyvte unwraps it wherever it hooks the model. An adapter whose
    shapes do not fit that base is refused first (:func:`dyvte.data.adapters.check_adapter`).

    Args:
        name: ``"demo"`` or a local model (or peft adapter) directory.
        dtype: ``float32``, ``bfloat16`` or (on CUDA only) ``float16``; short names ``fp32``, ``bf16``, ``fp16``.
        prompt_template: see above.
        device: move the loaded model there (``"cpu"``, ``"cuda"``, ``"cuda:1"``); default: where it loads (CPU).
        device_map: passed to ``from_pretrained`` (``"auto"``, a device, or ``{module name: device}``; needs
            ``accelerate``). Exclusive with ``device``.

    Every check (dtype, device, template) runs before any weight is read. dyvte moves the inputs it builds to the
    device of the model's first parameter (:func:`dyvte.utils.devices.model_device`).

    Raises:
        ValueError: unknown dtype, float16 for a model on the CPU (it is ~100x slower than fp32 there), ``device``
            and ``device_map`` both given, a malformed device, or a CUDA device on a machine without CUDA.
        ImportError: ``device_map`` without ``accelerate``.
    """
    target = check_placement(device, device_map)
    check_dtype(dtype, target, device_map)
    if prompt_template is not None:
        from dyvte.data.prompts import attach_prompt_template, check_prompt_template

        check_prompt_template(prompt_template)  # before loading anything
        model, processor = load_model(name, dtype, device=device, device_map=device_map)
        return model, attach_prompt_template(processor, prompt_template)
    model, processor = _load(name, DTYPES[dtype], device_map)
    if target is not None:
        model = model.to(target)
        logger.info("model %s on %s (%s)", name, target, dtype)
    return model, processor


def _load(name: str, torch_dtype: torch.dtype, device_map: Any):
    """``(model, processor)`` in eval mode, placed by ``device_map`` when given (else on the CPU)."""
    placement = {} if device_map is None else {"device_map": device_map}
    if name == "demo":
        from dyvte.demo import demo_checkpoint_dir, load_demo_model, load_demo_processor

        if device_map is None:
            return load_demo_model(torch_dtype), load_demo_processor()
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(demo_checkpoint_dir(), dtype=torch_dtype, **placement)
        return model.eval(), load_demo_processor()
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(name)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist (use 'demo' for the embedded model)")
    base_name = adapter_base(path)
    if base_name is not None:  # a peft adapter: load its base (by the name it records), then it
        from peft import PeftModel

        base, processor = _load(base_name, torch_dtype, device_map)
        check_adapter(base, path)  # one clear error, not torch's size mismatch per tensor
        return PeftModel.from_pretrained(base, path).eval(), processor
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype, **placement).eval()
    return model, AutoProcessor.from_pretrained(path)


def load_config(name: str = "demo"):
    """The top-level config of what :func:`load_model` would load for ``name`` (no weights are read).

    Raises:
        FileNotFoundError: ``name`` is neither ``"demo"`` nor a directory.
    """
    from transformers import AutoConfig

    if name == "demo":
        from dyvte.demo import demo_checkpoint_dir

        return AutoConfig.from_pretrained(demo_checkpoint_dir("demo-mllm"))
    path = Path(name)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist (use 'demo' for the embedded model)")
    base_name = adapter_base(path)
    return AutoConfig.from_pretrained(path) if base_name is None else load_config(base_name)


def load_records(
    name: str = "demo",
    split: str = "test",
    limit: int | None = None,
    *,
    image_folder: str | None = None,
    columns: str | Mapping[str, str] | None = None,
    skip_bad_rows: bool = False,
    sample: int | None = None,
    seed: int = 0,
):
    """A dataset of (image, question, answer[, qtype]) records, every one checked before it is returned.

    Each kept record must have a non-empty question, a non-empty gold answer and an image that exists and that PIL
    can fully load; image paths are resolved against the records file's folder (a ``save_to_disk`` directory's own
    folder), never against the working directory, whatever the column's Arrow type.

    Args:
        name: ``"demo"`` (the digit-scenes splits), a ``save_to_disk`` directory, or a ``.json`` / ``.jsonl`` /
            ``.parquet`` file of records whose ``image`` field is a path (relative to the file), image bytes or an
            image. A ``.json`` file holds a list of records or one record per line, as a ``.jsonl`` file. A
            ``.json`` / ``.jsonl`` file of conversations (LLaVA instruction JSON, ShareGPT, OpenAI messages) is
            converted by :func:`dyvte.data.formats.load_conversations`: one record per assistant turn.
        split: the split for ``"demo"`` and ``DatasetDict`` directories (ignored for single files).
        limit: keep (and check) the first ``limit`` records.
        image_folder: resolve relative image paths against this folder instead of the records file's.
        columns: which source column holds each field, ``{"image": ..., "question": ..., "answer": ...}`` or
            ``"image=img,question=q,answer=a"`` (:func:`dyvte.data.formats.parse_columns`); unmapped fields keep their
            names.
        skip_bad_rows: skip bad records (counted in a warning, with the first few named) instead of failing.
        sample: keep (and check) a seeded random subset of ``sample`` records, stratified by ``qtype`` when
            the records have it, in their original order (:func:`dyvte.data.subsets.subset_indices`; the
            ``--samples`` of the commands). The subset is drawn before the records are checked, so only its images
            are opened; text-only or (with ``skip_bad_rows``) bad records in it leave fewer than ``sample``.
            Exclusive with ``limit``. Conversation files are converted whole first (the conversion is cached).
        seed: the seed of ``sample``'s draw.

    Rows without an image (text-only) are skipped and counted in the log, never an error.

    Returns:
        A ``datasets.Dataset`` whose ``image`` column is a ``datasets.Image`` feature.

    Raises:
        DataError: the input does not exist, has an unsupported suffix, cannot be parsed (the message names the file
            and, for JSON, the line), has no records, lacks a column or split, or a record has a bad question, answer
            or image (the message names the file, the record index and, for JSON Lines, the line).
    """
    import datasets

    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or at least 0, got {limit}")
    if limit is not None and sample is not None:
        raise ValueError(f"give limit ({limit}) or sample ({sample}), not both")
    if sample is not None:
        subset_indices(0, sample, seed=seed)  # checks sample and seed before any record is read
    from dyvte.data.formats import is_conversation_file, load_conversations, parse_columns

    mapping = parse_columns(columns)
    options = {"limit": limit, "columns": mapping, "skip_bad_rows": skip_bad_rows, "sample": sample, "seed": seed}
    if name == "demo":
        from dyvte.demo import load_demo_dataset

        return _checked(_pick_split(load_demo_dataset(None), split, "demo"), f"demo [{split}]", None, **options)
    path = Path(name)
    if image_folder is not None and not Path(image_folder).is_dir():
        raise DataError(f"image folder {image_folder} (--image_folder) does not exist")
    folder = Path(image_folder).resolve() if image_folder is not None else None
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            return _checked(_pick_split(ds, split, str(path)), f"{path} [{split}]", folder or path.resolve(), **options)
        return _checked(ds, str(path), folder or path.resolve(), **options)
    if not path.exists():
        raise DataError(f"{name}: no such file or directory ({EXPECTED})")
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{name}: unsupported records file suffix {path.suffix!r} ({EXPECTED})")
    if path.suffix.lower() == ".parquet":
        return _checked(_read_parquet(path), str(path), folder or path.resolve().parent, **options)
    if is_conversation_file(path):
        ds = load_conversations(path, folder, skip_bad_rows, limit)
        return ds if sample is None else ds.select(subset_indices(len(ds), sample, _qtypes(ds["qtype"]), seed))
    return _json_dataset(path, folder or path.resolve().parent, **options)


def _pick_split(splits, split: str, source: str):
    """``splits[split]``, or a :class:`DataError` naming the splits there are."""
    if split not in splits:
        raise DataError(f"{source}: no split {split!r} (splits: {sorted(splits)})")
    return splits[split]


def _absolute(image: Any, root: Path | None) -> Any:
    """``image`` with a relative path (a string, or a ``{"bytes": None, "path"}`` mapping) joined to ``root``.

    Returns ``image`` itself (the same object) when there is nothing to resolve (absolute paths, URLs, bytes).
    """

    def relative(path: Any) -> bool:
        return isinstance(path, str) and bool(path) and "://" not in path and not Path(path).is_absolute()

    if root is None:
        return image
    if relative(image):
        return str(root / image)
    if isinstance(image, Mapping) and image.get("bytes") is None and relative(image.get("path")):
        return {**image, "path": str(root / image["path"])}
    return image


def _answer_texts(answers: list[Any]) -> dict[str, list[str]]:
    """``datasets.map`` function (batched, ``input_columns=["answer"]``): checked gold answers as text."""
    return {"answer": [gold_text(answer, "a checked record") for answer in answers]}


def _absolute_batch(images: list[Any], root: str) -> dict[str, list[Any]]:
    """``datasets.map`` function (batched, ``input_columns=["image"]``): every relative image path made absolute."""
    return {"image": [_absolute(image, Path(root)) for image in images]}


def _check_records(
    records: Iterable[Mapping[str, Any]],
    source: str,
    root: Path | None,
    lines: Sequence[int] | None = None,
    skip_bad_rows: bool = False,
    numbers: Sequence[int] | None = None,
) -> tuple[bool, list[int] | None]:
    """Check every record's question, answer and image (opened and loaded); one warning names the records whose
    images are degenerate (:func:`dyvte.data.images.small_images`).

    ``numbers``: each record's index in its source, for the messages, when ``records`` is a subset of it.

    Returns:
        ``(relative, kept)``: whether an image path is relative, and the indices of the records to keep (``None``:
        all of them). Text-only records (no image) are left out and counted in the log; bad records too with
        ``skip_bad_rows``.

    Raises:
        DataError: naming ``source``, the record index and (when ``lines`` is given) its line.
    """
    relative = False
    kept: list[int] = []
    text_only, bad, examples, total = 0, 0, [], 0
    small: dict[str, tuple[int, int]] = {}  # record -> size of its degenerate image
    limit = small_images([])[0]
    for i, record in enumerate(records):
        total += 1
        number = i if numbers is None else numbers[i]
        where = f"{source}, record {number}" + (f" (line {lines[i]})" if lines is not None else "")
        if record.get("image") is None:
            text_only += 1
            continue
        try:
            check_question(record.get("question"), where)
            check_answer(record.get("answer"), where)
            image = _absolute(record.get("image"), root)
            opened = open_image(image, where)
            if small_images([opened])[1]:
                small[where] = opened.size
            opened.close()
        except DataError as error:
            if not skip_bad_rows:
                hint = "fix it, or pass --skip_bad_rows true (skip_bad_rows=True) to skip such records"
                raise DataError(f"{error}; {hint}") from error
            bad += 1
            examples = examples if len(examples) >= 3 else [*examples, str(error)]
            continue
        relative = relative or image is not record.get("image")
        kept.append(i)
    warn_small(list(small.values()), [where.removeprefix(f"{source}, ") for where in small], limit, source)
    if text_only:
        logger.info("%s: skipped %d text-only records (no image)", source, text_only)
    if bad:
        logger.warning("%s: skipped %d bad records (--skip_bad_rows); the first: %s", source, bad, " | ".join(examples))
    if not kept:
        raise DataError(f"{source}: no record with an image ({text_only} text-only, {bad} bad)")
    return relative, None if len(kept) == total else kept


def _rename(ds, columns: Mapping[str, str], source: str):
    """``ds`` with each mapped source column renamed to its dyvte field (a column already named so is dropped)."""
    missing = sorted(column for column in columns.values() if column not in ds.column_names)
    if missing:
        raise DataError(f"{source}: --data.source.columns names {missing}, not among its columns {ds.column_names}")
    renames = {column: field for field, column in columns.items() if column != field}
    clash = [field for field in renames.values() if field in ds.column_names and field not in renames]
    return ds.remove_columns(clash).rename_columns(renames) if renames else ds


def _checked(
    ds,
    source: str,
    root: Path | None,
    limit: int | None,
    columns: Mapping[str, str],
    skip_bad_rows: bool = False,
    sample: int | None = None,
    seed: int = 0,
):
    """``ds`` limited (or subsampled), its columns and records checked, relative image paths resolved, ``image``
    decoded by PIL."""
    import datasets

    ds = _rename(ds, columns, source)
    missing = [key for key in REQUIRED if key not in ds.column_names]
    if missing:
        raise DataError(f"{source}: records lack {missing} (columns: {ds.column_names})")
    if len(ds) == 0:
        raise DataError(f"{source}: has no records")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    numbers = None
    if sample is not None and sample < len(ds):
        qtypes = _qtypes(ds["qtype"]) if "qtype" in ds.column_names else None
        numbers = subset_indices(len(ds), sample, qtypes, seed)
        ds = ds.select(numbers)
    feature = ds.features["image"]
    readable = isinstance(feature, datasets.Image) or (
        isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "binary", "large_binary")
    )
    if not readable and not (isinstance(feature, dict) and feature and set(feature) <= {"bytes", "path"}):
        raise DataError(f"{source}: the image column holds {feature}; expected image paths, image bytes or images")
    ds = ds.cast_column("image", datasets.Image(decode=False))  # {"bytes", "path"} whatever the column's Arrow type
    rows = (
        record
        for batch in ds.select_columns(list(REQUIRED)).iter(batch_size=256)
        for record in (dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True))
    )
    relative, kept = _check_records(rows, source, root, None, skip_bad_rows, numbers)
    if kept is not None:
        ds = ds.select(kept)
    if ds.features["answer"] not in (datasets.Value("string"), datasets.Value("large_string")):
        features = ds.features.copy()
        features["answer"] = datasets.Value("string")  # numbers as gold_text writes them: 3.0 (pandas) is "3"
        ds = ds.map(_answer_texts, batched=True, input_columns=["answer"], features=features, desc="answers as text")
    if relative:
        ds = ds.map(
            _absolute_batch,
            batched=True,
            input_columns=["image"],
            fn_kwargs={"root": str(root)},
            features=ds.features,
            desc="resolving image paths",
        )
    logger.debug("checked the %d records of %s", len(ds), source)
    return ds.cast_column("image", datasets.Image())


def _qtypes(values: Iterable[Any]) -> list[str | None]:
    """Question types as the harness groups them (``str``; ``None`` stays ``None``), for stratified subsets."""
    return [None if value is None else str(value) for value in values]


def _read_parquet(path: Path):
    """A parquet records file as a ``datasets.Dataset``; an unreadable or empty file is a :class:`DataError`."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.exceptions import DatasetGenerationError

    try:
        num_rows = pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable parquet file ({error})") from error
    if num_rows == 0:
        raise DataError(f"{path}: the file has no records")
    try:
        return datasets.load_dataset("parquet", data_files=str(path), split="train")
    except (DatasetGenerationError, pa.ArrowException, ValueError) as error:
        cause = error.__cause__ or error
        raise DataError(f"{path}: cannot read its records ({type(cause).__name__}: {cause})") from error


def _read_json(path: Path) -> tuple[list[dict[str, Any]], list[int] | None]:
    """The records of a ``.json`` / ``.jsonl`` file and, for one record per line, each record's line number.

    A file starting with ``[`` is one JSON list of records; otherwise one JSON object per line (JSON Lines; blank
    lines skipped), or one (possibly multi-line) JSON object.

    Raises:
        DataError: not UTF-8, not valid JSON (with the line), a record that is not an object, or no records.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error})") from error
    if not text.strip():
        raise DataError(f"{path}: the file has no records (it is empty)")
    head = text.lstrip()
    rows: Any = None
    lines: list[int] | None = None
    if head.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            where = f"{path}, line {error.lineno}, column {error.colno}"
            raise DataError(f"{where}: not valid JSON ({error.msg.removesuffix(' at')})") from error
    else:
        if head.startswith("{"):  # one object, possibly over several lines; else JSON Lines (or a broken file)
            try:
                rows = [json.loads(text)]
                lines = [len(text[: len(text) - len(head)].split("\n"))]
            except json.JSONDecodeError:
                rows = None
            if rows is not None and isinstance(rows[0].get("question"), dict | list):
                raise DataError(
                    f"{path}: one JSON object of columns (pandas' default to_json); write a list of records or one "
                    "record per line (to_json(orient='records', lines=True))"
                )
        if rows is None:
            rows, lines = [], []
            for number, line in enumerate(text.split("\n"), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    reason = f"not valid JSON ({error.msg.removesuffix(' at')} at column {error.colno})"
                    raise DataError(f"{path}, line {number}: {reason}: a truncated or malformed line") from error
                lines.append(number)
    if not rows:
        raise DataError(f"{path}: the file has no records")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            where = f"{path}, record {i}" + (f" (line {lines[i]})" if lines is not None else "")
            raise DataError(f"{where}: expected a JSON object (a record), got {type(row).__name__} {row!r:.80}")
    return rows, lines


def _json_dataset(
    path: Path,
    root: Path,
    limit: int | None,
    columns: Mapping[str, str],
    skip_bad_rows: bool = False,
    sample: int | None = None,
    seed: int = 0,
):
    """A ``.json`` / ``.jsonl`` records file as a checked ``datasets.Dataset`` (image paths resolved against
    ``root``)."""
    import datasets
    import pyarrow as pa

    rows, lines = _read_json(path)
    if columns:
        keys = set(key for row in rows for key in row)
        missing = sorted(column for column in columns.values() if column not in keys)
        if missing:
            raise DataError(f"{path}: --data.source.columns names {missing}, not among its fields {sorted(keys)}")
        renames = {column: field for field, column in columns.items()}
        rows = [
            {renames.get(key, key): value for key, value in row.items() if key in renames or key not in columns}
            for row in rows
        ]
    keys = list(dict.fromkeys(key for row in rows for key in row))
    missing = [key for key in REQUIRED if key not in keys]
    if missing:
        raise DataError(f"{path}: records lack {missing} (fields: {keys})")
    if limit is not None:
        rows, lines = rows[:limit], None if lines is None else lines[:limit]
    numbers = None
    if sample is not None and sample < len(rows):
        qtypes = _qtypes([row.get("qtype") for row in rows]) if "qtype" in keys else None
        numbers = subset_indices(len(rows), sample, qtypes, seed)
        rows, lines = [rows[i] for i in numbers], None if lines is None else [lines[i] for i in numbers]
    for i, row in enumerate(rows):
        image = row.get("image")
        if image is not None and not isinstance(image, str):
            number = i if numbers is None else numbers[i]
            where = f"{path}, record {number}" + (f" (line {lines[i]})" if lines is not None else "")
            raise DataError(f"{where}: the image must be a path (a string), got {type(image).__name__}")
    rows = [{**row, "image": _absolute(row.get("image"), root)} for row in rows]
    _, kept = _check_records(rows, str(path), None, lines, skip_bad_rows, numbers)
    if kept is not None:
        rows = [rows[i] for i in kept]
    columns = {key: [row.get(key) for row in rows] for key in keys}
    # one Arrow type per column: gold answers as gold_text writes them (3.0 is "3"), qtype as text (the harness groups)
    columns["answer"] = [None if value is None else gold_text(value, "a checked record") for value in columns["answer"]]
    if "qtype" in columns:
        columns["qtype"] = [None if value is None else str(value) for value in columns["qtype"]]
    try:
        ds = datasets.Dataset.from_dict(columns)
    except (pa.ArrowException, TypeError, ValueError) as error:
        raise DataError(f"{path}: the records' fields do not have one type each ({error})") from error
    logger.debug("checked the %d records of %s", len(ds), path)
    return ds.cast_column("image", datasets.Image())
