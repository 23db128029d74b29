"""MME (Fu et al., "MME: A Comprehensive Evaluation Benchmark for Multimodal Large Language Models", 2023): two
yes/no questions per image, scored per subtask by acc and acc+.

Record layout: the HF ``datasets`` release ``lmms-lab/MME`` that lmms-eval's ``mme`` task reads: ``question_id``
(the image's file name, e.g. ``code_reasoning/0020.png``: it names the image whose two questions form a pair),
``image``, ``question``, ``answer`` (``Yes``/``No``), ``category`` (the subtask). Prompt: LLaVA-1.5's: the trailing
" Please answer yes or no." of MME's questions is replaced by :data:`dyvte.eval.scorers.vqa.SHORT_ANSWER` on a new
line (as lmms-eval's ``mme`` task does).

Scoring (MME's definition), per subtask: acc = 100 x correct questions / questions; acc+ = 100 x images with every
question right / images; score = acc + acc+ (at most 200). Perception = the sum of the scores of the 10 perception
subtasks present, cognition = the sum of the 4 cognition subtasks present (:data:`PERCEPTION`, :data:`COGNITION`);
the full benchmark's maxima are 2000 and 800. Answers are read as yes/no from their first word
(:func:`dyvte.eval.scorers.records.yes_no`); anything else is wrong.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from dyvte.eval.scorers.records import Loaded, check_image, check_label, read_rows, with_prompt, yes_no
from dyvte.eval.scorers.vqa import SHORT_ANSWER

__all__ = ["COGNITION", "PERCEPTION", "read_mme", "score_mme"]

log = logging.getLogger(__name__)

PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
#: MME's own instruction, replaced by LLaVA-1.5's
MME_SUFFIX = "Please answer yes or no."


def read_mme(path: str | Path, prompt: str = SHORT_ANSWER) -> Loaded:
    """MME records (module docstring); ``qtype`` is the subtask.

    Raises:
        ValueError: a missing column, an answer other than yes/no (any case), a subtask MME does not have, no image.
    """
    rows = read_rows(path, ("question_id", "image", "question", "answer", "category"), "mme")
    records, gold = [], []
    per_image: dict[tuple[str, str], int] = defaultdict(int)
    for i, row in enumerate(rows):
        where = f"mme row {i} (question_id {row['question_id']})"
        label = check_label(row["answer"], where)
        if row["category"] not in PERCEPTION + COGNITION:
            raise ValueError(
                f"{where}: category {row['category']!r} is not an MME subtask ({', '.join(PERCEPTION)}; "
                f"{', '.join(COGNITION)})"
            )
        question = row["question"].strip()
        if prompt and question.endswith(MME_SUFFIX):
            question = question[: -len(MME_SUFFIX)].rstrip()
        records.append(
            {
                "image": check_image(row["image"], where),
                "question": with_prompt(question, prompt),
                "answer": label,
                "qtype": row["category"],
            }
        )
        key = (row["category"], str(row["question_id"]))
        per_image[key] += 1
        gold.append({"label": label, "subtask": row["category"], "image": key[1]})
    unpaired = sum(n != 2 for n in per_image.values())
    if unpaired:
        log.warning("mme: %d of %d images do not have exactly two questions (MME pairs them)", unpaired, len(per_image))
    return Loaded("mme", records, gold, prompt)


def score_mme(loaded: Loaded, predictions: list[str]) -> dict[str, dict[str, float] | float]:
    """Per subtask present: acc, acc_plus, score, questions, images, unparsed (answers neither yes nor no);
    ``"perception"`` and ``"cognition"``: the totals over the subtasks present, and which of the 10 / 4 those are."""
    right: dict[str, list[bool]] = defaultdict(list)
    unparsed: dict[str, int] = defaultdict(int)
    images: dict[str, dict[str, bool]] = defaultdict(dict)
    for pred, gold in zip(predictions, loaded.gold, strict=True):
        said = yes_no(pred)
        ok = said == gold["label"]
        unparsed[gold["subtask"]] += said is None
        right[gold["subtask"]].append(ok)
        seen = images[gold["subtask"]]
        seen[gold["image"]] = seen.get(gold["image"], True) and ok
    out: dict[str, dict[str, float] | float] = {}
    for subtask in PERCEPTION + COGNITION:
        if subtask in right:
            acc = 100 * sum(right[subtask]) / len(right[subtask])
            plus = 100 * sum(images[subtask].values()) / len(images[subtask])
            out[subtask] = {
                "acc": acc,
                "acc_plus": plus,
                "score": acc + plus,
                "questions": len(right[subtask]),
                "images": len(images[subtask]),
                "unparsed": unparsed[subtask],
            }
    for name, group in (("perception", PERCEPTION), ("cognition", COGNITION)):
        present = [s for s in group if s in out]
        out[name] = {"total": sum(out[s]["score"] for s in present), "subtasks": len(present), "of": len(group)}
    return out
