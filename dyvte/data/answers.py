"""Answers: how a gold value becomes text and how a prediction is compared with it, written down once.

Every place that compares a prediction to a gold answer (the evaluation harness) or turns a gold value into text (the
records readers, teacher forcing in :func:`dyvte.data.records.build_inputs` and so the exit-head labels, the LLaVA
export) goes through this module.

* :func:`gold_text`: a gold value as text. Strings stay as written; an integer, or a float with an integral value
  (``3.0``: pandas stores an int column with a missing value as float64) becomes ``"3"``; other floats their
  shortest form (``0.5``). ``None``, NaN (pandas' missing value), infinities, lists, empty or punctuation-only
  answers are a :class:`DataError` naming the record, never the text ``"nan"``; so is a bool (``True`` is no answer
  text: write ``"yes"``).
* :func:`normalize_answer`: the exact-match form. The first line, lower-cased, runs of whitespace made one space,
  the punctuation ``.,;:!?"'`` and spaces stripped at both ends; then a number (``3``, ``3.0``, ``+3``, ``3.``,
  ``.5``, ``1e3``) is written in one canonical form (``3``, ``3``, ``3``, ``3``, ``0.5``, ``1000``), so numbers
  compare as numbers.
* :func:`answers_match`: ``normalize_answer(prediction) == normalize_answer(gold)``.
"""

from __future__ import annotations

import math
import numbers
import re
from decimal import Decimal, InvalidOperation
from typing import Any

from dyvte.data.errors import DataError

__all__ = ["answers_match", "gold_text", "normalize_answer"]

#: stripped at both ends of an answer (a sentence's punctuation, quotes)
PUNCTUATION = " .,;:!?\"'"
#: a plain decimal number, optionally signed, with an exponent (no "nan", "inf", "1_000", "1,000")
NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?")
#: numbers beyond this decimal exponent keep their text (writing them out would be huge)
MAX_EXPONENT = 100


def gold_text(answer: Any, where: str) -> str:
    """A gold answer as text (the module's rule: ``3`` and ``3.0`` give ``"3"``; strings as written).

    Args:
        answer: the record's ``answer``: a string or a number.
        where: the record, for the message (e.g. ``"records.parquet, record 3"``).

    Raises:
        DataError: the answer is missing (``None`` or NaN), an infinity, not a string or number, empty / whitespace
            only, or empty once normalized (only punctuation: no prediction could match it).
    """
    if answer is None or (isinstance(answer, numbers.Real) and math.isnan(answer)):
        raise DataError(
            f"{where} has no answer ({answer!r}: a missing value; pandas writes NaN for an empty cell of a number "
            "column)"
        )
    if isinstance(answer, bool):  # an Integral, but True is no answer text ("1"? "yes"?)
        raise DataError(f"{where}: the answer is the bool {answer!r}; write the answer text (e.g. 'yes')")
    if isinstance(answer, str):
        text = answer
    elif isinstance(answer, numbers.Integral):
        text = str(int(answer))
    elif isinstance(answer, numbers.Real):
        if math.isinf(answer):
            raise DataError(f"{where}: the answer is {answer!r}, not a number anyone can answer")
        value = float(answer)
        text = str(int(value)) if value.is_integer() else repr(value)
    else:
        raise DataError(f"{where}: the answer must be a string, got {type(answer).__name__} {answer!r}")
    if not text.strip():
        raise DataError(f"{where}: the answer is empty ({answer!r}): there is nothing to score or to learn")
    if not normalize_answer(text):
        raise DataError(
            f"{where}: the answer {answer!r} is empty once normalized (exact match compares normalize_answer forms)"
        )
    return text


def normalize_answer(text: str) -> str:
    """The exact-match form of an answer (see the module docstring): first line, lower case, one space between
    words, punctuation stripped at the ends, numbers in one canonical form."""
    text = re.sub(r"\s+", " ", text.strip().split("\n", 1)[0].lower())
    stripped = text.strip(PUNCTUATION)
    for candidate in (text.strip(PUNCTUATION.replace(".", "")), stripped):  # ".5" and "3." are numbers too
        number = _canonical_number(candidate)
        if number is not None:
            return number
    return stripped


def _canonical_number(text: str) -> str | None:
    """``text`` as a canonical number (integral: ``"3"``; else the shortest decimal), or ``None`` if not one."""
    if not NUMBER.fullmatch(text):
        return None
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    if abs(value.adjusted()) > MAX_EXPONENT:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def answers_match(prediction: str, gold: Any) -> bool:
    """Whether a predicted answer equals a gold answer in :func:`normalize_answer` form (numbers as numbers).

    ``gold`` may be a number (turned into text by :func:`gold_text`).
    """
    return normalize_answer(prediction) == normalize_answer(gold_text(gold, "the gold answer"))
