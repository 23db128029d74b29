"""Records files and model directories by name (dyvte.data.sources): bad records files and bad records are refused
before any work, with a ``DataError`` naming the input.

Records files (``.json`` / ``.jsonl`` / ``.parquet``, dataset folders) are read by
:func:`dyvte.data.sources.load_records`. Each test builds its tiny records file in ``tmp_path``. Relative image paths
resolve against the records file, never the working directory. ``load_config`` reads the config ``load_model`` would
load. Records in memory (``build_inputs``, ``iter_batches``) are ``tests/data/test_records.py``'s.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dyvte.data.records import DataError
from dyvte.data.sources import load_records

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def png(path: Path, color: tuple[int, int, int] = RED, size: int = 8) -> np.ndarray:
    """Write a solid-colour PNG (creating its folder) and return its pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return np.asarray(Image.open(path).convert("RGB"))


def truncated_png(path: Path) -> None:
    """A PNG whose header is intact but whose pixel data stops half-way (PIL: "image file is truncated")."""
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 5])


def record(i: int, **fields: Any) -> dict[str, Any]:
    """A good record pointing at ``imgs/{i}.png``, with ``fields`` overriding it."""
    return {"image": f"imgs/{i}.png", "question": "which digit?", "answer": str(i), "qtype": "digit"} | fields


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def folder_with_images(root: Path, n: int = 2) -> Path:
    """``root`` holding ``imgs/0.png ... imgs/{n-1}.png``."""
    for i in range(n):
        png(root / f"imgs/{i}.png")
    return root


# ------------------------------------------------------------------------ case 2: relative paths, any column type


def _write_parquet(writer: str, path: Path, records: list[dict[str, Any]]) -> Path:
    if writer == "pandas":
        pd.DataFrame(records).to_parquet(path)
        assert pq.read_schema(path).field("image").type == pa.large_string()  # what pandas writes
    elif writer == "pyarrow":
        pq.write_table(pa.Table.from_pylist(records), path)
        assert pq.read_schema(path).field("image").type == pa.string()
    elif writer == "datasets":
        datasets.Dataset.from_list(records).to_parquet(str(path))
    elif writer == "struct":  # datasets' undecoded image form {bytes, path}, written by plain pyarrow
        images = [{"bytes": None, "path": r["image"]} for r in records]
        pq.write_table(pa.Table.from_pylist([r | {"image": im} for r, im in zip(records, images, strict=True)]), path)
    else:
        raise AssertionError(writer)
    return path


@pytest.mark.parametrize("writer", ["pandas", "pyarrow", "datasets", "struct", "jsonl"])
def test_relative_image_paths_resolve_against_the_records_file(tmp_path, monkeypatch, writer):
    data, cwd = tmp_path / "data", tmp_path / "cwd"
    expected = [png(data / f"imgs/{i}.png", color) for i, color in enumerate((RED, GREEN))]
    for i in range(2):  # the working directory has its own, different, imgs/0.png and imgs/1.png
        png(cwd / f"imgs/{i}.png", BLUE)
    records = [record(i) for i in range(2)]
    if writer == "jsonl":
        write_jsonl(data / "records.jsonl", records)
    else:
        _write_parquet(writer, data / "records.parquet", records)
    monkeypatch.chdir(cwd)
    ds = load_records(f"../data/records.{'jsonl' if writer == 'jsonl' else 'parquet'}")
    assert isinstance(ds.features["image"], datasets.Image)
    for i in range(2):
        assert np.array_equal(np.asarray(ds[i]["image"].convert("RGB")), expected[i]), f"record {i}: wrong image"


def test_parquet_with_embedded_image_bytes_is_decoded(tmp_path):
    expected = png(tmp_path / "x.png", GREEN)
    raw = (tmp_path / "x.png").read_bytes()
    (tmp_path / "x.png").unlink()
    pd.DataFrame([record(0, image=raw)]).to_parquet(tmp_path / "records.parquet")
    ds = load_records(str(tmp_path / "records.parquet"))
    assert np.array_equal(np.asarray(ds[0]["image"].convert("RGB")), expected)


# ------------------------------------------------------------------------ case 6: empty question


@pytest.mark.parametrize("question", ["", "  \t "])
def test_empty_question_in_a_records_file_is_refused(tmp_path, question):
    folder_with_images(tmp_path)
    path = write_jsonl(tmp_path / "records.jsonl", [record(0), record(1, question=question)])
    with pytest.raises(DataError, match=r"records\.jsonl, record 1 \(line 2\): the question is empty"):
        load_records(str(path))
    pd.DataFrame([record(0), record(1, question=question)]).to_parquet(tmp_path / "records.parquet")
    with pytest.raises(DataError, match=r"records\.parquet, record 1: the question is empty"):
        load_records(str(tmp_path / "records.parquet"))


