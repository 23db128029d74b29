"""dyvte.engine.fingerprint: what ties heads, calibrations and label caches to their model.

- the same weights give the same fingerprint in float32, bfloat16 and float16; other weights of the same shape
  (scaled, or an adapter loaded on them) give another, and the difference names the ``weights`` field only;
- the tokenizer field follows the vocabulary, the chat template and an attached prompt template;
- a check refuses a mismatch naming each field, warns once under ``allow_other_model`` or for a file without a
  fingerprint, and never compares the writer's dyvte version;
- a checkpoint directory's digest follows its files' contents (a sample of the large ones), not their times.

The demo's heads and calibration on the LoRA-merged demo are ``tests/policies``' (test_exit_heads, test_policies).
"""

from __future__ import annotations

import copy
import logging
import os

import pytest
import torch

import dyvte.engine.fingerprint as fp
from dyvte.engine.fingerprint import (
    ModelMismatchError,
    check_fingerprint,
    files_digest,
    fingerprint_differences,
    model_fingerprint,
)
from dyvte.engine.registry import resolve

from ..tiny_models import TEMPLATE, make_tiny


@pytest.fixture(scope="module")
def tiny():
    model, processor = make_tiny("llava")
    processor.chat_template = TEMPLATE
    return model, processor


def test_the_same_weights_in_every_precision_match_and_other_weights_do_not(tiny):
    model, processor = tiny
    saved = model_fingerprint(model, processor)
    assert set(saved) == {"format", "model_type", "architecture", "weights", "tokenizer", "dyvte"}
    vocab = model.config.text_config.vocab_size
    assert saved["architecture"] == {"num_layers": 4, "hidden_size": 64, "vocab_size": vocab}
    assert model_fingerprint(model, processor) == saved  # deterministic
    for dtype in (torch.bfloat16, torch.float16):  # the same checkpoint loaded in another precision
        assert fingerprint_differences(saved, model_fingerprint(copy.deepcopy(model).to(dtype), processor)) == []
    other = copy.deepcopy(model)
    with torch.no_grad():  # a fine-tune of one projection: the same type, width and depth
        resolve(other).layers[2].self_attn.q_proj.weight.mul_(1.01)
    differences = fingerprint_differences(saved, model_fingerprint(other, processor))
    assert len(differences) == 1 and differences[0].startswith("weights differ")
    assert fingerprint_differences({**saved, "dyvte": "0.0.1"}, model_fingerprint(model, processor)) == []


def test_the_tokenizer_field_follows_the_vocabulary_and_the_templates(tiny):
    model, processor = tiny
    saved = model_fingerprint(model, processor)
    assert "tokenizer" not in model_fingerprint(model)  # no processor: weights only, and nothing to compare
    assert fingerprint_differences(saved, model_fingerprint(model)) == []
    changed = copy.deepcopy(processor)
    changed.chat_template = TEMPLATE.replace("<image> ", "<image>\n")
    assert [d.split(" ")[0] for d in fingerprint_differences(saved, model_fingerprint(model, changed))] == ["tokenizer"]
    prompted = copy.deepcopy(processor)
    prompted.dyvte_prompt_template = "USER: <image>\n{question} ASSISTANT:"  # what attach_prompt_template sets
    assert fingerprint_differences(saved, model_fingerprint(model, prompted))[0].startswith("tokenizer differs")


def test_a_check_refuses_names_warns_once_and_allows_on_request(tiny, caplog):
    model, processor = tiny
    other = copy.deepcopy(model)
    with torch.no_grad():
        resolve(other).layers[0].mlp.up_proj.weight.add_(0.05)
    saved = model_fingerprint(other, processor)
    saved["model_type"] = "llava_next"
    with pytest.raises(ModelMismatchError, match=r"heads X was made for another model: model_type 'llava_next', this "):
        check_fingerprint(saved, model, what="heads X")
    with pytest.raises(ModelMismatchError, match=r"weights differ.*allow_other_model=True"):
        check_fingerprint(saved, model, what="heads X")
    logged: set[str] = set()
    with caplog.at_level(logging.WARNING, logger="dyvte.engine.fingerprint"):
        for _ in range(2):
            check_fingerprint(saved, model, what="heads X", allow_other_model=True, logged=logged)
            check_fingerprint(None, model, what="old heads", logged=logged)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2  # each warning once for the same file
    assert "weights differ" in messages[0] and "Used anyway (allow_other_model=True)" in messages[0]
    assert "old heads carries no model fingerprint" in messages[1] and "cannot be checked" in messages[1]
    check_fingerprint(model_fingerprint(model, processor), model, processor, what="heads X")  # its own model
    with pytest.raises(ValueError, match="model_fingerprint must be a dict"):
        check_fingerprint({"model_type": "llava"}, model, what="heads X")


def test_fingerprint_of_a_model_reads_a_sample_not_every_value(tiny, monkeypatch):
    """The cost stays a few values per tensor: a tensor far larger than the sample adds 32 values."""
    model, _ = tiny
    seen: list[int] = []
    indices = fp._sample_indices

    def counting(numel: int) -> torch.Tensor:
        picked = indices(numel)
        seen.append(len(picked))
        return picked

    monkeypatch.setattr(fp, "_sample_indices", counting)
    model_fingerprint(model)
    assert max(seen) == fp.SAMPLES_PER_TENSOR and len(seen) == len(list(model.parameters()))
    picked = indices(4096 * 4096)
    assert len(set((picked % 4096).tolist())) == fp.SAMPLES_PER_TENSOR  # spread over columns, not one column


def test_a_directory_digest_follows_contents_not_times(tmp_path, monkeypatch):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    weights = model_dir / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * 64)
    (model_dir / "config.json").write_text("{}")
    digest = files_digest(model_dir)
    os.utime(weights, (1, 1))
    (model_dir / "README.md").write_text("notes")  # not the model
    (model_dir / "training.json").write_text("{}")
    assert files_digest(model_dir) == digest
    data = bytearray(weights.read_bytes())
    data[5000] ^= 1
    weights.write_bytes(bytes(data))
    assert files_digest(model_dir) != digest
    # a large file is read by its head, tail and evenly spaced chunks (sizes shrunk here)
    monkeypatch.setattr(fp, "WHOLE_FILE_BYTES", 1024)
    monkeypatch.setattr(fp, "HEAD_BYTES", 256)
    monkeypatch.setattr(fp, "CHUNK_BYTES", 16)
    monkeypatch.setattr(fp, "CHUNKS", 8)
    sampled = files_digest(model_dir)
    middle = 256 + 3 * (len(data) - 512) // 8  # the start of the fourth chunk
    data[middle] ^= 1
    weights.write_bytes(bytes(data))
    assert files_digest(model_dir) != sampled
    with pytest.raises(FileNotFoundError, match="does not exist"):
        files_digest(tmp_path / "missing")
