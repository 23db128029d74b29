"""ScienceQA-IMG and MMBench: letter extraction and circular evaluation against hand-computed values."""

from __future__ import annotations

import pytest

from dyvte.eval.scorers import headline, load_benchmark, score
from dyvte.eval.scorers.choice import extract_letter

from .benchmark_files import image_cell, write_parquet


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [
        ("B", "B"),
        ("b", "B"),  # the harness lower-cases answers
        ("(C)", "C"),
        ("D.", "D"),
        ("A. a cat", "A"),
        ("(b) a dog", "B"),
        ("The answer is C.", "C"),
        ("E", None),  # not an option of a 4-option question
        ("a cat", None),  # an article, not a letter
        ("I think A", None),
        ("", None),
    ],
)
def test_letter_extraction(prediction, letter):
    assert extract_letter(prediction, 4) == letter


def test_scienceqa_img(tmp_path):
    rows = [
        {"question": "Which is a mammal?", "choices": ["frog", "dog"], "answer": 1, "hint": "", "image": image_cell(1)},
        {
            "question": "Which is hot?",
            "choices": ["ice", "fire", "snow"],
            "answer": 1,
            "hint": "Look at the picture.",
            "image": image_cell(2),
        },
        {"question": "No image here", "choices": ["x", "y"], "answer": 0, "hint": "", "image": None},
        {"question": "Pick C", "choices": ["p", "q", "r", "s"], "answer": 2, "hint": "", "image": image_cell(3)},
    ]
    loaded = load_benchmark("scienceqa", write_parquet(tmp_path / "sqa.parquet", rows))
    assert len(loaded.records) == 3  # the row without an image is not in the IMG subset
    assert loaded.records[1]["question"] == (
        "Context: Look at the picture.\nWhich is hot?\nA. ice\nB. fire\nC. snow\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert [r["answer"] for r in loaded.records] == ["B", "B", "C"]
    s = score(loaded, ["B", "(a)", "Z"])  # right, wrong, unparseable
    assert s == {"accuracy": pytest.approx(1 / 3), "unparsed": 1, "samples": 3}
    assert headline("scienceqa", s) == {"SQA-IMG": pytest.approx(100 / 3)}


def mmbench_rows() -> list[dict]:
    return [
        {
            "index": 10,
            "question": "What is shown?",
            "hint": None,
            "A": "cat",
            "B": "dog",
            "C": "bird",
            "D": "fish",
            "answer": "B",
            "image": image_cell(1),
            "category": "object",
            "source": "demo",
        },
        {
            "index": 11,
            "question": "Which color?",
            "hint": "A photo.",
            "A": "red",
            "B": "green",
            "C": "blue",
            "D": None,  # an empty option: null in the parquet file
            "answer": "A",
            "image": image_cell(2),
            "category": "color",
            "source": "demo",
        },
    ]


def test_mmbench_circular_evaluation(tmp_path):
    loaded = load_benchmark("mmbench", write_parquet(tmp_path / "mmb.parquet", mmbench_rows()))
    # question 10: 4 shifts; the gold option "dog" moves: B, A, D, C
    assert [r["answer"] for r in loaded.records[:4]] == ["B", "A", "D", "C"]
    assert loaded.records[1]["question"].startswith("What is shown?\nA. dog\nB. bird\nC. fish\nD. cat\n")
    # question 11: 3 options (D is empty), 3 shifts: A, C, B; its hint comes first
    assert [r["answer"] for r in loaded.records[4:]] == ["A", "C", "B"]
    assert loaded.records[5]["question"].startswith("A photo.\nWhich color?\nA. green\nB. blue\nC. red\nAnswer")
    # question 10 right at every shift; question 11 wrong at its last shift
    s = score(loaded, ["B", "a.", "(D)", "C", "A", "C", "A"])
    assert s["circular"] == 0.5 and s["single"] == 1.0
    assert s["per_category"] == {"color": 0.0, "object": 1.0}
    assert s["questions"] == 2 and s["samples"] == 7 and s["unparsed"] == 0
    assert headline("mmbench", s) == {"MMBench": 50.0}
    s = score(loaded, ["B", "A", "D", "C", "A", "C", "maybe B"])  # an unparseable letter is wrong
    assert s["circular"] == 0.5 and s["unparsed"] == 1


def test_bad_multiple_choice_files_are_refused(tmp_path):
    rows = mmbench_rows()
    rows[1]["index"] = 10
    with pytest.raises(ValueError, match="index repeats"):
        load_benchmark("mmbench", write_parquet(tmp_path / "a.parquet", rows))
    rows = mmbench_rows()
    rows[1]["answer"] = "D"  # D is empty in that row
    with pytest.raises(ValueError, match="answer 'D' is not one of its options' letters"):
        load_benchmark("mmbench", write_parquet(tmp_path / "b.parquet", rows))
    rows = [{k: v for k, v in r.items() if k != "hint"} for r in mmbench_rows()]
    with pytest.raises(ValueError, match=r"missing column\(s\) hint"):
        load_benchmark("mmbench", write_parquet(tmp_path / "c.parquet", rows))
    rows = [{"question": "q", "choices": ["x", "y"], "answer": 2, "hint": "", "image": image_cell(0)}]
    with pytest.raises(ValueError, match=r"answer must be the index of a choice \(0..1\), got 2"):
        load_benchmark("scienceqa", write_parquet(tmp_path / "d.parquet", rows))
    rows = [{"question": "q", "choices": ["x", "y"], "answer": 0, "hint": "", "image": None}]
    with pytest.raises(ValueError, match="no scienceqa row has an image"):
        load_benchmark("scienceqa", write_parquet(tmp_path / "e.parquet", rows))
