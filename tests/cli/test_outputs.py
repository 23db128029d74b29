"""What the launchers write (dyvte.cli: fit, evaluate, calibrate, report), and where they refuse to write, before any
work: a folder holding an earlier run is replaced as a whole only with ``--overwrite true`` (or in the launcher's
default folder, with a warning), so no stale file survives beside new results; a folder holding anything else is
never replaced; an unwritable folder or a file where a folder goes is refused before the model loads; written files
have the umask's modes; and calibrated thresholds are not evaluated on the records that calibrated them.

Cases (docs/robustness.md, "Launchers' outputs").
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
import torch

import dyvte.data.sources
from dyvte.cli import calibrate as calibrate_cli
from dyvte.cli import evaluate as evaluate_cli
from dyvte.cli import report as report_cli
from dyvte.data.fingerprints import short_digests, split_digests
from dyvte.data.sources import load_records
from dyvte.policies.exit_heads import CONFIG_NAME, ExitHeads

from ..scripts import fit_args, load_script, make_fit_setup


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory) -> Path:
    """A tiny 4-layer LLaVA in from_pretrained layout and 12 records in one JSONL file."""
    return make_fit_setup(tmp_path_factory.mktemp("outputs"))


@pytest.fixture
def umask():
    """The umask set to ``0o022`` for the test, restored afterwards."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def _forbid(*_args, **_kwargs):
    raise AssertionError("work started: the bad input should have been refused before it")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _evaluate_kwargs(root: Path, **more) -> dict:
    return {
        "model": str(root / "model"),
        "data": str(root / "records.jsonl"),
        "split": "train",
        "samples": 2,
        "methods": ["static:1"],
        "batch_size": 2,
        "max_new_tokens": 1,
        **more,
    }


def _unwritable(tmp_path: Path) -> Path:
    """An output folder no run can write: under a read-only folder, or (as root, who writes anywhere) under a file."""
    if os.geteuid() == 0:
        (tmp_path / "a-file").write_text("x")
        return tmp_path / "a-file" / "out"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return locked / "out"


# ------------------------------------------------------------------------------ evaluate
def test_evaluate_into_an_earlier_runs_folder_is_refused_then_replaced_as_a_whole(setup_dir, tmp_path, monkeypatch):
    """The old per-method files stayed beside a new results.json; now the folder is one run's, or refused."""
    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.json").write_text("{}")
    (out / "static_K=3.json").write_text("a method of the earlier run only")
    with monkeypatch.context() as patch:
        patch.setattr(evaluate_cli, "load_model", _forbid)
        with pytest.raises(ValueError, match=r"--output_dir .*eval holds an earlier evaluation .*--overwrite true"):
            evaluate_cli.main(**_evaluate_kwargs(setup_dir), output_dir=str(out))
    assert _names(out) == ["results.json", "static_K=3.json"]
    evaluate_cli.main(**_evaluate_kwargs(setup_dir), output_dir=str(out), overwrite=True)
    expected = ["accuracy_vs_flops.png", "full.json", "results.json", evaluate_cli.file_name("static K=1")]
    assert _names(out) == sorted(expected)  # the earlier run's static_K=3.json is gone
    assert _names(tmp_path) == ["eval"]  # no temporary or replaced folder left


def test_a_folder_that_is_not_a_runs_output_is_never_replaced(setup_dir, tmp_path, monkeypatch):
    """--overwrite replaces an earlier run's folder, never a folder of other things (--output_dir . or docs/)."""
    monkeypatch.setattr(evaluate_cli, "load_model", _forbid)
    monkeypatch.setattr(calibrate_cli, "load_model", _forbid)
    monkeypatch.setattr(dyvte.data.sources, "load_model", _forbid)
    (tmp_path / "notes.md").write_text("mine")
    with pytest.raises(ValueError, match=r"is not empty \(notes\.md\) and holds no results\.json"):
        evaluate_cli.main(**_evaluate_kwargs(setup_dir), output_dir=str(tmp_path), overwrite=True)
    with pytest.raises(ValueError, match=r"holds no calibration\.json"):
        calibrate_cli.main(model=str(setup_dir / "model"), output=str(tmp_path), overwrite=True)
    with pytest.raises(ValueError, match=rf"holds no {CONFIG_NAME}"):
        load_script("train/fit.py").main(fit_args(tmp_path.parent, tmp_path.name, 1, ["--overwrite=true"]))
    assert _names(tmp_path) == ["notes.md"] and (tmp_path / "notes.md").read_text() == "mine"


