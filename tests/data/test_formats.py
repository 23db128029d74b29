"""Records formats: LLaVA instruction JSON + image folder, ShareGPT / OpenAI messages, parquet and datasets folders
with a column mapping, text-only rows skipped with a count, bad rows named or skipped (``skip_bad_rows``)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from dyvte.data.formats import export_llava, iter_json_rows, parse_columns
from dyvte.data.records import DataError
from dyvte.data.sources import load_records
from dyvte.demo import load_demo_dataset


@pytest.fixture(scope="module")
def demo_records():
    return list(load_demo_dataset("validation").select(range(6)))


def png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)
    return path


def write(path: Path, rows: list, lines: bool = False) -> Path:
    text = "\n".join(json.dumps(r) for r in rows) + "\n" if lines else json.dumps(rows, indent=1)
    path.write_text(text)
    return path


def turn(who: str, text: str) -> dict:
    return {"from": who, "value": text}


def test_llava_export_of_the_demo_reads_back_as_the_demo_records(tmp_path, demo_records):
    path = export_llava(demo_records, tmp_path / "export", 8)  # 8 > 6: cycles, each image written once
    (tmp_path / "store").mkdir()
    (tmp_path / "export" / "images").rename(tmp_path / "store" / "images")  # elsewhere: --data.source.image_folder
    with pytest.raises(DataError, match=r"row 0 \(line 2, id 'demo-0'\): the image file .*0\.png does not exist"):
        load_records(str(path))
    ds = load_records(str(path), image_folder=str(tmp_path / "store"), limit=7)
    assert len(ds) == 7 and ds["id"] == [f"demo-{i}" for i in range(7)]
    for i, record in enumerate(ds):
        source = demo_records[i % 6]
        assert record["question"] == source["question"] and record["answer"] == source["answer"]
        assert np.array_equal(np.asarray(record["image"]), np.asarray(source["image"]))
        assert record["context"] == [] and record["turn"] == 1


def test_multi_turn_rows_give_one_sample_per_answer_with_earlier_turns(tmp_path, caplog):
    png(tmp_path / "imgs/a.png")
    rows = [
        {
            "id": "multi",
            "image": "imgs/a.png",
            "conversations": [
                {"from": "system", "value": "be brief"},
                turn("human", "what is it?\n<image>"),  # the marker may follow the text (LLaVA has both)
                turn("gpt", "a square"),
                turn("human", "which colour?"),
                turn("gpt", "black"),
            ],
        },
        {"id": "text", "conversations": [turn("human", "hello"), turn("gpt", "hi")]},
    ]
    with caplog.at_level(logging.INFO, logger="dyvte.data.formats"):
        ds = load_records(str(write(tmp_path / "llava.json", rows)))
    assert ds["question"] == ["what is it?", "which colour?"] and ds["answer"] == ["a square", "black"]
    assert ds["context"] == [[], [{"question": "what is it?", "answer": "a square"}]] and ds["turn"] == [1, 3]
    assert "2 rows -> 2 samples" in caplog.text and "skipped 1 text-only rows" in caplog.text


def test_sharegpt_and_openai_messages(tmp_path):
    png(tmp_path / "a.png")
    rows = [
        {
            "id": 7,
            "images": ["a.png"],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
            ],
        },
        {"image": "a.png", "conversations": [turn("user", "<image>\nsay"), turn("assistant", "yes")]},
    ]
    ds = load_records(str(write(tmp_path / "chat.jsonl", rows, lines=True)))
    assert ds["question"] == ["how many?", "say"] and ds["answer"] == ["two", "yes"] and ds["id"] == ["7", ""]


BAD_ROWS = [
    ({"image": "nope.png", "conversations": [turn("human", "<image>\nq"), turn("gpt", "a")]}, "missing image file"),
    ({"image": "a.png", "conversations": [turn("human", "<image>\nq"), turn("gpt", " ")]}, "empty answer"),
    ({"image": "a.png", "conversations": [turn("human", "q"), turn("gpt", "a")]}, "image marker count mismatch"),
    ({"conversations": [turn("human", "<image>\nq"), turn("gpt", "a")]}, "image marker count mismatch"),
    (
        {"image": ["a.png", "a.png"], "conversations": [turn("human", "<image><image> q"), turn("gpt", "a")]},
        "several images",
    ),
    ({"image": "a.png", "conversations": [turn("gpt", "a"), turn("human", "<image> q")]}, "turns out of order"),
    ({"image": "a.png", "conversations": [turn("robot", "<image> q")]}, "unknown role"),
    ({"image": "bad.png", "conversations": [turn("human", "<image>\nq"), turn("gpt", "a")]}, "unreadable image"),
]


@pytest.mark.parametrize("row, reason", BAD_ROWS, ids=[r for _, r in BAD_ROWS])
def test_a_bad_row_is_named_by_its_id_or_skipped_with_a_count(tmp_path, row, reason, caplog):
    png(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    good = {"id": "good", "image": "a.png", "conversations": [turn("human", "<image>\nq"), turn("gpt", "a")]}
    path = write(tmp_path / "rows.json", [good, {"id": "bad-1", **row}])
    with pytest.raises(DataError, match=rf"rows\.json, row 1 \(line \d+, id 'bad-1'\): .*\[{reason}\].*skip_bad_rows"):
        load_records(str(path))
    with caplog.at_level(logging.INFO, logger="dyvte.data.formats"):
        ds = load_records(str(path), skip_bad_rows=True)
    assert ds["id"] == ["good"]
    assert f"skipped 1 bad rows (--skip_bad_rows): 1 {reason} (e.g. bad-1)" in caplog.text


def test_a_truncated_llava_json_names_its_line(tmp_path):
    png(tmp_path / "a.png")
    rows = [
        {"id": str(i), "image": "a.png", "conversations": [turn("human", "<image> q"), turn("gpt", "a")]}
        for i in range(3)
    ]
    text = json.dumps(rows, indent=1)
    (tmp_path / "cut.json").write_text(text[: len(text) // 2])
    with pytest.raises(DataError, match=r"cut\.json, line \d+: not valid JSON"):
        load_records(str(tmp_path / "cut.json"))


def test_json_rows_stream_across_read_windows(tmp_path, monkeypatch):
    import dyvte.data.formats

    monkeypatch.setattr(dyvte.data.formats, "CHUNK", 5)  # every row spans several windows
    rows = [{"id": str(i), "text": "]\n[" * i, "n": [i, {"x": ","}]} for i in range(12)]
    path = write(tmp_path / "rows.json", rows)
    parsed = list(iter_json_rows(path))
    assert [row for _, row in parsed] == rows
    lines = path.read_text().split("\n")
    assert all(lines[line - 1].strip() == "{" for line, _ in parsed)  # each row's own first line


def _png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_parquet_and_datasets_folders_with_a_column_mapping(tmp_path, caplog):
    rows = {
        "picture": [{"bytes": _png_bytes(v), "path": None} for v in (10, 20)] + [None],
        "prompt": ["first?", "second?", "text only"],
        "response": ["one", "two", "three"],
        "question": ["ignored", "ignored", "ignored"],  # replaced by the mapped column
    }
    features = datasets.Features(
        {
            "picture": datasets.Image(decode=False),
            "prompt": datasets.Value("string"),
            "response": datasets.Value("string"),
            "question": datasets.Value("string"),
        }
    )
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    ds.save_to_disk(str(tmp_path / "folder"))
    mapping = "image=picture,question=prompt,answer=response"
    for source in ("rows.parquet", "folder"):
        with caplog.at_level(logging.INFO, logger="dyvte.data.sources"):
            out = load_records(str(tmp_path / source), columns=mapping)
        assert out["question"] == ["first?", "second?"] and out["answer"] == ["one", "two"]
        assert [np.asarray(im)[0, 0, 0] for im in out["image"]] == [10, 20]
        assert "skipped 1 text-only records" in caplog.text
    with pytest.raises(DataError, match=r"--data.source.columns names \['nope'\], not among its columns"):
        load_records(str(tmp_path / "rows.parquet"), columns="image=nope,question=prompt,answer=response")
    with pytest.raises(ValueError, match=r"expected 'image=COLUMN"):
        parse_columns("image")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['label'\]"):
        parse_columns({"label": "x"})


def test_flat_records_with_a_column_mapping_and_skipped_bad_rows(tmp_path, caplog):
    png(tmp_path / "a.png")
    rows = [{"img": "a.png", "q": "which?", "a": "one"}, {"img": "missing.png", "q": "which?", "a": "two"}]
    path = write(tmp_path / "rows.jsonl", rows, lines=True)
    mapping = {"image": "img", "question": "q", "answer": "a"}
    with pytest.raises(
        DataError, match=r"rows\.jsonl, record 1 \(line 2\): the image .* does not exist.*skip_bad_rows"
    ):
        load_records(str(path), columns=mapping)
    with caplog.at_level(logging.INFO, logger="dyvte.data.sources"):
        ds = load_records(str(path), columns=mapping, skip_bad_rows=True)
    assert ds["answer"] == ["one"] and "skipped 1 bad records (--skip_bad_rows)" in caplog.text
