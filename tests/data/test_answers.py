"""Answers compared in one form (dyvte.data.answers): gold values as text (``3.0`` is ``"3"``), numbers compared as
numbers, missing gold answers refused by record (never the text ``"nan"``), on every path a gold answer takes:
records files written by pandas, in-memory records, teacher forcing.

That the demo model scores pandas' float answers as it scores int answers is ``tests/eval/test_harness.py``'s.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dyvte.data.answers import answers_match, gold_text, normalize_answer
from dyvte.data.records import DataError, build_inputs, iter_batches
from dyvte.data.sources import load_records
from dyvte.demo import load_demo_processor


def test_normalize_answer_keeps_the_text_rules_and_compares_numbers_as_numbers():
    # the harness' text rules, as before: first line, lower case, one space, punctuation stripped at the ends
    assert normalize_answer("  Yes.\nbecause") == "yes"
    assert normalize_answer('"Red   and  blue"!') == "red and blue"
    assert normalize_answer("none") == "none"
    # numbers: one canonical form
    same = ["3", "3.0", " 3 ", "3.", "+3", "03", "3e0", "3.000", "3!"]
    assert {normalize_answer(text) for text in same} == {"3"}
    assert normalize_answer("0.5") == normalize_answer(".5") == normalize_answer("5e-1") == "0.5"
    assert normalize_answer("-2.50") == "-2.5" and normalize_answer("-0") == "0"
    assert normalize_answer("1e3") == "1000" and normalize_answer("12345678901234567890.0") == "12345678901234567890"
    # not numbers: left as text
    for text in ("nan", "inf", "1,000", "3 apples", "1_000", "0x10", "1e999"):
        assert normalize_answer(text) == text


def test_gold_text_turns_numbers_into_the_answer_a_model_writes():
    assert gold_text(3, "record 0") == "3"
    assert gold_text(3.0, "record 0") == "3"  # pandas' int column with a missing value is float64
    assert gold_text(np.float64(3.0), "record 0") == gold_text(np.int64(3), "record 0") == "3"
    assert gold_text(-0.0, "record 0") == "0" and gold_text(0.5, "record 0") == "0.5"
    assert gold_text("3.0", "record 0") == "3.0"  # a string is kept as written (it still matches "3")
    assert gold_text(" yes ", "record 0") == " yes "
    for missing in (None, math.nan, np.float64("nan")):
        with pytest.raises(DataError, match=r"record 2 has no answer \(.*a missing value"):
            gold_text(missing, "record 2")
    with pytest.raises(DataError, match="record 2: the answer is inf"):
        gold_text(math.inf, "record 2")
    with pytest.raises(DataError, match="record 2: the answer is the bool True"):
        gold_text(True, "record 2")
    with pytest.raises(DataError, match="record 2: the answer must be a string, got list"):
        gold_text(["3", "three"], "record 2")
    with pytest.raises(DataError, match="record 2: the answer '...' is empty once normalized"):
        gold_text("...", "record 2")


def test_answers_match_compares_numbers_as_numbers():
    assert answers_match("3", 3.0) and answers_match("3.0", "3") and answers_match(" 3 ", 3)
    assert answers_match("Yes.", "yes") and answers_match("0.50", 0.5)
    assert not answers_match("3", "4") and not answers_match("3", "3 apples") and not answers_match("nan", "3")


def numeric_records(tmp_path, n: int = 6) -> list[dict]:
    """``n`` records with numeric answers 0..n-1 and images in ``tmp_path/imgs``."""
    (tmp_path / "imgs").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        Image.new("L", (16, 16), 20 * i).save(tmp_path / f"imgs/{i}.png")
        rows.append({"image": f"imgs/{i}.png", "question": "how many digits are there ?", "answer": i, "qtype": "n"})
    return rows


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_an_int_column_with_a_missing_value_from_pandas_reads_as_int_answers(tmp_path, suffix, caplog):
    rows = numeric_records(tmp_path)
    clean = pd.DataFrame(rows)
    frame = pd.DataFrame([*rows, rows[0] | {"answer": None}])  # pandas makes the column float64: 0.0, 1.0, ..., NaN
    assert frame["answer"].dtype == np.float64
    paths = {"clean": tmp_path / f"clean{suffix}", "float": tmp_path / f"float{suffix}"}
    for name, data in (("clean", clean), ("float", frame)):
        if suffix == ".parquet":
            data.to_parquet(paths[name])
        else:
            data.to_json(paths[name], orient="records", lines=True)  # writes 3.0 and null
    with pytest.raises(DataError, match=rf"float{suffix}, record 6.* has no answer .*skip_bad_rows"):
        load_records(str(paths["float"]))
    with caplog.at_level(logging.WARNING, logger="dyvte.data.sources"):
        floats = load_records(str(paths["float"]), skip_bad_rows=True)
    assert "skipped 1 bad records" in caplog.text
    ints = load_records(str(paths["clean"]))
    assert floats["answer"] == ints["answer"] == [str(i) for i in range(6)]  # "3", never "3.0" or "nan"

    # teacher forcing (exit-head labels): the float records give the int records' answer tokens
    processor = load_demo_processor()
    got = build_inputs(processor, list(floats), with_answers=True)["labels"]
    want = build_inputs(processor, list(ints), with_answers=True)["labels"]
    assert got.equal(want) and (got != -100).sum() == 2 * len(ints)  # one digit token and the end token each


def test_missing_gold_answers_in_memory_name_the_record():
    good = {"image": Image.new("RGB", (8, 8)), "question": "how many digits are there ?", "answer": 3.0}
    with pytest.raises(DataError, match=r"record 1 has no answer \(nan"):
        next(iter_batches([good, good | {"answer": float("nan")}], 2, answers=True))
    processor = load_demo_processor()
    inputs = build_inputs(processor, [good], with_answers=True)
    assert processor.tokenizer.decode(inputs["labels"][0][inputs["labels"][0] != -100]) == "3 </s>"
