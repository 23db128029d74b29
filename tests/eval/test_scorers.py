"""The open-answer and yes/no scorers against hand-computed values, on files in the benchmarks' own layouts."""

from __future__ import annotations

import pytest

from dyvte.eval.scorers import BENCHMARKS, headline, load_benchmark, score
from dyvte.eval.scorers.normalize import exact_match, normalize_vqa, vqa_accuracy
from dyvte.eval.scorers.records import yes_no

from .benchmark_files import image_cell, pope_rows, write_parquet


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("Two dogs.", "2 dogs"),  # number word, final period
        ("The cat", "cat"),  # article
        ("an apple!", "apple"),
        ("A", ""),  # an article alone
        ("Yes.", "yes"),
        ("yes", "yes"),
        ("ten", "10"),
        ("none", "0"),  # the official number map has none -> 0
        ("dont know", "don't know"),  # contraction
        ("x-ray", "x ray"),  # a mark touching no space becomes a space
        ("hello, world", "hello world"),  # a mark touching a space is deleted
        ("1,000", "1000"),  # digit-comma-digit: marks deleted
        ("2.5", "2.5"),  # a period before a digit stays
        ("  Red\tand\nblue ", "red and blue"),
    ],
)
def test_vqa_normalization_corner_cases(raw, normal):
    assert normalize_vqa(raw) == normal


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_over_the_ten_leave_one_out_subsets(matches, expected):
    # k of 10 humans agree: a subset without one of them sees k - 1, the 10 - k others see k
    answers = ["2"] * matches + ["3"] * (10 - matches)
    assert vqa_accuracy("two", answers) == pytest.approx(expected)
    assert vqa_accuracy("Two.", answers) == pytest.approx(expected)


def test_exact_match_and_yes_no_reading():
    assert exact_match("The dog.", "dog") and exact_match("2", "two") and not exact_match("dogs", "dog")
    assert [yes_no(x) for x in ["Yes.", "yes, there is", "No", "not really", "maybe", "", "YES!"]] == [
        "yes",
        "yes",
        "no",
        "no",
        None,
        None,
        "yes",
    ]


def test_vqav2_file(tmp_path):
    def answers(texts):
        return [{"answer": t, "answer_confidence": "yes", "answer_id": k + 1} for k, t in enumerate(texts)]

    rows = [
        {"question_id": 1, "question": "How many?", "image": image_cell(1), "answers": answers(["2"] * 3 + ["3"] * 7)},
        {"question_id": 2, "question": "What?", "image": image_cell(2), "answers": answers(["dog"] + ["cat"] * 9)},
        {"question_id": 3, "question": "Is it?", "image": image_cell(3), "answers": answers(["yes"] * 10)},
    ]
    loaded = load_benchmark("vqav2", write_parquet(tmp_path / "vqav2.parquet", rows))
    assert loaded.records[0]["question"] == "How many?\nAnswer the question using a single word or phrase."
    assert [r["answer"] for r in loaded.records] == ["3", "cat", "yes"]  # the majority, for the harness's column
    scores = score(loaded, ["two", "A dog.", "Yes"])  # 0.9, 0.3, 1.0
    assert scores["accuracy"] == pytest.approx((0.9 + 0.3 + 1.0) / 3)
    assert headline("vqav2", scores) == {"VQAv2": pytest.approx(100 * 2.2 / 3)}


def test_textvqa_file(tmp_path):
    rows = [
        {"question_id": 7, "question": "Brand?", "image": image_cell(1), "answers": ["coca cola"] * 2 + ["coke"] * 8},
        {"question_id": 8, "question": "Word?", "image": image_cell(2), "answers": ["stop"] * 10},
    ]
    loaded = load_benchmark("textvqa", write_parquet(tmp_path / "textvqa.parquet", rows))
    assert score(loaded, ["Coca-Cola", "STOP."])["accuracy"] == pytest.approx((0.6 + 1.0) / 2)