def test_the_default_folder_is_replaced_with_a_warning(setup_dir, tmp_path, monkeypatch, caplog):
    """`python train/evaluate.py` twice: the default runs/eval is the latest run's, and the log says what it
    replaced."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "eval"
    out.mkdir(parents=True)
    (out / "results.json").write_text("{}")
    (out / "stale.json").write_text("an earlier method")
    with caplog.at_level(logging.WARNING):
        evaluate_cli.main(**_evaluate_kwargs(setup_dir), output_dir=str(out))  # the default, spelled out
    assert "stale.json" not in _names(out) and "results.json" in _names(out)
    assert "the earlier evaluation in" in caplog.text and "(the default --output_dir; give --output_dir DIR" in (
        caplog.text
    )


def test_calibrated_thresholds_are_not_evaluated_on_their_calibration_records(setup_dir, tmp_path, monkeypatch, caplog):
    """calibrate.py and fit.py save their calibration records' digests; evaluate compares, before any forward."""
    calibration = tmp_path / "cal"
    cal = calibrate_cli.main(
        model=str(setup_dir / "model"),
        data=str(setup_dir / "records.jsonl"),
        split="train",
        samples=6,
        output=str(calibration),
        batch_size=3,
    )
    sampled = load_records(str(setup_dir / "records.jsonl"), "train", sample=6)
    assert cal.record_digests == short_digests(split_digests(sampled)) and len(cal.record_digests) == 6
    forwards: list[int] = []
    real = evaluate_cli.load_model

    def counting(*args, **kwargs):
        model, processor = real(*args, **kwargs)
        model.register_forward_pre_hook(lambda *_: forwards.append(1))
        return model, processor

    monkeypatch.setattr(evaluate_cli, "load_model", counting)
    kwargs = _evaluate_kwargs(setup_dir, samples=None, methods=[f"calibrated:{calibration}"])
    with pytest.raises(ValueError) as refused:
        evaluate_cli.main(**kwargs, output_dir=str(tmp_path / "eval"))
    assert "6 of the 12 records of --data" in str(refused.value) and "(50.0%)" in str(refused.value)
    assert "--allow_overlap true" in str(refused.value)
    assert forwards == [] and not (tmp_path / "eval").exists()
    # heads whose calibrated thresholds were chosen on all 12 records: refused at their thresholds, not at a P of ours
    model = real(str(setup_dir / "model"))[0]
    heads = ExitHeads.for_model(model)
    heads.config.thresholds = [0.5] * heads.num_heads
    everything = load_records(str(setup_dir / "records.jsonl"), "train")
    heads.config.calibration = {"tolerance": 0.5, "record_digests": short_digests(split_digests(everything))}
    heads.save_pretrained(tmp_path / "heads")
    kwargs = _evaluate_kwargs(setup_dir, samples=None, methods=[f"heads:{tmp_path / 'heads'}"])
    with pytest.raises(ValueError, match=r"12 of the 12 records .* \(100\.0%\) are copies of records heads\("):
        evaluate_cli.main(**kwargs, output_dir=str(tmp_path / "eval"))
    assert forwards == []
    with caplog.at_level(logging.WARNING):  # allowed: it runs, and the log keeps the count
        evaluate_cli.main(**kwargs, output_dir=str(tmp_path / "eval"), allow_overlap=True)
    assert "12 of the 12 records" in caplog.text and "(--allow_overlap true)" in caplog.text
    kwargs["methods"] = [f"heads:{tmp_path / 'heads'}:0.5"]  # a threshold of the caller's: nothing calibrated to check
    evaluate_cli.main(**kwargs, output_dir=str(tmp_path / "eval2"))
    assert forwards


# ------------------------------------------------------------------------------ calibrate and report
def test_calibrate_into_an_existing_file_is_refused_before_work(setup_dir, tmp_path, monkeypatch):
    """It raised a raw FileExistsError after the calibration had run."""
    monkeypatch.setattr(calibrate_cli, "load_model", _forbid)
    (tmp_path / "a-file").write_text("keep me")
    with pytest.raises(ValueError, match=r"--output .*a-file is an existing file, not a directory"):
        calibrate_cli.main(model=str(setup_dir / "model"), output=str(tmp_path / "a-file"))
    assert (tmp_path / "a-file").read_text() == "keep me"


