"""Multiple choice: ScienceQA-IMG and MMBench, answered with an option's letter.

* ScienceQA (Lu et al., NeurIPS 2022), the IMG subset (questions with an image) LLaVA-1.5 reports. Record layout:
  the HF ``datasets`` release ``lmms-lab/ScienceQA`` (config ``ScienceQA-IMG``) that lmms-eval's ``scienceqa_img``
  task reads: ``question``, ``choices`` (list of strings), ``answer`` (the correct choice's index), ``hint`` (the
  context, may be empty), ``image`` (rows without an image are not IMG questions: skipped, counted in the log).
* MMBench (Liu et al., "MMBench: Is Your Multi-modal Model an All-around Player?", ECCV 2024). Record layout: the HF
  ``datasets`` release ``lmms-lab/MMBench`` (config ``en``) that lmms-eval's ``mmbench_en`` task reads: ``index``,
  ``question``, ``hint``, ``A``, ``B``, ``C``, ``D`` (and ``E`` where present; empty options are left out),
  ``answer`` (a letter), ``image``, ``category``. MMBench's circular evaluation is built here, as LLaVA-1.5's
  MMBench script does with ``--all-rounds``: a question with N options is asked N times, its options shifted by
  0..N-1 places (the answer's letter moves with them); it counts as right only if every shift is answered right.
  ``index`` must therefore be unique per question.

Prompt (LLaVA-1.5's, also lmms-eval's): ``Context: {hint}\\n`` (ScienceQA) or ``{hint}\\n`` (MMBench) when there is a
hint, the question, one ``X. option`` line per option, then :data:`MC_PROMPT`.

Letter extraction (:func:`extract_letter`), from the prediction: the whole answer is one option letter (``B``,
``(b)``, ``B.``); or it starts with a letter followed by ``.``, ``)`` or ``:`` (``A. cat``, ``(C) dog``); or it says
``answer is X``. Anything else, or a letter that is no option, is unparseable and wrong (counted).
"""

from __future__ import annotations

import logging
import math
import re
import string
from collections import defaultdict
from pathlib import Path
from typing import Any

from dyvte.eval.scorers.records import Loaded, check_image, read_rows, with_prompt

__all__ = ["MC_PROMPT", "extract_letter", "read_mmbench", "read_scienceqa", "score_choice", "score_mmbench"]

log = logging.getLogger(__name__)

#: LLaVA-1.5's instruction for multiple-choice benchmarks (ScienceQA, MMBench)
MC_PROMPT = "Answer with the option's letter from the given choices directly."
LETTERS = string.ascii_uppercase
MMBENCH_OPTIONS = ("A", "B", "C", "D", "E")


def extract_letter(prediction: str, options: int) -> str | None:
    """The option letter a prediction gives (module docstring), upper case, or ``None``."""
    text = prediction.strip()
    valid = LETTERS[:options]
    bare = text.strip("()[]. :").upper()
    if len(bare) == 1:
        return bare if bare in valid else None
    found = re.match(r"\(?([A-Za-z])[.):](\s|$)", text) or re.search(r"answer is:?\s*\(?([A-Za-z])\b", text, re.I)
    if found is None:
        return None
    letter = found.group(1).upper()
    return letter if letter in valid else None


def _prompt(hint: str, question: str, options: list[str], prompt: str) -> str:
    lines = [hint, question] if hint else [question]
    lines += [f"{LETTERS[k]}. {option}" for k, option in enumerate(options)]
    return with_prompt("\n".join(lines), prompt)


