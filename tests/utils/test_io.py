"""Atomic writes (dyvte.utils.io): a crash or a failing disk while writing leaves the old file where a good one
stood, and no temporary file behind: ``atomic_path`` itself, and the files written through it (exit heads, evaluation
results); a file where a directory is expected is named.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dyvte.policies.exit_heads
from dyvte.eval.harness import EvalResult
from dyvte.policies.exit_heads import CONFIG_NAME, WEIGHTS_NAME, ExitHeads, ExitHeadsConfig
from dyvte.utils.io import atomic_path


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    target = tmp_path / "calibration.json"
    target.write_text("good")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["calibration.json"]  # no temporary file left behind


def _heads(seed: int) -> ExitHeads:
    torch.manual_seed(seed)
    return ExitHeads(ExitHeadsConfig("llava", 16, 3, threshold=0.5 if seed == 0 else 0.7))


def _same_weights(a: ExitHeads, b: ExitHeads) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def _half_write(self: Path, text: str, *args, **kwargs) -> int:
    with open(self, "w") as handle:
        handle.write(text[: len(text) // 2])
    raise OSError("disk full (simulated)")


def test_a_heads_save_that_fails_midway_leaves_the_old_heads(tmp_path, monkeypatch):
    old, new = _heads(0), _heads(1)
    old.save_pretrained(tmp_path)
    assert not _same_weights(old, new)

    def broken_save_file(state, filename, metadata=None):  # the weights file is cut short, then the save fails
        Path(filename).write_bytes(b"\0" * 10)
        raise OSError("disk full (simulated)")

    with monkeypatch.context() as mp:
        mp.setattr(dyvte.policies.exit_heads, "save_file", broken_save_file)
        with pytest.raises(OSError, match="simulated"):
            new.save_pretrained(tmp_path)
    loaded = ExitHeads.from_pretrained(tmp_path)
    assert _same_weights(loaded, old) and loaded.config == old.config
    with monkeypatch.context() as mp:  # the weights are written, the config is cut short: neither file is replaced
        mp.setattr(Path, "write_text", _half_write)
        with pytest.raises(OSError, match="simulated"):
            new.save_pretrained(tmp_path)
    loaded = ExitHeads.from_pretrained(tmp_path)
    assert _same_weights(loaded, old) and loaded.config == old.config
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_NAME, CONFIG_NAME]  # no temporary file left
    new.save_pretrained(tmp_path)
    assert _same_weights(ExitHeads.from_pretrained(tmp_path), new)


def test_heads_saved_into_an_existing_file_name_it(tmp_path):
    (tmp_path / "heads").write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="is an existing file"):
        _heads(0).save_pretrained(tmp_path / "heads")


def test_a_result_save_that_fails_midway_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "full.json"
    old = EvalResult("full", {"all": {"accuracy": 0.95}}, ["1"], [4], [1.0], ["a"])
    old.save(path)
    before = path.read_text()
    monkeypatch.setattr(Path, "write_text", _half_write)
    with pytest.raises(OSError, match="simulated"):
        EvalResult("full", {"all": {"accuracy": 0.5}}, ["2"], [4], [1.0], ["a"]).save(path)
    monkeypatch.undo()
    assert path.read_text() == before and EvalResult.load(path) == old
    assert [p.name for p in tmp_path.iterdir()] == ["full.json"]
