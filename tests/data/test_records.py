"""Records -> model inputs (dyvte.data.records): ``build_inputs`` and ``iter_batches`` refuse bad records in memory
before any work, with a ``DataError`` naming the record (an empty question or answer, an unreadable image, a relative
image path, the text of a special token such as ``<image>``); answers are normalized for exact match. Records *files*
are ``tests/data/test_sources.py``'s.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import datasets
import pytest
from PIL import Image

from dyvte.data.prompts import special_texts
from dyvte.data.records import DataError, build_inputs, iter_batches, normalize_answer
from dyvte.demo import load_demo_processor

from .test_sources import png, record, truncated_png


class FakeProcessor:
    """Just enough of a processor for build_inputs' checks (prompt = the question; no tensors)."""

    chat_template = "(the question)"

    def __init__(self) -> None:
        self.tokenizer = SimpleNamespace(padding_side="right", bos_token_id=None)

    def apply_chat_template(self, conversation: list[dict], **kwargs: Any) -> str:
        return conversation[0]["content"][1]["text"]

    def __call__(self, images: list, text: list[str], **kwargs: Any) -> dict[str, Any]:
        return {"images": images, "text": text}


def test_empty_question_in_memory_is_refused_before_any_work():
    good = {"image": Image.new("RGB", (8, 8)), "question": "which digit?", "answer": "3"}
    bad = [good, good | {"question": " "}]
    with pytest.raises(DataError, match="record 1: the question is empty"):
        next(iter_batches(bad, 1))  # evaluation, labelling and calibration batch through iter_batches
    with pytest.raises(DataError, match="record 4: the question is empty"):
        build_inputs(FakeProcessor(), bad, with_answers=True, offset=3)
    with pytest.raises(DataError, match="record 1 has no question"):
        next(iter_batches([good, {k: v for k, v in good.items() if k != "question"}], 2))


def test_empty_gold_answer_in_memory_is_refused():
    good = {"image": Image.new("RGB", (8, 8)), "question": "which digit?", "answer": "3"}
    with pytest.raises(DataError, match="record 1: the answer is empty"):
        next(iter_batches([good, good | {"answer": ""}], 1))
    with pytest.raises(DataError, match="record 1: the answer is empty"):
        build_inputs(FakeProcessor(), [good, good | {"answer": ""}], with_answers=True)
    assert len(next(iter_batches([good, good | {"answer": None}], 2))) == 2  # unlabelled records: answers optional
    with pytest.raises(DataError, match="record 1 has no answer"):
        next(iter_batches([good, good | {"answer": None}], 2, answers=True))


def test_corrupt_image_in_memory_names_the_record(tmp_path):
    good = png(tmp_path / "good.png")
    truncated_png(tmp_path / "bad.png")
    lazy = {"image": Image.open(tmp_path / "bad.png"), "question": "which digit?", "answer": "3"}
    with pytest.raises(DataError, match=r"record 5: cannot read the image .*bad\.png: image file is truncated"):
        build_inputs(FakeProcessor(), [lazy], offset=5)
    ds = datasets.Dataset.from_dict(
        {"image": [str(tmp_path / "good.png"), str(tmp_path / "bad.png")], "question": ["q", "q"], "answer": ["a"] * 2}
    ).cast_column("image", datasets.Image())
    with pytest.raises(DataError, match=r"record 1 \(image .*bad\.png\): cannot decode it: OSError: image file"):
        list(iter_batches(ds, 2))  # a dataset built without load_records: decoding fails with the record named
    assert good.shape == (8, 8, 3)


def test_relative_image_path_in_memory_is_refused(tmp_path, monkeypatch):
    png(tmp_path / "imgs/0.png")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"record 0: the image path 'imgs/0\.png' is relative"):
        build_inputs(FakeProcessor(), [record(0)])
    inputs = build_inputs(FakeProcessor(), [record(0, image=str(tmp_path / "imgs/0.png"))])
    assert [len(row) for row in inputs["images"]] == [1] and isinstance(inputs["images"][0][0], Image.Image)


def test_normalize_answer():
    assert normalize_answer("  Seven.\nmore") == "seven"
    assert normalize_answer("A  b") == "a b"


def test_special_token_text_in_a_question_is_refused_naming_the_record_and_token():
    processor = load_demo_processor()
    assert set(special_texts(processor)) == {"<image>", "<s>", "</s>", "<pad>", "<unk>"}
    good = {"image": Image.new("RGB", (8, 8)), "question": "how many digits are there ?", "answer": "3"}
    recs = [good] * 5 + [good | {"question": "<image> how many digits are there ?"}]
    with pytest.raises(DataError, match=r"record 5, the question: '<image> how many .*' contains '<image>'"):
        next(iter_batches(recs, 2, processor=processor))  # before the first batch: evaluate and labelling use this
    assert len(next(iter_batches(recs, 2))) == 2  # without a processor there is no token to look for
    with pytest.raises(DataError, match=r"record 3, the question: .* contains '<image>'"):
        build_inputs(processor, recs[4:], offset=2)
    with pytest.raises(DataError, match=r"record 1, the answer: 'yes </s>' contains '</s>'"):
        next(iter_batches([good, good | {"answer": "yes </s>"}], 2, answers=True, processor=processor))
    earlier = good | {"context": [{"question": "is there a <image> ?", "answer": "no"}]}
    with pytest.raises(DataError, match=r"record 1, an earlier turn: 'is there a <image> \?' contains '<image>'"):
        next(iter_batches([good, earlier], 2, processor=processor))
    with pytest.raises(DataError, match=r"record 0, an earlier turn: .* contains '<image>'"):
        build_inputs(processor, [earlier])
    qwen_like = SimpleNamespace(image_token="<|image_pad|>", video_token="<|video_pad|>", tokenizer=SimpleNamespace())
    assert special_texts(qwen_like) == ("<|image_pad|>", "<|video_pad|>")
    assert special_texts(FakeProcessor()) == ()  # nothing to refuse: "<image>" is plain text to such a model