def test_calibrate_writes_the_umasks_modes_and_replaces_only_with_overwrite(setup_dir, tmp_path, umask, monkeypatch):
    """Every file was 0o600 (mkstemp's mode): another user could not load shared outputs."""
    kwargs = {"model": str(setup_dir / "model"), "data": str(setup_dir / "records.jsonl"), "split": "train"}
    kwargs |= {"samples": 2, "batch_size": 2, "output": str(tmp_path / "cal")}
    calibrate_cli.main(**kwargs)
    assert _mode(tmp_path / "cal") == 0o755 and _mode(tmp_path / "cal" / "calibration.json") == 0o644
    (tmp_path / "cal" / "stale.txt").write_text("x")
    with monkeypatch.context() as patch:
        patch.setattr(calibrate_cli, "load_model", _forbid)
        with pytest.raises(ValueError, match=r"--output .*cal holds an earlier calibration"):
            calibrate_cli.main(**kwargs)
    calibrate_cli.main(**kwargs, overwrite=True)
    assert _names(tmp_path / "cal") == ["calibration.json"]


def test_report_refuses_to_replace_an_earlier_report_without_overwrite(tmp_path, monkeypatch):
    """report writes three named files into a folder of other things (docs/): those, and only with --overwrite."""
    monkeypatch.setattr(report_cli, "load_model", _forbid)
    (tmp_path / "report.md").write_text("the committed report")
    (tmp_path / "guide.md").write_text("not the report's")
    with pytest.raises(ValueError, match=r"--output_dir .* already holds report\.md of an earlier report: pass "):
        report_cli.main(output_dir=str(tmp_path))
    assert (tmp_path / "report.md").read_text() == "the committed report"


# ------------------------------------------------------------------------------ every launcher: unwritable folders
@pytest.mark.parametrize("launcher", ["fit", "evaluate", "calibrate", "report"])
def test_an_unwritable_output_folder_is_refused_before_the_model_loads(setup_dir, tmp_path, monkeypatch, launcher):
    """It failed only after all the work."""
    for module in (evaluate_cli, calibrate_cli, report_cli, dyvte.data.sources):
        monkeypatch.setattr(module, "load_model", _forbid)
    out = _unwritable(tmp_path)
    try:
        with pytest.raises(ValueError, match=r"--output(_dir)? .*out: cannot write there"):
            if launcher == "fit":
                load_script("train/fit.py").main(fit_args(out.parent, out.name, 1))
            elif launcher == "evaluate":
                evaluate_cli.main(**_evaluate_kwargs(setup_dir), output_dir=str(out))
            elif launcher == "calibrate":
                calibrate_cli.main(model=str(setup_dir / "model"), output=str(out))
            else:
                report_cli.main(output_dir=str(out))
    finally:
        if out.parent.is_dir():
            out.parent.chmod(0o755)


# ------------------------------------------------------------------------------ fit
def test_fit_into_a_folder_of_heads_is_refused_then_replaced_as_a_whole(setup_dir, monkeypatch, umask):
    """Good heads were silently replaced by a later run's (e.g. heads that never fire)."""
    out = setup_dir / "heads-kept"
    torch.manual_seed(0)
    ExitHeads.for_model(dyvte.data.sources.load_model(str(setup_dir / "model"))[0]).save_pretrained(out)
    (out / "notes.txt").write_text("a file of the earlier run")
    before = (out / "exit_heads.safetensors").read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(dyvte.data.sources, "load_model", _forbid)
        with pytest.raises(ValueError, match=r"--output_dir .*heads-kept holds an earlier fit run's exit heads"):
            load_script("train/fit.py").main(fit_args(setup_dir, "heads-kept", 1))
    assert (out / "exit_heads.safetensors").read_bytes() == before
    load_script("train/fit.py").main(fit_args(setup_dir, "heads-kept", 1, ["--overwrite=true"]))
    assert _names(out) == ["exit_heads.safetensors", "exit_heads_config.json", "training.json"]
    assert (out / "exit_heads.safetensors").read_bytes() != before
    assert _mode(out) == 0o755 and {_mode(p) for p in out.iterdir()} == {0o644}


def test_fit_run_twice_into_its_default_folder_replaces_the_first_run(setup_dir, tmp_path, monkeypatch, caplog):
    """The README's `python train/fit.py`, run again: the default folder holds the latest heads, and the log says
    which run it replaced; no file of the first run survives."""
    monkeypatch.chdir(tmp_path)
    args = [a for a in fit_args(setup_dir, "unused", 1) if not a.startswith("--output_dir")]
    fit = load_script("train/fit.py").main
    fit(args)
    out = tmp_path / "runs" / "fit-model" / "exit-heads"
    (out / "stale.txt").write_text("left by hand")
    with caplog.at_level(logging.WARNING):
        fit(args)
    assert "stale.txt" not in _names(out) and ExitHeads.from_pretrained(out).config.num_layers == 4
    assert f"the earlier fit run's exit heads in {out}" in caplog.text and "the default --output_dir" in caplog.text
