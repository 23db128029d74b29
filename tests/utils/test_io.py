"""Atomic writes (dyvte.utils.io): a crash or a failing disk while writing leaves the old file where a good one
stood, and no temporary file behind: ``atomic_path`` itself, and the files written through it (exit heads, evaluation
results); a file where a directory is expected is named. Whole output folders (``staged_dir``) and sets of files
(``staged_files``) replace the old ones only once complete; what dyvte writes has the umask's modes, not the private
modes of its temporary files; an unwritable folder is refused up front (``check_writable``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

import dyvte.policies.exit_heads
from dyvte.eval.harness import EvalResult
from dyvte.policies.exit_heads import CONFIG_NAME, WEIGHTS_NAME, ExitHeads, ExitHeadsConfig
from dyvte.utils.io import atomic_path, check_writable, staged_dir, staged_files, write_text_atomic


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


@pytest.fixture
def umask():
    """Set the process umask for a test (``umask(0o022)``); the old one is restored afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_and_folders_have_the_umasks_modes(tmp_path, umask):
    """mkstemp / mkdtemp create 0o600 / 0o700: another user could not read shared heads. Now: what open would give."""
    umask(0o022)
    file = write_text_atomic(tmp_path / "a" / "training.json", "{}\n")
    assert _mode(file) == 0o644
    _heads(0).save_pretrained(tmp_path / "heads")
    assert {_mode(p) for p in (tmp_path / "heads").iterdir()} == {0o644}
    with staged_dir(tmp_path / "run") as folder:
        (folder / "results.json").write_text("{}")
    assert _mode(tmp_path / "run") == 0o755 and _mode(tmp_path / "run" / "results.json") == 0o644
    EvalResult("full", {"all": {"accuracy": 1.0}}, ["1"], [4], [1.0], ["a"]).save(tmp_path / "full.json")
    assert _mode(tmp_path / "full.json") == 0o644
    umask(0o077)  # a private umask is respected too
    assert _mode(write_text_atomic(tmp_path / "private.json", "{}\n")) == 0o600
    with staged_dir(tmp_path / "private") as folder:
        (folder / "x").write_text("x")
    assert _mode(tmp_path / "private") == 0o700


def test_a_staged_folder_replaces_the_old_one_as_a_whole_or_not_at_all(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.json").write_text("old")
    (out / "static K=9.json").write_text("a method of the old run only")
    with pytest.raises(RuntimeError), staged_dir(out) as folder:
        (folder / "results.json").write_text("new, cut short")
        raise RuntimeError("crash while writing")
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "static K=9.json"]  # untouched
    assert (out / "results.json").read_text() == "old"
    with staged_dir(out) as folder:
        (folder / "results.json").write_text("new")
    assert [p.name for p in out.iterdir()] == ["results.json"] and (out / "results.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]  # no temporary or replaced folder left behind


def test_staged_files_replace_only_their_own_files_together(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "guide.md").write_text("not the report's")
    (docs / "report.md").write_text("old report")
    with pytest.raises(RuntimeError), staged_files(docs) as folder:
        (folder / "report.md").write_text("new report")
        raise RuntimeError("the plot failed")
    assert (docs / "report.md").read_text() == "old report"  # nothing replaced before every file is complete
    with staged_files(docs) as folder:
        (folder / "report.md").write_text("new report")
        (folder / "plot.png").write_bytes(b"png")
    assert sorted(p.name for p in docs.iterdir()) == ["guide.md", "plot.png", "report.md"]
    assert (docs / "report.md").read_text() == "new report" and (docs / "guide.md").read_text() == "not the report's"


def test_an_unwritable_folder_is_refused_naming_the_option(tmp_path):
    check_writable(tmp_path / "new" / "deeper", "--output_dir")  # parents are created, the folder itself is not
    assert (tmp_path / "new").is_dir() and not (tmp_path / "new" / "deeper").exists()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match=r"--output_dir .*a-file/out: cannot write there"):
        check_writable(tmp_path / "a-file" / "out", "--output_dir")  # a file where a folder must be created
    if os.geteuid() == 0:
        return  # root writes into read-only folders: the case above stands for them
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for path in (locked, locked / "out"):
            with pytest.raises(ValueError, match=r"--output .*: cannot write there \(PermissionError"):
                check_writable(path, "--output")
    finally:
        locked.chmod(0o755)
