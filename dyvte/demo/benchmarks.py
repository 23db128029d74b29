"""Benchmark-shaped sets built from the demo's own test scenes: a POPE-style object probe and an MME-style paired
question set, in the POPE and MME parquet layouts (``dyvte.eval.scorers.pope`` / ``.mme`` read them).

Only the test split's scenes are used (handwriting the demo model never saw in training or validation), so the
numbers are held out. Questions are worded in the demo's closed vocabulary (its word-level tokenizer knows no other
words), e.g. ``is there a 3 ?`` rather than POPE's "Is there a 3 in the image?".

* POPE (Li et al. 2023): per scene, k = min(3, digits present, digits absent) yes-questions about present digits and
  k no-questions about absent digits chosen three ways, one per split: ``random`` (uniformly among the absent),
  ``popular`` (the absent digits present in most scenes of the set), ``adversarial`` (the absent digits that co-occur
  most often with the scene's own digits). Balanced yes/no by construction.
* MME (Fu et al. 2023): per scene, one yes- and one no-question per subtask, MME's subtask names where they fit:
  ``existence`` (``is there a 7 ?``), ``count`` (``are there 4 digits ?``), ``position``
  (``is there a 7 in row 2 column 3 ?``) and, for cognition, ``numerical_calculation``
  (``is 12 the sum of row 2 ?``). Only ``existence`` is a question type the demo model was trained on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dyvte.demo.data import EMPTY, SceneConfig

__all__ = ["build_mme", "build_pope", "held_out_scenes", "write_benchmark"]

POPE_SPLITS = ("random", "popular", "adversarial")


def held_out_scenes(count: int, path: str | Path | None = None) -> list[tuple[Any, list[int]]]:
    """The first ``count`` scenes of the demo's test split as ``(PIL image, grid)``.

    Raises:
        ValueError: ``count`` < 1 or more than the split holds.
    """
    from dyvte.demo.model import load_demo_dataset

    test = load_demo_dataset("test", path)
    if not 1 <= count <= len(test):
        raise ValueError(f"scenes must be in 1..{len(test)} (the demo test split), got {count}")
    rows = test.select(range(count))
    return list(zip(rows["image"], [list(g) for g in rows["grid"]], strict=True))


def _present(grid: Sequence[int]) -> list[int]:
    return sorted({g for g in grid if g != EMPTY})


def build_pope(scenes: Sequence[tuple[Any, list[int]]], per_image: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """POPE rows (``question_id``, ``question``, ``answer``, ``image_source``, ``image``, ``category``), per split
    every scene's yes-questions then its no-questions (module docstring)."""
    rng = np.random.default_rng([seed, 0x9095])
    presents = [_present(grid) for _, grid in scenes]
    popularity = Counter(d for present in presents for d in present)  # scenes holding each digit
    together = Counter((a, b) for present in presents for a in present for b in present if a != b)
    rows = []
    for split in POPE_SPLITS:
        for index, ((image, _), present) in enumerate(zip(scenes, presents, strict=True)):
            absent = [d for d in range(10) if d not in present]
            k = min(per_image, len(present), len(absent))
            positives = sorted(rng.choice(present, size=k, replace=False).tolist())
            if split == "random":
                negatives = rng.choice(absent, size=k, replace=False).tolist()
            elif split == "popular":
                negatives = sorted(absent, key=lambda d: (-popularity[d], d))[:k]
            else:
                negatives = sorted(absent, key=lambda d: (-sum(together[(p, d)] for p in present), d))[:k]
            for digit, answer in [(d, "yes") for d in positives] + [(d, "no") for d in negatives]:
                rows.append(
                    {
                        "question_id": f"{split}-{index}-{digit}",
                        "question": f"is there a {digit} ?",
                        "answer": answer,
                        "image_source": f"demo-test-{index}",
                        "image": image,
                        "category": split,
                    }
                )
    return rows


def _other(rng: np.random.Generator, value: int, low: int, high: int) -> int:
    """A value in ``low..high`` other than ``value``."""
    return int(rng.choice([v for v in range(low, high + 1) if v != value]))


def build_mme(
    scenes: Sequence[tuple[Any, list[int]]], cfg: SceneConfig | None = None, seed: int = 0
) -> list[dict[str, Any]]:
    """MME rows (``question_id``, ``image``, ``question``, ``answer``, ``category``): per scene and subtask a
    ``Yes`` then a ``No`` question (module docstring); ``question_id`` is ``<subtask>/<scene>.png``, MME's naming."""
    cfg = cfg or SceneConfig()
    rng = np.random.default_rng([seed, 0x3333])
    rows = []
    for index, (image, grid) in enumerate(scenes):
        present = _present(grid)
        absent = [d for d in range(10) if d not in present]
        filled = [cell for cell, g in enumerate(grid) if g != EMPTY]
        cell = int(rng.choice(filled))
        other_cell = int(rng.integers(len(grid)))
        row = int(rng.integers(cfg.rows))
        total = sum(g for g in grid[row * cfg.cols : (row + 1) * cfg.cols] if g != EMPTY)
        count = len(filled)

        def where(c: int, digit: int) -> str:
            r, k = divmod(c, cfg.cols)
            return f"is there a {digit} in row {r + 1} column {k + 1} ?"

        pairs = {
            "existence": (f"is there a {rng.choice(present)} ?", f"is there a {rng.choice(absent)} ?"),
            "count": (f"are there {count} digits ?", f"are there {_other(rng, count, 1, len(grid))} digits ?"),
            "position": (where(cell, grid[cell]), where(other_cell, _other(rng, grid[other_cell], 0, 9))),
            "numerical_calculation": (
                f"is {total} the sum of row {row + 1} ?",
                f"is {_other(rng, total, max(0, total - 3), min(9 * cfg.cols, total + 3))} the sum of row {row + 1} ?",
            ),
        }
        for subtask, (yes, no) in pairs.items():
            for question, answer in ((yes, "Yes"), (no, "No")):
                rows.append(
                    {
                        "question_id": f"{subtask}/{index}.png",
                        "image": image,
                        "question": question,
                        "answer": answer,
                        "category": subtask,
                    }
                )
    return rows


def write_benchmark(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """``rows`` as a parquet file in the HF ``datasets`` layout (``image`` an ``Image`` feature: a struct of PNG
    bytes and path), as ``Dataset.to_parquet`` writes it."""
    import datasets

    features = datasets.Features({k: datasets.Image() if k == "image" else datasets.Value("string") for k in rows[0]})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return path
