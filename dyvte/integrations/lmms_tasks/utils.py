"""The functions ``dyvte_demo.yaml`` names (``!function utils.NAME``; lmms-eval imports this file by its path).

A document is a dyvte record (``image``, ``question``, ``answer``, optionally ``qtype``): the question is the prompt
text as it is (no pre- or post-prompt: dyvte's harness adds none) and the score is dyvte's exact match, so that
lmms-eval's accuracy on these records is the harness's.
"""

from __future__ import annotations

from typing import Any

from dyvte.data.answers import gold_text, normalize_answer


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    """The record's one image (a PIL image, as ``datasets`` decodes it)."""
    return [doc["image"]]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    """The record's question, unchanged."""
    return doc["question"]


def doc_to_target(doc: dict[str, Any]) -> str:
    """The record's gold answer as text (``3`` and ``3.0`` give ``"3"``)."""
    return gold_text(doc["answer"], "the lmms-eval document")


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """``exact_match``: 1.0 when the answer equals the gold answer in :func:`normalize_answer` form, else 0.0."""
    predicted = normalize_answer(results[0])
    return {"exact_match": float(predicted == normalize_answer(doc_to_target(doc)))}
