"""VQAv2, TextVQA and GQA: open answers scored by the VQA accuracy or by exact match (:mod:`.normalize`).

Record layouts (the HF ``datasets`` parquet columns the lmms-eval task loaders read; lmms-eval ``tasks/vqav2``,
``tasks/textvqa``, ``tasks/gqa``):

* VQAv2 (``lmms-lab/VQAv2``): ``question_id``, ``question``, ``image``, ``answers``: a list of 10
  ``{"answer", "answer_confidence", "answer_id"}`` (also ``multiple_choice_answer``, ``question_type``, ... unused).
* TextVQA (``lmms-lab/textvqa``): ``question_id``, ``question``, ``image``, ``answers``: a list of 10 strings (also
  ``ocr_tokens``, ``image_classes``, ... unused: the prompt does not add OCR tokens).
* GQA (``lmms-lab/GQA``, whose images sit in a separate config keyed by ``imageId``): one file with ``id``,
  ``question``, ``answer`` and ``image`` (the instructions joined with their images).

Prompt: LLaVA-1.5's short-answer instruction, :data:`SHORT_ANSWER`, on a new line after the question.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from dyvte.eval.scorers.normalize import exact_match, normalize_vqa, vqa_accuracy
from dyvte.eval.scorers.records import Loaded, check_image, read_rows, with_prompt

__all__ = ["SHORT_ANSWER", "read_gqa", "read_textvqa", "read_vqav2", "score_gqa", "score_vqa"]

#: LLaVA-1.5's instruction for short-answer benchmarks (its VQAv2, GQA, TextVQA, POPE and MME prompts)
SHORT_ANSWER = "Answer the question using a single word or phrase."


def _answer_text(answer: Any, where: str, dicts: bool) -> str:
    """One human answer: a ``{"answer": ...}`` dict (VQAv2) or a string (TextVQA)."""
    text = answer.get("answer") if dicts and isinstance(answer, dict) else answer if not dicts else None
    if not isinstance(text, str):
        wanted = 'an {"answer": ...} dict' if dicts else "a string"
        raise ValueError(f"{where}: an entry of answers is {answer!r}, not {wanted}")
    return text


def _read_multi(path: str | Path, benchmark: str, prompt: str, dicts: bool) -> Loaded:
    rows = read_rows(path, ("question_id", "question", "image", "answers"), benchmark)
    records, gold = [], []
    for i, row in enumerate(rows):
        where = f"{benchmark} row {i} (question_id {row['question_id']})"
        answers = row["answers"]
        if not isinstance(answers, list) or len(answers) < 2:
            raise ValueError(f"{where}: answers must be a list of the human answers (10), got {answers!r}")
        texts = [_answer_text(a, where, dicts) for a in answers]
        majority = Counter(normalize_vqa(t) for t in texts).most_common(1)[0][0] or texts[0]
        records.append(
            {
                "image": check_image(row["image"], where),
                "question": with_prompt(row["question"], prompt),
                "answer": majority,
                "qtype": benchmark,
            }
        )
        gold.append({"answers": texts, "question_id": row["question_id"]})
    return Loaded(benchmark, records, gold, prompt)


def read_vqav2(path: str | Path, prompt: str = SHORT_ANSWER) -> Loaded:
    """VQAv2 records (module docstring): ``answers`` is a list of ``{"answer", ...}`` dicts."""
    return _read_multi(path, "vqav2", prompt, dicts=True)


def read_textvqa(path: str | Path, prompt: str = SHORT_ANSWER) -> Loaded:
    """TextVQA records (module docstring): ``answers`` is a list of strings."""
    return _read_multi(path, "textvqa", prompt, dicts=False)


def read_gqa(path: str | Path, prompt: str = SHORT_ANSWER) -> Loaded:
    """GQA records (module docstring): one ``answer`` per question."""
    rows = read_rows(path, ("question", "answer", "image"), "gqa")
    records, gold = [], []
    for i, row in enumerate(rows):
        where = f"gqa row {i}"
        if not isinstance(row["answer"], str) or not row["answer"].strip():
            raise ValueError(f"{where}: the answer must be a non-empty string, got {row['answer']!r}")
        records.append(
            {
                "image": check_image(row["image"], where),
                "question": with_prompt(row["question"], prompt),
                "answer": row["answer"],
                "qtype": "gqa",
            }
        )
        gold.append({"answer": row["answer"]})
    return Loaded("gqa", records, gold, prompt)


def score_vqa(loaded: Loaded, predictions: list[str]) -> dict[str, float]:
    """``{"accuracy": mean VQA accuracy, "samples": n}`` (accuracy as a fraction; papers print it x100)."""
    scores = [vqa_accuracy(p, g["answers"]) for p, g in zip(predictions, loaded.gold, strict=True)]
    return {"accuracy": sum(scores) / len(scores), "samples": len(scores)}


def score_gqa(loaded: Loaded, predictions: list[str]) -> dict[str, float]:
    """``{"accuracy": exact-match share after VQA normalization, "samples": n}``."""
    hits = [exact_match(p, g["answer"]) for p, g in zip(predictions, loaded.gold, strict=True)]
    return {"accuracy": sum(hits) / len(hits), "samples": len(hits)}
