"""Seeded, stratified subsets (dyvte.data.subsets), the ``--samples N`` of the commands, and ``load_records``'s
``sample=`` that draws them before any record is checked.

The subset keeps each ``qtype``'s share (largest-remainder rounding), is the same for the same seed, keeps the
records' order, and is every record when N is at least their number.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from dyvte.data.records import DataError
from dyvte.data.sources import load_records
from dyvte.data.subsets import allocate, subset_indices

#: 60 records of three types, interleaved unevenly: 30 "count", 20 "color", 10 "shape"
GROUPS = [("count", "color", "count", "shape", "color", "count")[i % 6] for i in range(60)]


def test_allocation_is_proportional_with_largest_remainders():
    assert allocate([30, 20, 10], 12) == [6, 4, 2]  # exact quotas
    assert allocate([30, 20, 10], 10) == [5, 3, 2]  # 5, 3.33, 1.67: the one left over goes to 1.67
    assert allocate([5, 3, 2], 4) == [2, 1, 1]  # 2, 1.2, 0.8
    assert allocate([1, 1, 1], 2) == [1, 1, 0]  # equal remainders: the earlier groups first
    assert allocate([1, 8, 1], 2) == [0, 2, 0]  # 0.2, 1.6, 0.2
    assert allocate([7], 3) == [3]
    for sizes, n in (([3, 9, 4, 1], 11), ([2, 2, 2, 2, 2], 3), ([100, 1], 50)):
        counts = allocate(sizes, n)
        assert sum(counts) == n and all(0 <= c <= s for c, s in zip(counts, sizes, strict=True))
        assert all(abs(c - n * s / sum(sizes)) < 1 for c, s in zip(counts, sizes, strict=True))  # within one


@pytest.mark.parametrize(("sizes", "n", "match"), [([3, 0], 1, "at least one record"), ([3, 2], 6, "cannot draw 6")])
def test_allocation_refuses_what_cannot_be_drawn(sizes, n, match):
    with pytest.raises(ValueError, match=match):
        allocate(sizes, n)


def test_subset_keeps_each_types_share_in_dataset_order():
    chosen = subset_indices(len(GROUPS), 12, GROUPS, seed=0)
    assert len(chosen) == 12 and chosen == sorted(chosen) and len(set(chosen)) == 12
    assert Counter(GROUPS[i] for i in chosen) == {"count": 6, "color": 4, "shape": 2}
    assert chosen != list(range(12))  # a random draw, not the first 12 (which hold 6 / 4 / 2 as well)


def test_subset_is_deterministic_given_the_seed_and_changes_with_it():
    draws = {seed: subset_indices(len(GROUPS), 12, GROUPS, seed=seed) for seed in range(5)}
    assert draws[0] == subset_indices(len(GROUPS), 12, list(GROUPS), seed=0)
    assert len({tuple(d) for d in draws.values()}) > 1
    for draw in draws.values():  # every seed keeps the shares
        assert Counter(GROUPS[i] for i in draw) == {"count": 6, "color": 4, "shape": 2}


@pytest.mark.parametrize("n", [60, 61, 1000, None])
def test_n_at_least_the_records_returns_all_in_order(n):
    assert subset_indices(len(GROUPS), n, GROUPS, seed=3) == list(range(60))


def test_fewer_draws_than_types_go_to_the_largest_types():
    groups = ["a"] * 2 + ["b"] * 10 + ["c"] * 5 + ["d"]
    chosen = subset_indices(len(groups), 2, groups, seed=0)
    assert sorted(groups[i] for i in chosen) == ["b", "c"]
    assert subset_indices(len(groups), 0, groups) == []


def test_records_without_qtype_are_a_uniform_draw():
    chosen = subset_indices(50, 7, None, seed=1)
    assert len(chosen) == 7 and chosen == sorted(chosen) and set(chosen) <= set(range(50))
    assert chosen == subset_indices(50, 7, seed=1) != subset_indices(50, 7, seed=2)
    assert subset_indices(50, 7, [None] * 50, seed=1) == chosen  # one group: the same draw


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 5, "n": -1}, "n must be None or at least 0"),
        ({"size": 5, "n": True}, "n must be an int"),
        ({"size": 5, "n": 2, "seed": 1.5}, "seed must be an int"),
        ({"size": 5, "n": 2, "groups": ["a"] * 4}, "groups has 4 entries for 5 records"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        subset_indices(**kwargs)


def _records_file(root: Path, qtypes: list[str | None], bad: set[int] = frozenset()) -> Path:
    """``root/records.jsonl``: one record per qtype (``None``: no qtype field), answer = its index; the images of
    the records in ``bad`` are missing."""
    (root / "imgs").mkdir(parents=True)
    lines = []
    for i, qtype in enumerate(qtypes):
        if i not in bad:
            Image.new("RGB", (4, 4), (i, 0, 0)).save(root / "imgs" / f"{i}.png")
        rec = {"image": f"imgs/{i}.png", "question": "which?", "answer": str(i)}
        lines.append(json.dumps(rec if qtype is None else {**rec, "qtype": qtype}))
    (root / "records.jsonl").write_text("\n".join(lines) + "\n")
    return root / "records.jsonl"


def test_load_records_samples_the_stratified_subset_and_checks_only_it(tmp_path):
    path = _records_file(tmp_path, GROUPS, bad={i for i in range(60)} - set(subset_indices(60, 12, GROUPS, seed=4)))
    ds = load_records(str(path), sample=12, seed=4)  # the images outside the subset are missing: never opened
    assert [int(a) for a in ds["answer"]] == subset_indices(60, 12, GROUPS, seed=4)
    assert Counter(ds["qtype"]) == {"count": 6, "color": 4, "shape": 2}


def test_load_records_subset_of_a_dataset_folder_and_without_qtype(tmp_path):
    path = _records_file(tmp_path / "flat", [None] * 20)
    ds = load_records(str(path), sample=5, seed=2)
    assert [int(a) for a in ds["answer"]] == subset_indices(20, 5, None, seed=2)
    assert [int(a) for a in load_records(str(path), sample=20, seed=2)["answer"]] == list(range(20))  # all, in order
    saved = tmp_path / "saved"
    load_records(str(_records_file(tmp_path / "typed", GROUPS))).save_to_disk(str(saved))
    ds = load_records(str(saved), sample=10, seed=0)
    assert [int(a) for a in ds["answer"]] == subset_indices(60, 10, GROUPS, seed=0)
    assert Counter(ds["qtype"]) == {"count": 5, "color": 3, "shape": 2}


def test_a_bad_record_in_the_subset_is_named_by_its_index_in_the_file(tmp_path):
    chosen = subset_indices(60, 6, GROUPS, seed=0)
    path = _records_file(tmp_path, GROUPS, bad={chosen[2]})
    with pytest.raises(DataError, match=rf"record {chosen[2]} \(line {chosen[2] + 1}\).*--skip_bad_rows true"):
        load_records(str(path), sample=6, seed=0)
    assert len(load_records(str(path), sample=6, seed=0, skip_bad_rows=True)) == 5


def test_limit_and_sample_are_exclusive():
    with pytest.raises(ValueError, match=r"give limit \(3\) or sample \(2\), not both"):
        load_records("demo", "test", 3, sample=2)