# ------------------------------------------------------------------------ case 7: empty gold answer


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ("", "the answer is empty"),
        ("   ", "the answer is empty"),
        (None, "has no answer"),
        ("?!", "the answer '\\?!' is empty once normalized"),
        (["2", "two"], "the answer must be a string, got list"),
    ],
)
def test_bad_gold_answer_in_a_records_file_is_refused(tmp_path, answer, message):
    folder_with_images(tmp_path)
    path = write_jsonl(tmp_path / "records.jsonl", [record(0), record(1, answer=answer)])
    with pytest.raises(DataError, match=rf"records\.jsonl, record 1 \(line 2\):? {message}"):
        load_records(str(path))


# ------------------------------------------------------------------------ case 9: corrupt image


def test_truncated_png_names_records_file_record_and_image(tmp_path):
    folder_with_images(tmp_path)
    truncated_png(tmp_path / "imgs/1.png")
    path = write_jsonl(tmp_path / "records.jsonl", [record(0), record(1)])
    image = tmp_path.resolve() / "imgs/1.png"
    with pytest.raises(DataError, match=r"records\.jsonl, record 1 \(line 2\): cannot read the image ") as caught:
        load_records(str(path))
    assert str(image) in str(caught.value) and "truncated" in str(caught.value)
    pd.DataFrame([record(0), record(1)]).to_parquet(tmp_path / "records.parquet")
    with pytest.raises(DataError, match=r"records\.parquet, record 1: cannot read the image .*truncated"):
        load_records(str(tmp_path / "records.parquet"))


def test_not_an_image_names_the_image(tmp_path):
    folder_with_images(tmp_path)
    (tmp_path / "imgs/1.png").write_text("not a png")
    path = write_jsonl(tmp_path / "records.jsonl", [record(0), record(1)])
    with pytest.raises(DataError, match=r"record 1 \(line 2\): cannot read the image .*1\.png: cannot identify"):
        load_records(str(path))


# ------------------------------------------------------------------------ case 10: unreadable or empty JSON


def test_truncated_jsonl_line_names_file_and_line(tmp_path):
    folder_with_images(tmp_path)
    lines = [json.dumps(record(0)), "", json.dumps(record(1)), json.dumps(record(1))[:-9]]
    (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"records\.jsonl, line 4: not valid JSON \(.*\): a truncated or malformed"):
        load_records(str(tmp_path / "records.jsonl"))


