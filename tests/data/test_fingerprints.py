"""Record fingerprints (dyvte.data.fingerprints): one digest per (question, answer, earlier turns, image bytes), the
same whatever the image's file name, new when the image changes under its old name; read without decoding images;
and the overlap rule the launchers apply (warn on any copy, refuse above 5% unless ``--allow_overlap true``)."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from dyvte.data.fingerprints import (
    MAX_OVERLAP,
    SHORT_DIGEST,
    Overlap,
    check_overlaps,
    combined_digest,
    count_in,
    fingerprint_records,
    record_digest,
    short_digests,
    split_digests,
)
from dyvte.data.sources import load_records

from ..tiny_models import make_image, records


@pytest.fixture
def saved(tmp_path):
    """Three records with their images saved as PNG files, and a JSONL file naming them."""
    import json

    recs = records(3)
    lines = []
    for i, rec in enumerate(recs):
        rec["image"].save(tmp_path / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png", "question": rec["question"], "answer": rec["answer"]}))
    (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path, recs


def test_a_digest_is_the_record_not_its_file_names(saved):
    root, recs = saved
    shutil.copy(root / "img0.png", root / "copy-of-img0.png")
    first = {"image": str(root / "img0.png"), "question": recs[0]["question"], "answer": recs[0]["answer"]}
    same = {**first, "image": str(root / "copy-of-img0.png"), "qtype": "other"}  # another name, another qtype
    assert record_digest(first) == record_digest(same)
    assert record_digest(first) == record_digest({**first, "image": {"bytes": None, "path": first["image"]}})
    assert record_digest(first) == record_digest({**first, "image": (root / "img0.png").read_bytes()})
    # each field of the task changes it
    assert record_digest({**first, "question": first["question"] + " again"}) != record_digest(first)
    assert record_digest({**first, "answer": "another"}) != record_digest(first)
    assert record_digest({**first, "context": [{"question": "what", "answer": "that"}]}) != record_digest(first)
    assert record_digest({**first, "image": str(root / "img1.png")}) != record_digest(first)
    # the answer as gold_text writes it: 3 and 3.0 are the answer "3"
    assert (
        record_digest({**first, "answer": 3})
        == record_digest({**first, "answer": 3.0})
        == record_digest({**first, "answer": "3"})
    )
    # an image changed under its old name: a new digest
    before = record_digest(first)
    make_image(32, 32, np.random.default_rng(99)).save(root / "img0.png")
    assert record_digest(first) != before


def test_in_memory_images_hash_their_pixels():
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    record = {"image": image, "question": "q", "answer": "a"}
    assert record_digest(record) == record_digest({**record, "image": image.copy()})
    assert record_digest(record) != record_digest({**record, "image": Image.new("RGB", (8, 8), (10, 20, 31))})
    assert record_digest(record) != record_digest({**record, "image": image.convert("L")})


def test_datasets_are_hashed_as_stored_without_decoding_an_image(saved, monkeypatch):
    root, _ = saved
    dataset = load_records(str(root / "records.jsonl"), "train")  # image paths, as launchers read them
    rows = [
        {"image": str(root / f"img{i}.png"), **{k: dataset[i][k] for k in ("question", "answer")}} for i in range(3)
    ]
    expected = [record_digest(row) for row in rows]

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(Image, "open", no_decoding)
    prints = fingerprint_records(dataset)
    assert prints.digests == expected and split_digests(dataset) == expected
    assert not prints.embedded  # the images are files the records name: their bytes may change under them
    monkeypatch.undo()
    embedded = fingerprint_records([{**row, "image": Image.open(row["image"])} for row in rows])
    assert embedded.embedded and len(embedded.digests) == 3


def test_compact_digests_and_counts(saved):
    root, _ = saved
    digests = split_digests(load_records(str(root / "records.jsonl"), "train"))
    short = short_digests([*digests, digests[0]])  # duplicates collapse; sorted
    assert short == sorted({d[:SHORT_DIGEST] for d in digests}) and all(len(d) == SHORT_DIGEST for d in short)
    assert count_in(digests, short) == count_in(digests, set(digests)) == 3
    assert count_in([digests[0], digests[0], "f" * 40], set(digests[1:])) == 0
    assert count_in([digests[0], digests[0], "f" * 40], short) == 2
    assert combined_digest(digests) != combined_digest(digests[::-1])  # order counts: the cache key of a split


def test_overlaps_are_warned_and_refused_above_the_limit(caplog):
    none = [Overlap("validation records", "training records", 0, 100)]
    with caplog.at_level(logging.WARNING):
        check_overlaps(none, False, "why")
    assert caplog.text == ""
    few = [Overlap("validation records", "training records", 5, 100)]  # 5%: at the limit, warned
    with caplog.at_level(logging.WARNING):
        check_overlaps(few, False, "held-out figures overstate")
    assert "5 of the 100 validation records (5.0%) are copies of training records" in caplog.text
    assert f"more than {MAX_OVERLAP:.0%} would be refused" in caplog.text
    many = [*few, Overlap("calibration records", "training records", 7, 100)]
    with pytest.raises(ValueError) as refused:
        check_overlaps(many, False, "held-out figures overstate", done="Nothing was labelled.")
    message = str(refused.value)
    assert "5 of the 100 validation records (5.0%)" in message and "7 of the 100 calibration records (7.0%)" in message
    assert "--allow_overlap true" in message and message.endswith("Nothing was labelled.")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_overlaps(many, True, "held-out figures overstate")  # allowed: warned, with the option named
    assert "7 of the 100 calibration records" in caplog.text and "(--allow_overlap true)" in caplog.text
