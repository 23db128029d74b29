"""(image, question, answer) records -> model inputs, through the processor's own chat template.

Used by calibration, the evaluation harness and exit-head training. A record is a mapping with ``image`` (a PIL
image, an absolute path, or ``{"bytes", "path"}`` as ``datasets`` stores images), ``question`` (str) and optionally
``answer`` (str) and ``qtype`` (str). Every bad record is refused with a :class:`DataError` that names it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dyvte.data.answers import gold_text, normalize_answer
from dyvte.data.errors import DataError
from dyvte.data.images import small_images, to_rgb, warn_small
from dyvte.data.prompts import (
    check_prompt_template,
    check_single_bos,
    check_special_text,
    render_prompt,
    special_texts,
)

__all__ = [
    "DataError",
    "answer_token_ids",
    "build_inputs",
    "check_answer",
    "check_question",
    "iter_batches",
    "normalize_answer",
    "open_image",
    "records_of",
    "teacher_force",
]

#: What PIL raises for an unreadable image (truncated, corrupt, not an image, too large).
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def check_question(question: Any, where: str) -> None:
    """Refuse a missing, non-string or blank question.

    Args:
        question: the record's ``question``.
        where: the record, for the message (e.g. ``"records.jsonl, record 3 (line 4)"``).

    Raises:
        DataError: the question is missing, not a string, or empty / whitespace only (it carries no task).
    """
    if question is None:
        raise DataError(f"{where} has no question")
    if not isinstance(question, str):
        raise DataError(f"{where}: the question must be a string, got {type(question).__name__} {question!r}")
    if not question.strip():
        raise DataError(f"{where}: the question is empty ({question!r}): a record without a question carries no task")


def check_answer(answer: Any, where: str) -> None:
    """Refuse a missing, non-scalar or empty gold answer (:func:`dyvte.data.answers.gold_text`'s rule).

    Numbers are accepted (``3`` and ``3.0`` are the answer ``"3"``); lists (several reference answers) are refused
    rather than compared as their string form.

    Args:
        answer: the record's ``answer``.
        where: the record, for the message.

    Raises:
        DataError: the answer is missing (``None`` or NaN), not a string or number, empty / whitespace only, or only
            punctuation that :func:`normalize_answer` strips (no prediction could match it).
    """
    gold_text(answer, where)


def open_image(image: Any, where: str) -> Image.Image:
    """The record's image, opened, fully loaded (so that a bad file fails here with its name) and made the RGB image
    a person sees (:func:`dyvte.data.images.to_rgb`: EXIF orientation, transparency over white, 16-bit scaled).

    Every image that reaches a processor through dyvte comes through here, whatever its source (a path, bytes, a
    records file, a PIL image of the caller's or one ``datasets`` decoded), so one file gives one image everywhere.

    Args:
        image: a PIL image, an absolute path, raw image bytes, or a ``{"bytes", "path"}`` mapping (``datasets``'
            undecoded ``Image`` form; the bytes win when both are given).
        where: the record, for the message.

    Raises:
        DataError: no image, a relative path (dyvte never resolves one against the working directory), a path that
            does not exist, or a file that PIL cannot read (truncated, corrupt, not an image).
    """
    name = "the image"
    if isinstance(image, Mapping) and ("bytes" in image or "path" in image):
        if image.get("bytes") is None:
            return open_image(image.get("path"), where)
        name = f"{image.get('path') or 'embedded'} (image bytes)"
        image = image["bytes"]
    if image is None:
        raise DataError(f"{where} has no image: dyvte evaluates image-question pairs")
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        if not str(image):
            raise DataError(f"{where}: the image path is empty")
        if str(image).startswith(("http://", "https://")):
            raise DataError(f"{where}: the image {image} is a URL; dyvte does not download images (save it to a file)")
        if not path.is_absolute():
            raise DataError(
                f"{where}: the image path {str(image)!r} is relative; dyvte does not resolve it against the working "
                "directory (dyvte.data.sources.load_records resolves it against the records file; pass an absolute "
                "path or an image)"
            )
        if not path.is_file():
            raise DataError(f"{where}: the image {path} does not exist")
        name, image = str(path), path
    elif isinstance(image, bytes | bytearray):
        image = io.BytesIO(image)
    elif isinstance(image, Image.Image):
        name = getattr(image, "filename", "") or name
    else:
        raise DataError(f"{where}: the image must be a PIL image, a path or image bytes, got {type(image).__name__}")
    try:
        opened = image if isinstance(image, Image.Image) else Image.open(image)
        opened.load()
        rgb = to_rgb(opened)
    except IMAGE_ERRORS as error:
        raise DataError(f"{where}: cannot read the image {name}: {error}") from error
    if rgb is not opened and opened is not image:
        opened.close()  # the file dyvte opened; a caller's own image stays open
    return rgb


def records_of(batch: Sequence[dict] | dict) -> list[dict]:
    """A list of records from a list or a column-wise ``datasets`` slice (``ds[i:j]``)."""
    if isinstance(batch, dict):
        keys = list(batch)
        return [dict(zip(keys, values, strict=True)) for values in zip(*(batch[k] for k in keys), strict=True)]
    return list(batch)


def _column(dataset, key: str) -> list[Any]:
    """One field of every record (``None`` where a record lacks it), without decoding a dataset's images."""
    if isinstance(dataset, Sequence):
        return [record.get(key) for record in dataset]
    if key not in dataset.column_names:
        return [None] * len(dataset)
    return list(dataset[key])


def _has_column(dataset, key: str) -> bool:
    """Whether any record has the field ``key`` (a ``datasets.Dataset``: whether it has the column)."""
    if isinstance(dataset, Sequence):
        return any(key in record for record in dataset)
    return key in dataset.column_names


def _image_name(dataset, index: int) -> str | None:
    """Best effort, for messages: the path of a ``datasets.Dataset`` record's undecodable image."""
    if not hasattr(dataset, "cast_column"):
        return None
    import datasets  # only reached with a datasets.Dataset in hand

    try:
        image = dataset.cast_column("image", datasets.Image(decode=False))[index]["image"]
    except Exception:  # only a message detail: never mask the decoding error
        return None
    return image.get("path") if isinstance(image, Mapping) else None


def iter_batches(dataset, batch_size: int, answers: bool | None = None, processor: Any = None) -> Iterator[list[dict]]:
    """Yield lists of records of at most ``batch_size`` from a ``datasets.Dataset`` or a sequence of records.

    Before the first batch, every record's question (and answer, see ``answers``) is checked, so that a bad record
    fails before any model work; an image that cannot be decoded fails with its record index.

    Args:
        dataset: a ``datasets.Dataset`` or a sequence of record mappings.
        batch_size: records per batch.
        answers: ``True``: every record needs a gold answer; ``None``: answers are checked where given (not
            ``None``); ``False``: answers are not checked.
        processor: the model's processor: when given, no question, checked answer or earlier turn may contain the
            text of one of its special tokens (:func:`dyvte.data.prompts.special_texts`, e.g. ``<image>``).

    Raises:
        DataError: the dataset is empty, or a record's question / answer / image is bad, or holds a special token's
            text (the message names the record and, for special text, the token).
    """
    if len(dataset) == 0:
        raise DataError("the dataset is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    specials = special_texts(processor) if processor is not None else ()
    for i, question in enumerate(_column(dataset, "question")):
        check_question(question, f"record {i}")
        check_special_text(question, f"record {i}, the question", specials)
    if answers is not False:
        for i, answer in enumerate(_column(dataset, "answer")):
            if answers or answer is not None:
                check_answer(answer, f"record {i}")
                check_special_text(answer, f"record {i}, the answer", specials)
    if specials and _has_column(dataset, "context"):
        for i, context in enumerate(_column(dataset, "context")):
            for turn in context or ():
                for text in turn.values() if isinstance(turn, Mapping) else turn:
                    check_special_text(text, f"record {i}, an earlier turn", specials)
    for start in range(0, len(dataset), batch_size):
        stop = min(start + batch_size, len(dataset))
        try:
            batch = dataset[start:stop]
        except IMAGE_ERRORS as error:  # datasets decodes images here: find the record and name it
            for i in range(start, stop):
                try:
                    dataset[i]
                except IMAGE_ERRORS as inner:
                    image = _image_name(dataset, i)
                    image = f" (image {image})" if image else ""
                    raise DataError(f"record {i}{image}: cannot decode it: {type(inner).__name__}: {inner}") from inner
            message = f"records {start}..{stop - 1}: cannot decode them: {type(error).__name__}: {error}"
            raise DataError(message) from error
        yield records_of(batch)


def _context(record: Mapping[str, Any], where: str, specials: Sequence[str] = ()) -> list[tuple[str, str]]:
    """A record's earlier turns as ``(question, answer)`` pairs (``context``: mappings or pairs; none: ``[]``), none
    holding the text of a special token (``specials``)."""
    context = record.get("context")
    if context is None:
        return []
    turns = []
    for turn in context:
        q, a = (turn.get("question"), turn.get("answer")) if isinstance(turn, Mapping) else turn
        check_question(q, f"{where}, an earlier turn")
        if not isinstance(a, str) or not a.strip():
            raise DataError(f"{where}: an earlier turn's answer is empty or not a string ({a!r})")
        for text in (q, a):
            check_special_text(text, f"{where}, an earlier turn", specials)
        turns.append((q, a))
    return turns


def _prompt(
    processor, record: Mapping[str, Any], where: str, template: str | None, specials: Sequence[str] = ()
) -> str:
    """The record's prompt (earlier turns, then its question) through :func:`dyvte.data.prompts.render_prompt`."""
    return render_prompt(processor, record["question"], _context(record, where, specials), template)


def build_inputs(
    processor,
    records: Sequence[dict],
    with_answers: bool = False,
    offset: int = 0,
    dtype: torch.dtype | None = None,
    answer_ids: Sequence[torch.Tensor] | None = None,
    prompt_template: str | None = None,
) -> dict[str, Any]:
    """Left-padded processor inputs for a batch of records.

    Args:
        processor: the model's processor (its chat template formats the prompt, unless ``prompt_template``).
        records: records with ``image`` and ``question`` (and ``answer`` when ``with_answers``).
        with_answers: append each answer and its end-of-sequence token (teacher forcing) and return ``labels``
            that are -100 everywhere but on the answer tokens.
        offset: index of the first record in its dataset (for error messages).
        dtype: cast the floating-point tensors (pixels) to this dtype, e.g. the model's.
        answer_ids: with ``with_answers``, teacher-force these token ids (one 1-D tensor per record, e.g. a
            model's own greedy answer with its end token) instead of the records' tokenized ``answer``.
        prompt_template: a format string with ``{question}`` and the image placeholder (``dyvte.data.prompts``);
        default:
            the one attached to the processor (``dyvte.data.prompts.attach_prompt_template``), else the chat template.
            Records may carry ``context``, earlier ``(question, answer)`` turns rendered before the question.

    Returns:
        The processor's tensors (``input_ids`` ``(B, T)``, ``attention_mask``, pixel tensors), plus ``labels``
        ``(B, T)`` when ``with_answers``.

    Raises:
        DataError: a record has no image or an unreadable one (relative path, missing or corrupt file), an empty
            question, or (``with_answers``) an empty answer or one the tokenizer cannot express; the processor has
            no chat template and no ``prompt_template`` was given; a prompt starts with two BOS tokens.
    """

    if prompt_template is not None:
        check_prompt_template(prompt_template, processor)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    specials = special_texts(processor)
    images, prompts = [], []
    for i, record in enumerate(records):
        where = f"record {offset + i}"
        check_question(record.get("question"), where)
        check_special_text(record.get("question"), f"{where}, the question", specials)
        if with_answers and answer_ids is None:
            check_answer(record.get("answer"), where)
            check_special_text(record.get("answer"), f"{where}, the answer", specials)
        images.append(open_image(record.get("image"), where))
    for i, record in enumerate(records):
        prompts.append(_prompt(processor, record, f"record {offset + i}", prompt_template, specials))
    limit, small = small_images(images, processor)
    warn_small(
        [images[i].size for i in small],
        [f"record {offset + i}" for i in small],
        limit,
        f"records {offset}..{offset + len(records) - 1}",
    )
    # one list per row: a processor given a flat list may read it as one row's images (Gemma3 does)
    prompt = dict(processor(images=[[image] for image in images], text=prompts, padding=True, return_tensors="pt"))
    check_single_bos(processor, prompt.get("input_ids"), prompt.get("attention_mask"), offset, prompt_template)
    if not with_answers:
        return _cast(prompt, dtype)
    if answer_ids is None:
        answer_ids = answer_token_ids(processor, records, offset)
    return teacher_force(processor, prompt, answer_ids, dtype)


def answer_token_ids(processor, records: Sequence[dict], offset: int = 0) -> list[torch.Tensor]:
    """Each record's ``answer`` as the token ids teacher forcing appends: the tokenized answer and the end token.

    Raises:
        DataError: the tokenizer has no end-of-sequence token, or cannot express an answer (no token, or an unknown
            one); the message names the record (``offset``: index of the first record in its dataset).
    """
    tokenizer = processor.tokenizer
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no end-of-sequence token to close teacher-forced answers")
    answers = []
    for i, record in enumerate(records):
        text = gold_text(record["answer"], f"record {offset + i}")  # 3.0 (pandas) is the answer "3"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids or (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids):
            raise DataError(f"record {offset + i}: the tokenizer cannot express the answer {text!r}")
        answers.append(torch.tensor([*ids, tokenizer.eos_token_id]))
    return answers


def teacher_force(
    processor, prompt: dict[str, Any], answer_ids: Sequence[torch.Tensor], dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Prompt inputs (:func:`build_inputs` without answers) with each row's ``answer_ids`` appended, re-padded on the
    left, plus ``labels`` (the answer ids, -100 elsewhere): the teacher-forced batch, without running the processor
    again (its pixel tensors are shared).

    Raises:
        ValueError: not one non-empty 1-D tensor of ids per row.
    """
    rows = prompt["input_ids"].shape[0]
    if len(answer_ids) != rows or any(a.ndim != 1 or a.numel() == 0 for a in answer_ids):
        raise ValueError("answer_ids: one non-empty 1-D tensor of token ids per record expected")
    answers = [a.to(prompt["input_ids"].device) for a in answer_ids]
    return _cast(_append_answers(prompt, answers, processor.tokenizer.pad_token_id or 0), dtype)


def _cast(inputs: dict[str, Any], dtype: torch.dtype | None) -> dict[str, Any]:
    """Floating-point tensors to ``dtype`` (ids and masks untouched)."""
    if dtype is None:
        return inputs
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


def _append_answers(prompt: dict[str, Any], answers: list[torch.Tensor], pad_id: int) -> dict[str, Any]:
    """Append answer ids after each row's prompt tokens (token level, as LLaVA trains) and re-pad on the left.

    Other per-token tensors of the processor (``token_type_ids``, ``mm_token_type_ids``, ...) get 0 for the answer
    and padding tokens; ``labels`` are the answer ids and -100 elsewhere.
    """
    ids, mask = prompt["input_ids"], prompt["attention_mask"].bool()  # (B, T)
    per_token = [k for k, v in prompt.items() if isinstance(v, torch.Tensor) and v.shape == ids.shape]
    rows = [ids[b][mask[b]].numel() + answers[b].numel() for b in range(ids.shape[0])]
    width = max(rows)
    out = {k: v for k, v in prompt.items() if k not in per_token}
    for key in [*per_token, "labels"]:
        out[key] = torch.full((ids.shape[0], width), pad_id if key == "input_ids" else 0, dtype=ids.dtype)
    out["labels"].fill_(-100)
    for b, answer in enumerate(answers):
        start = width - rows[b]
        split = width - answer.numel()
        for key in per_token:
            out[key][b, start:split] = prompt[key][b][mask[b]]
        out["input_ids"][b, split:] = answer
        out["attention_mask"][b, start:] = 1
        out["labels"][b, split:] = answer
    return out