def test_gqa_file(tmp_path):
    rows = [
        {"id": "a", "question": "Which side?", "answer": "left", "image": image_cell(1)},
        {"id": "b", "question": "What animal?", "answer": "dog", "image": image_cell(2)},
        {"id": "c", "question": "Is it red?", "answer": "no", "image": image_cell(3)},
    ]
    loaded = load_benchmark("gqa", write_parquet(tmp_path / "gqa.parquet", rows), prompt=False)
    assert loaded.records[1]["question"] == "What animal?"  # prompt=False: no instruction
    assert score(loaded, ["Left.", "the dog", "yes"])["accuracy"] == pytest.approx(2 / 3)


def test_pope_per_split_metrics(tmp_path):
    labels = ["yes", "yes", "no", "no", "yes", "no", "yes", "no"]
    splits = ["random"] * 4 + ["popular"] * 2 + ["adversarial"] * 2
    loaded = load_benchmark("pope", write_parquet(tmp_path / "pope.parquet", pope_rows(labels, splits)))
    assert [r["qtype"] for r in loaded.records] == splits
    preds = ["Yes.", "no", "No", "yes, there is", "yes", "maybe", "Not sure", "no"]
    s = score(loaded, preds)
    # random: TP 1, FP 1, TN 1, FN 1
    assert s["random"] == pytest.approx(
        {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5, "unparsed": 0, "samples": 4}
    )
    # popular: one yes right, "maybe" unparsed (wrong, neither yes nor no)
    assert s["popular"] == pytest.approx(
        {"accuracy": 0.5, "precision": 1.0, "recall": 1.0, "f1": 1.0, "yes_ratio": 0.5, "unparsed": 1, "samples": 2}
    )
    # adversarial: "Not sure" is a no; no yes predicted: precision 0/0 -> 0
    assert s["adversarial"] == pytest.approx(
        {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0, "unparsed": 0, "samples": 2}
    )
    # all: TP 2 (rows 0, 4), predicted yes 3 (rows 0, 3, 4), labelled yes 4, right 4 of 8
    assert s["all"]["precision"] == pytest.approx(2 / 3) and s["all"]["recall"] == pytest.approx(0.5)
    assert s["all"]["f1"] == pytest.approx(4 / 7) and s["all"]["accuracy"] == 0.5
    assert s["all"]["yes_ratio"] == pytest.approx(3 / 8)
    assert headline("pope", s) == {"POPE F1": pytest.approx(100 * 0.5)}  # mean of 0.5, 1.0, 0.0


def mme_rows() -> list[dict]:
    """existence: two images (one pair right, one half right); count: one image, both right; code_reasoning: one
    image, both wrong."""
    plan = [
        ("existence", "existence/1.jpg", "Yes"),
        ("existence", "existence/1.jpg", "No"),
        ("existence", "existence/2.jpg", "Yes"),
        ("existence", "existence/2.jpg", "No"),
        ("count", "count/1.jpg", "Yes"),
        ("count", "count/1.jpg", "No"),
        ("code_reasoning", "code_reasoning/0020.png", "Yes"),
        ("code_reasoning", "code_reasoning/0020.png", "No"),
    ]
    return [
        {
            "question_id": qid,
            "image": image_cell(k),
            "question": f"Is there a thing {k}? Please answer yes or no.",
            "answer": answer,
            "category": category,
        }
        for k, (category, qid, answer) in enumerate(plan)
    ]


