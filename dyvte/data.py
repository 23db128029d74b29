"""(image, question, answer) records -> model inputs, through the processor's own chat template.

Used by calibration, the evaluation harness and exit-head training. A record is a mapping with ``image`` (a PIL
image), ``question`` (str) and optionally ``answer`` (str) and ``qtype`` (str).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch

__all__ = ["DataError", "build_inputs", "iter_batches", "normalize_answer", "records_of"]


class DataError(ValueError):
    """A dataset or record cannot be used (the message says which and why)."""


def records_of(batch: Sequence[dict] | dict) -> list[dict]:
    """A list of records from a list or a column-wise ``datasets`` slice (``ds[i:j]``)."""
    if isinstance(batch, dict):
        keys = list(batch)
        return [dict(zip(keys, values, strict=True)) for values in zip(*(batch[k] for k in keys), strict=True)]
    return list(batch)


def iter_batches(dataset, batch_size: int) -> Iterator[list[dict]]:
    """Yield lists of records of at most ``batch_size`` from a ``datasets.Dataset`` or a sequence of records."""
    if len(dataset) == 0:
        raise DataError("the dataset is empty")
    for start in range(0, len(dataset), batch_size):
        yield records_of(dataset[start : start + batch_size])


def _prompt(processor, question: str) -> str:
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


def build_inputs(
    processor, records: Sequence[dict], with_answers: bool = False, offset: int = 0, dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Left-padded processor inputs for a batch of records.

    Args:
        processor: the model's processor (its chat template formats the prompt).
        records: records with ``image`` and ``question`` (and ``answer`` when ``with_answers``).
        with_answers: append each answer and its end-of-sequence token (teacher forcing) and return ``labels``
            that are -100 everywhere but on the answer tokens.
        offset: index of the first record in its dataset (for error messages).
        dtype: cast the floating-point tensors (pixels) to this dtype, e.g. the model's.

    Returns:
        The processor's tensors (``input_ids`` ``(B, T)``, ``attention_mask``, pixel tensors), plus ``labels``
        ``(B, T)`` when ``with_answers``.

    Raises:
        DataError: a record has no image, or an answer the tokenizer cannot express.
    """
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    images, prompts = [], []
    for i, record in enumerate(records):
        if record.get("image") is None:
            raise DataError(f"record {offset + i} has no image: dyvte evaluates image-question pairs")
        images.append(record["image"])
        prompts.append(_prompt(processor, record["question"]))
    if not with_answers:
        return _cast(dict(processor(images=images, text=prompts, padding=True, return_tensors="pt")), dtype)
    prompt = dict(processor(images=images, text=prompts, padding=True, return_tensors="pt"))
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no end-of-sequence token to close teacher-forced answers")
    answers = []
    for i, record in enumerate(records):
        ids = tokenizer(str(record["answer"]), add_special_tokens=False)["input_ids"]
        if not ids or (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids):
            raise DataError(f"record {offset + i}: the tokenizer cannot express the answer {record['answer']!r}")
        answers.append(torch.tensor([*ids, tokenizer.eos_token_id]))
    return _cast(_append_answers(prompt, answers, tokenizer.pad_token_id or 0), dtype)


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


def normalize_answer(text: str) -> str:
    """Lower-case, first line, punctuation at the ends and repeated spaces removed: the exact-match form."""
    text = text.strip().split("\n", 1)[0].lower()
    text = re.sub(r"\s+", " ", text)
    return text.strip(" .,;:!?\"'")