def _text(value: Any) -> str:
    """A cell as text: ``None``, NaN and blank cells are ``""`` (pandas writes NaN for MMBench's empty options)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def read_scienceqa(path: str | Path, prompt: str = MC_PROMPT) -> Loaded:
    """ScienceQA-IMG records (module docstring); ``qtype`` is ``scienceqa``.

    Raises:
        ValueError: a missing column, choices that are not a list of 2..26 strings, an answer index out of range, or
            no row with an image.
    """
    rows = read_rows(path, ("question", "choices", "answer", "hint", "image"), "scienceqa")
    records, gold = [], []
    skipped = 0
    for i, row in enumerate(rows):
        where = f"scienceqa row {i}"
        if row["image"] is None:
            skipped += 1
            continue
        choices, answer = row["choices"], row["answer"]
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
            raise ValueError(f"{where}: choices must be a list of 2..26 options, got {choices!r}")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"{where}: answer must be the index of a choice (0..{len(choices) - 1}), got {answer!r}")
        hint = _text(row["hint"])
        records.append(
            {
                "image": check_image(row["image"], where),
                "question": _prompt(f"Context: {hint}" if hint else "", row["question"], list(choices), prompt),
                "answer": LETTERS[answer],
                "qtype": "scienceqa",
            }
        )
        gold.append({"letter": LETTERS[answer], "options": len(choices)})
    if skipped:
        log.info("scienceqa: %d rows without an image skipped (not in the IMG subset)", skipped)
    if not records:
        raise ValueError(f"--data {path}: no scienceqa row has an image (the IMG subset is empty)")
    return Loaded("scienceqa", records, gold, prompt)


def read_mmbench(path: str | Path, prompt: str = MC_PROMPT) -> Loaded:
    """MMBench records with their circular shifts (module docstring); ``qtype`` is the category.

    Raises:
        ValueError: a missing column, a repeated ``index``, fewer than 2 options, or an answer that is not one of
            the row's option letters.
    """
    rows = read_rows(path, ("index", "question", "hint", "A", "B", "C", "D", "answer", "image", "category"), "mmbench")
    records, gold = [], []
    seen: set[Any] = set()
    for i, row in enumerate(rows):
        where = f"mmbench row {i} (index {row['index']})"
        if row["index"] in seen:
            raise ValueError(f"{where}: index repeats; the circular shifts are built here, one row per question")
        seen.add(row["index"])
        options = [_text(row.get(letter)) for letter in MMBENCH_OPTIONS]
        options = [o for o in options if o]
        if len(options) < 2:
            raise ValueError(f"{where}: fewer than 2 non-empty options")
        answer = _text(row["answer"]).upper()
        if answer not in LETTERS[: len(options)]:
            raise ValueError(f"{where}: answer {row['answer']!r} is not one of its options' letters")
        image = check_image(row["image"], where)
        for shift in range(len(options)):
            shifted = options[shift:] + options[:shift]
            letter = LETTERS[(LETTERS.index(answer) - shift) % len(options)]
            records.append(
                {
                    "image": image,
                    "question": _prompt(_text(row["hint"]), row["question"], shifted, prompt),
                    "answer": letter,
                    "qtype": str(row["category"]),
                }
            )
            gold.append({"letter": letter, "options": len(options), "question": row["index"], "shift": shift})
    return Loaded("mmbench", records, gold, prompt)


def score_choice(loaded: Loaded, predictions: list[str]) -> dict[str, float]:
    """``accuracy`` (share of rows whose extracted letter is the gold one), ``unparsed``, ``samples``."""
    letters = [extract_letter(p, g["options"]) for p, g in zip(predictions, loaded.gold, strict=True)]
    right = [letter == g["letter"] for letter, g in zip(letters, loaded.gold, strict=True)]
    return {"accuracy": sum(right) / len(right), "unparsed": letters.count(None), "samples": len(right)}


def score_mmbench(loaded: Loaded, predictions: list[str]) -> dict[str, Any]:
    """``circular``: share of questions with every shift right; ``single``: share right at shift 0 (no circular
    evaluation); ``per_category``: the circular accuracy per category; ``unparsed``, ``questions``, ``samples``."""
    flat = score_choice(loaded, predictions)
    ok: dict[Any, bool] = {}
    single: dict[Any, bool] = {}
    category: dict[Any, str] = {}
    for pred, gold, record in zip(predictions, loaded.gold, loaded.records, strict=True):
        right = extract_letter(pred, gold["options"]) == gold["letter"]
        ok[gold["question"]] = ok.get(gold["question"], True) and right
        if gold["shift"] == 0:
            single[gold["question"]] = right
        category[gold["question"]] = record["qtype"]
    per: dict[str, list[bool]] = defaultdict(list)
    for question, right in ok.items():
        per[category[question]].append(right)
    return {
        "circular": sum(ok.values()) / len(ok),
        "single": sum(single.values()) / len(single),
        "per_category": {c: sum(v) / len(v) for c, v in sorted(per.items())},
        "unparsed": flat["unparsed"],
        "questions": len(ok),
        "samples": flat["samples"],
    }
