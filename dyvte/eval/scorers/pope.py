"""POPE (Li et al., "Evaluating Object Hallucination in Large Vision-Language Models", EMNLP 2023): yes/no object
probes scored per negative-sampling split (``random``, ``popular``, ``adversarial``).

Record layout: the HF ``datasets`` release ``lmms-lab/POPE`` that lmms-eval's ``pope`` task reads: ``question_id``,
``question`` ("Is there a {object} in the image?"), ``answer`` (``yes``/``no``), ``image_source``, ``image``,
``category`` (the split). Prompt: LLaVA-1.5's, the question then :data:`dyvte.eval.scorers.vqa.SHORT_ANSWER`.

Scoring, per split and over all rows: a prediction is read as yes or no from its first word
(:func:`dyvte.eval.scorers.records.yes_no`); "yes" is the positive class. accuracy = correct / rows; precision =
TP / predicted yes; recall = TP / labelled yes; F1 = their harmonic mean; yes-ratio = predicted yes / rows. An
answer that starts with neither word ("unparsed", counted) is wrong and is neither a yes nor a no prediction.
A ratio whose denominator is 0 is 0.
"""

from __future__ import annotations

from pathlib import Path

from dyvte.eval.scorers.records import Loaded, check_image, check_label, read_rows, with_prompt, yes_no
from dyvte.eval.scorers.vqa import SHORT_ANSWER

__all__ = ["SPLITS", "read_pope", "score_pope", "yes_no_metrics"]

SPLITS = ("random", "popular", "adversarial")


def read_pope(path: str | Path, prompt: str = SHORT_ANSWER) -> Loaded:
    """POPE records (module docstring); ``qtype`` is the split.

    Raises:
        ValueError: a missing column, an answer other than yes/no, a split other than :data:`SPLITS`, no image.
    """
    rows = read_rows(path, ("question_id", "question", "answer", "image_source", "image", "category"), "pope")
    records, gold = [], []
    for i, row in enumerate(rows):
        where = f"pope row {i} (question_id {row['question_id']})"
        label = check_label(row["answer"], where)
        if row["category"] not in SPLITS:
            raise ValueError(f"{where}: category {row['category']!r} is not a POPE split ({', '.join(SPLITS)})")
        records.append(
            {
                "image": check_image(row["image"], where),
                "question": with_prompt(row["question"], prompt),
                "answer": label,
                "qtype": row["category"],
            }
        )
        gold.append({"label": label, "split": row["category"]})
    return Loaded("pope", records, gold, prompt)


def yes_no_metrics(labels: list[str], predictions: list[str | None]) -> dict[str, float]:
    """accuracy, precision, recall, f1, yes_ratio, unparsed and samples of yes/no ``predictions`` (``None``:
    unparsed) against ``labels``."""

    def ratio(a: int, b: int) -> float:
        return a / b if b else 0.0

    pairs = list(zip(labels, predictions, strict=True))
    tp = sum(label == "yes" and pred == "yes" for label, pred in pairs)
    said_yes = sum(pred == "yes" for _, pred in pairs)
    labelled_yes = sum(label == "yes" for label, _ in pairs)
    correct = sum(label == pred for label, pred in pairs)
    precision, recall = ratio(tp, said_yes), ratio(tp, labelled_yes)
    return {
        "accuracy": ratio(correct, len(pairs)),
        "precision": precision,
        "recall": recall,
        "f1": ratio(2 * precision * recall, precision + recall),
        "yes_ratio": ratio(said_yes, len(pairs)),
        "unparsed": sum(pred is None for _, pred in pairs),
        "samples": len(pairs),
    }


def score_pope(loaded: Loaded, predictions: list[str]) -> dict[str, dict[str, float]]:
    """Per split present (and ``"all"``): :func:`yes_no_metrics`; ``"mean"``: the splits' mean accuracy and F1."""
    parsed = [yes_no(p) for p in predictions]
    out: dict[str, dict[str, float]] = {}
    for split in SPLITS:
        rows = [i for i, g in enumerate(loaded.gold) if g["split"] == split]
        if rows:
            out[split] = yes_no_metrics([loaded.gold[i]["label"] for i in rows], [parsed[i] for i in rows])
    out["all"] = yes_no_metrics([g["label"] for g in loaded.gold], parsed)
    splits = [out[s] for s in SPLITS if s in out]
    out["mean"] = {key: sum(s[key] for s in splits) / len(splits) for key in ("accuracy", "f1")}
    return out