@pytest.mark.parametrize("name", ["records.json", "records.jsonl"])
@pytest.mark.parametrize("text", ["", "\n  \n", "[]"])
def test_empty_json_file_says_it_has_no_records(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')}: the file has no records"):
        load_records(str(tmp_path / name))


def test_json_list_syntax_error_names_line_and_column(tmp_path):
    folder_with_images(tmp_path)
    text = json.dumps([record(0), record(1)], indent=1)
    (tmp_path / "records.json").write_text(text.replace('"which digit?"', '"which digit?', 1))
    with pytest.raises(DataError, match=r"records\.json, line \d+, column \d+: not valid JSON"):
        load_records(str(tmp_path / "records.json"))


def test_json_line_that_is_not_an_object_is_named(tmp_path):
    folder_with_images(tmp_path)
    (tmp_path / "records.jsonl").write_text(json.dumps(record(0)) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r"records\.jsonl, record 1 \(line 2\): expected a JSON object"):
        load_records(str(tmp_path / "records.jsonl"))


def test_json_list_and_mixed_answer_types_are_read(tmp_path):
    folder_with_images(tmp_path)
    (tmp_path / "records.json").write_text(json.dumps([record(0, answer=0), record(1)], indent=2))
    ds = load_records(str(tmp_path / "records.json"))
    assert ds["answer"][:] == ["0", "1"] and ds[1]["image"].size == (8, 8)


# ------------------------------------------------------------------------ other inputs, each named


def test_missing_image_file_names_record_and_path(tmp_path):
    folder_with_images(tmp_path)
    path = write_jsonl(tmp_path / "records.jsonl", [record(0), record(1, image="imgs/9.png")])
    missing = tmp_path.resolve() / "imgs/9.png"
    with pytest.raises(DataError, match=r"records\.jsonl, record 1 \(line 2\): the image .* does not exist") as caught:
        load_records(str(path))
    assert str(missing) in str(caught.value)


def test_a_record_without_image_is_skipped_with_a_count(tmp_path, caplog):
    """Text-only records (LLaVA's mix has them) are skipped and counted, not an error (issue 18)."""
    folder_with_images(tmp_path)
    pd.DataFrame([record(0), record(1, image=None)]).to_parquet(tmp_path / "records.parquet")
    with caplog.at_level(logging.INFO, logger="dyvte.data.sources"):
        ds = load_records(str(tmp_path / "records.parquet"))
    assert len(ds) == 1 and ds[0]["question"] == record(0)["question"]
    assert "records.parquet: skipped 1 text-only records (no image)" in caplog.text


def test_missing_columns_name_the_file_and_columns(tmp_path):
    folder_with_images(tmp_path)
    records = [{k: v for k, v in record(i).items() if k != "answer"} for i in range(2)]
    write_jsonl(tmp_path / "records.jsonl", records)
    with pytest.raises(DataError, match=r"records\.jsonl: records lack \['answer'\]"):
        load_records(str(tmp_path / "records.jsonl"))
    pd.DataFrame(records).to_parquet(tmp_path / "records.parquet")
    with pytest.raises(DataError, match=r"records\.parquet: records lack \['answer'\]"):
        load_records(str(tmp_path / "records.parquet"))


def test_image_column_of_another_type_is_named(tmp_path):
    pd.DataFrame([record(0, image=3)]).to_parquet(tmp_path / "records.parquet")
    with pytest.raises(DataError, match=r"records\.parquet: the image column holds .*int64"):
        load_records(str(tmp_path / "records.parquet"))
    (tmp_path / "records.jsonl").write_text(json.dumps(record(0, image=3)) + "\n")
    with pytest.raises(DataError, match=r"records\.jsonl, record 0 \(line 1\): the image must be a path"):
        load_records(str(tmp_path / "records.jsonl"))


def test_unsupported_suffix_and_missing_file_are_named(tmp_path):
    (tmp_path / "records.csv").write_text("image,question,answer\n")
    with pytest.raises(DataError, match=r"records\.csv: unsupported records file suffix '\.csv'"):
        load_records(str(tmp_path / "records.csv"))
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file or directory"):
        load_records(str(tmp_path / "nope.jsonl"))


def test_empty_or_corrupt_parquet_is_named(tmp_path):
    schema = pa.schema([("image", pa.string()), ("question", pa.string()), ("answer", pa.string())])
    pq.write_table(schema.empty_table(), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match=r"empty\.parquet: the file has no records"):
        load_records(str(tmp_path / "empty.parquet"))
    (tmp_path / "corrupt.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"corrupt\.parquet: not a readable parquet file"):
        load_records(str(tmp_path / "corrupt.parquet"))


def test_missing_split_of_a_dataset_directory_is_named(tmp_path):
    png(tmp_path / "imgs/0.png")
    train = datasets.Dataset.from_list([record(0)])
    datasets.DatasetDict({"train": train}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"ds: no split 'test' \(splits: \['train'\]\)"):
        load_records(str(tmp_path / "ds"), split="test")


def test_limit_checks_only_the_kept_records(tmp_path):
    folder_with_images(tmp_path)
    path = write_jsonl(tmp_path / "records.jsonl", [record(0), record(1), record(2, question="")])
    assert len(load_records(str(path), limit=2)) == 2
    with pytest.raises(DataError, match=r"record 2 \(line 3\): the question is empty"):
        load_records(str(path))


def test_missing_numeric_answer_from_pandas_is_refused(tmp_path):
    folder_with_images(tmp_path)
    pd.DataFrame([record(0, answer=0.0), record(1, answer=float("nan"))]).to_parquet(tmp_path / "records.parquet")
    with pytest.raises(DataError, match=r"records\.parquet, record 1 has no answer"):  # not the answer "nan"
        load_records(str(tmp_path / "records.parquet"))


def test_pandas_column_oriented_json_is_named(tmp_path):
    folder_with_images(tmp_path)
    pd.DataFrame([record(0), record(1)]).to_json(tmp_path / "records.json")
    with pytest.raises(DataError, match=r"records\.json: one JSON object of columns"):
        load_records(str(tmp_path / "records.json"))
    pd.DataFrame([record(0), record(1)]).to_json(tmp_path / "records.json", orient="records", lines=True)
    assert len(load_records(str(tmp_path / "records.json"))) == 2


def test_image_url_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "records.jsonl", [record(0, image="https://example.com/0.png")])
    with pytest.raises(DataError, match=r"record 0 \(line 1\): the image .* is a URL; dyvte does not download"):
        load_records(str(path))


def test_load_config_reads_the_config_load_model_would_load(tmp_path):
    """``load_config`` (what fit.py reads the FLOPs shape from): the demo, an adapter's base, a missing directory."""
    from dyvte.data.sources import load_config
    from dyvte.demo import demo_checkpoint_dir

    demo = load_config("demo")
    assert demo.to_dict() == load_config(str(demo_checkpoint_dir("demo-mllm"))).to_dict()
    assert load_config(str(demo_checkpoint_dir("demo-lora-vtw"))).to_dict() == demo.to_dict()  # its base: "demo"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(str(tmp_path / "missing"))
