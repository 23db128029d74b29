"""VQA answer normalization and the VQA accuracy, written from their published definitions.

The definitions: Antol et al., "VQA: Visual Question Answering" (ICCV 2015), and the evaluation section of the VQA
challenge page (visualqa.org/evaluation.html), which the official evaluation script implements:

* an answer is compared after normalization: lower case; newlines and tabs become spaces; punctuation is handled as
  the official script does: each of the marks ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it
  touches a space anywhere in the answer (or the answer holds a digit-comma-digit group such as ``1,000``) and
  otherwise becomes a space (``x-ray`` -> ``x ray``); a period is deleted unless a digit follows it (``2.5`` stays);
  then, word by word, number words ``none``/``zero``..``ten`` become digits, the articles ``a``, ``an``, ``the``
  are dropped and apostrophe-less contractions get their apostrophe (``dont`` -> ``don't``);
* the accuracy of an answer against the 10 human answers of a question is ``min(#humans who gave it / 3, 1)``,
  averaged over the 10 subsets of 9 of the 10 humans (each subset leaves one human out).

GQA (Hudson & Manning 2019) scores exact match; here after the same normalization. TextVQA (Singh et al. 2019) uses
the VQA accuracy over its 10 answers. This module is our own code; no line is taken from the official scripts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["exact_match", "normalize_vqa", "vqa_accuracy"]

#: marks the official script deletes or turns into a space (the period is handled on its own)
MARKS = ';/[]"{}()=+\\_-><@`,?!'
#: a digit-comma-digit group ("1,000"): when present, every mark is deleted rather than spaced
DIGIT_COMMA = re.compile(r"\d,\d")
#: a period that no digit follows
LONE_PERIOD = re.compile(r"\.(?!\d)")
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
#: apostrophe-less spellings of common contractions -> the spelling the annotations use
CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldnt": "couldn't",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hes": "he's",
    "im": "i'm",
    "isnt": "isn't",
    "ive": "i've",
    "lets": "let's",
    "shes": "she's",
    "shouldnt": "shouldn't",
    "thats": "that's",
    "theres": "there's",
    "theyre": "they're",
    "wasnt": "wasn't",
    "werent": "weren't",
    "whats": "what's",
    "wheres": "where's",
    "wont": "won't",
    "wouldnt": "wouldn't",
    "youre": "you're",
}


def _punctuation(text: str) -> str:
    """The official punctuation rule (module docstring): marks deleted or spaced, lone periods deleted."""
    delete_all = DIGIT_COMMA.search(text) is not None
    for mark in MARKS:
        if mark not in text:
            continue
        touches_space = f"{mark} " in text or f" {mark}" in text
        text = text.replace(mark, "" if touches_space or delete_all else " ")
    return LONE_PERIOD.sub("", text)


def normalize_vqa(answer: str) -> str:
    """An answer in the VQA evaluation's normal form (module docstring), e.g. ``"Two dogs."`` -> ``"2 dogs"``,
    ``"The cat"`` -> ``"cat"``, ``"dont know"`` -> ``"don't know"``."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    words = []
    for word in _punctuation(text).split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VQA accuracy of ``prediction`` against the human ``answers`` (normally 10): the mean over the subsets that
    leave one human out of ``min(#matching answers in the subset / 3, 1)``, all normalized by :func:`normalize_vqa`.

    With 10 answers of which k match: k = 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.0.

    Raises:
        ValueError: fewer than 2 answers (no subset leaves one out and keeps one).
    """
    if len(answers) < 2:
        raise ValueError(f"the VQA accuracy needs at least 2 human answers, got {len(answers)}")
    pred = normalize_vqa(prediction)
    same = [normalize_vqa(a) == pred for a in answers]
    matches = sum(same)
    return sum(min((matches - s) / 3, 1.0) for s in same) / len(same)


def exact_match(prediction: str, answer: str) -> bool:
    """GQA's exact match: equal after :func:`normalize_vqa`."""
    return normalize_vqa(prediction) == normalize_vqa(answer)
