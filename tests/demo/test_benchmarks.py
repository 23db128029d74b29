"""The demo's POPE- and MME-style sets: held-out scenes, balanced, every answer true of its scene."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from dyvte.demo import load_demo_dataset
from dyvte.demo.benchmarks import build_mme, build_pope, held_out_scenes, write_benchmark
from dyvte.eval.scorers import load_benchmark


@pytest.fixture(scope="module")
def scenes():
    return held_out_scenes(12)


def test_scenes_are_the_test_splits(scenes):
    test = load_demo_dataset("test").select(range(12))
    for (image, grid), record in zip(scenes, test, strict=True):
        assert np.array_equal(np.asarray(image), np.asarray(record["image"])) and grid == list(record["grid"])
    with pytest.raises(ValueError, match="scenes must be in 1..2000"):
        held_out_scenes(0)


def test_pope_set_is_balanced_and_true(scenes):
    rows = build_pope(scenes)
    counts = Counter((r["category"], r["answer"]) for r in rows)
    for split in ("random", "popular", "adversarial"):
        assert counts[(split, "yes")] == counts[(split, "no")] > 0
    presents = [{g for g in grid if g >= 0} for _, grid in scenes]
    popularity = Counter(d for p in presents for d in p)
    for r in rows:
        index, digit = (
            int(r["image_source"].rsplit("-", 1)[1]),
            int(re.fullmatch(r"is there a (\d) \?", r["question"])[1]),
        )
        assert (digit in presents[index]) == (r["answer"] == "yes")
        if r["category"] == "popular" and r["answer"] == "no":  # no absent digit is more popular than the one asked
            absent = [d for d in range(10) if d not in presents[index]]
            asked = [
                int(x["question"].split()[3])
                for x in rows
                if x["image_source"] == r["image_source"] and x["category"] == "popular" and x["answer"] == "no"
            ]
            assert popularity[digit] >= max((popularity[d] for d in absent if d not in asked), default=0)


def test_mme_set_pairs_one_yes_one_no_per_subtask_and_every_answer_is_true(scenes):
    rows = build_mme(scenes)
    pairs = Counter((r["question_id"], r["answer"]) for r in rows)
    assert set(pairs.values()) == {1} and len(pairs) == 2 * 4 * len(scenes)
    for r in rows:
        grid = scenes[int(r["question_id"].split("/")[1].split(".")[0])][1]
        q = r["question"]
        if m := re.fullmatch(r"is there a (\d) \?", q):
            truth = int(m[1]) in grid
        elif m := re.fullmatch(r"are there (\d+) digits \?", q):
            truth = int(m[1]) == sum(g >= 0 for g in grid)
        elif m := re.fullmatch(r"is there a (\d) in row (\d) column (\d) \?", q):
            truth = grid[(int(m[2]) - 1) * 3 + int(m[3]) - 1] == int(m[1])
        else:
            m = re.fullmatch(r"is (\d+) the sum of row (\d) \?", q)
            row = grid[(int(m[2]) - 1) * 3 : int(m[2]) * 3]
            truth = int(m[1]) == sum(g for g in row if g >= 0)
        assert truth == (r["answer"] == "Yes"), q


def test_the_sets_read_back_through_the_benchmark_readers(scenes, tmp_path):
    pope = load_benchmark("pope", write_benchmark(build_pope(scenes), tmp_path / "pope.parquet"), prompt=False)
    mme = load_benchmark("mme", write_benchmark(build_mme(scenes), tmp_path / "mme.parquet"), prompt=False)
    assert pope.records[0]["question"].startswith("is there a ") and set(pope.records[0]["image"]) == {"bytes", "path"}
    assert {r["qtype"] for r in mme.records} == {"existence", "count", "position", "numerical_calculation"}