def test_mme_acc_and_acc_plus(tmp_path):
    loaded = load_benchmark("mme", write_parquet(tmp_path / "mme.parquet", mme_rows()))
    # MME's own instruction replaced by LLaVA-1.5's
    assert loaded.records[0]["question"] == "Is there a thing 0?\nAnswer the question using a single word or phrase."
    preds = ["yes", "No.", "Yes", "yes", "YES", "no", "no", "yes"]
    s = score(loaded, preds)
    assert s["existence"] == pytest.approx(
        {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "questions": 4, "images": 2, "unparsed": 0}
    )
    assert s["count"]["score"] == 200.0
    assert s["code_reasoning"] == pytest.approx(
        {"acc": 0.0, "acc_plus": 0.0, "score": 0.0, "questions": 2, "images": 1, "unparsed": 0}
    )
    assert s["perception"] == {"total": 325.0, "subtasks": 2, "of": 10}
    assert s["cognition"] == {"total": 0.0, "subtasks": 1, "of": 4}
    assert headline("mme", s) == {"MME-P": 325.0, "MME-C": 0.0}


@pytest.mark.parametrize(
    ("name", "rows", "missing"),
    [
        (
            "pope",
            [{k: v for k, v in r.items() if k != "image_source"} for r in pope_rows(["yes"], ["random"])],
            "image_source",
        ),
        ("mme", [{k: v for k, v in r.items() if k != "category"} for r in mme_rows()], "category"),
        ("vqav2", [{"question_id": 1, "question": "q", "image": image_cell(0)}], "answers"),
        ("gqa", [{"question": "q", "answer": "a"}], "image"),
    ],
)
def test_a_file_missing_a_required_column_is_refused(tmp_path, name, rows, missing):
    path = write_parquet(tmp_path / "x.parquet", rows)
    with pytest.raises(ValueError, match=rf"not in the {name} layout: missing column\(s\) {missing} \(it has "):
        load_benchmark(name, path)


def test_bad_benchmark_names_files_and_values_are_refused(tmp_path):
    with pytest.raises(ValueError, match="'popee' is not a benchmark dyvte scores; choose one of pope, mme, gqa"):
        load_benchmark("popee", tmp_path / "x.parquet")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_benchmark("pope", tmp_path / "absent.parquet")
    (tmp_path / "text.parquet").write_text("not parquet\n")
    with pytest.raises(ValueError, match="cannot read it as parquet"):
        load_benchmark("pope", tmp_path / "text.parquet")
    rows = pope_rows(["maybe"], ["random"])
    with pytest.raises(ValueError, match="pope row 0 .*the answer must be yes or no, got 'maybe'"):
        load_benchmark("pope", write_parquet(tmp_path / "p.parquet", rows))
    rows = pope_rows(["yes"], ["sometimes"])
    with pytest.raises(ValueError, match="category 'sometimes' is not a POPE split"):
        load_benchmark("pope", write_parquet(tmp_path / "p2.parquet", rows))
    rows = [{**r, "category": "poetry"} for r in mme_rows()]
    with pytest.raises(ValueError, match="'poetry' is not an MME subtask"):
        load_benchmark("mme", write_parquet(tmp_path / "m.parquet", rows))
    rows = pope_rows(["yes"], ["random"])
    rows[0]["image"] = None
    with pytest.raises(ValueError, match="pope row 0 .* has no image"):
        load_benchmark("pope", write_parquet(tmp_path / "p3.parquet", rows))
    rows = [{"question_id": 1, "question": "q", "image": image_cell(0), "answers": ["a"] * 10}]
    with pytest.raises(ValueError, match='not an \\{"answer": ...\\} dict'):  # TextVQA's strings in a VQAv2 file
        load_benchmark("vqav2", write_parquet(tmp_path / "v.parquet", rows))
    loaded = load_benchmark("pope", write_parquet(tmp_path / "ok.parquet", pope_rows(["yes"], ["random"])))
    with pytest.raises(ValueError, match="2 predictions for 1 records"):
        score(loaded, ["yes", "no"])


def test_every_benchmark_has_a_reader_scorer_and_prompt():
    assert set(BENCHMARKS) == {"pope", "mme", "gqa", "textvqa", "vqav2", "scienceqa", "mmbench"}
    assert BENCHMARKS["pope"].prompt == "Answer the question using a single word or phrase."
    assert BENCHMARKS["mmbench"].prompt == "Answer with the option's letter from the given choices directly."
