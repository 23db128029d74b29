"""The ``dyvte`` command (dyvte/cli): its commands are the ``train/`` launchers' jobs with the same options, its help
and errors, the extras a command needs, ``python -m dyvte`` and the console script's entry point.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import subprocess
import sys

import pytest

import dyvte
from dyvte import cli

from ..scripts import REPO_ROOT, fit_args, load_script, make_fit_setup

#: command -> its launcher under train/
LAUNCHERS = {
    "fit": "fit.py",
    "calibrate": "calibrate.py",
    "evaluate": "evaluate.py",
    "report": "report.py",
    "serve": "serve.py",
}


def test_help_lists_every_command_on_one_screen(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: dyvte [-h] [--version] COMMAND [OPTIONS]")
    lines = text.splitlines()
    assert len(lines) <= 30 and max(map(len, lines)) <= 120
    for name, launcher in LAUNCHERS.items():
        assert any(line.startswith(f"  {name} ") for line in lines), name
        assert f"the same as python train/{launcher}" in text
    assert "needs dyvte[train]; the same as python train/fit.py" in text
    assert "needs dyvte[train,eval]; the same as python train/evaluate.py" in text
    assert "needs dyvte[serve]; the same as python train/serve.py" in text


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"dyvte {dyvte.__version__}\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bogus"], "dyvte: error: unknown command 'bogus'; the commands are fit, calibrate, evaluate, report, serve"),
        (
            ["--bogus"],
            "dyvte: error: unknown option '--bogus'; the commands are fit, calibrate, evaluate, report, serve",
        ),
        ([], "dyvte: error: a command is required"),
    ],
)
def test_unknown_or_missing_command_is_refused_with_the_list_of_commands(capsys, argv, message):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


@pytest.mark.parametrize(
    ("command", "blocked", "extras"),
    [
        ("fit", "lightning", "dyvte[train]"),
        ("calibrate", "jsonargparse", "dyvte[train]"),
        ("evaluate", "matplotlib", "dyvte[train,eval]"),
        ("report", "torchmetrics", "dyvte[train,eval]"),
        ("serve", "fastapi", "dyvte[serve]"),
    ],
)
def test_a_missing_extra_is_named_before_the_command_runs(capsys, monkeypatch, command, blocked, extras):
    monkeypatch.setitem(sys.modules, blocked, None)  # find_spec answers None: as if it were not installed
    module = f"dyvte.cli.{cli.COMMANDS[command].module}"
    monkeypatch.delitem(sys.modules, module, raising=False)
    assert cli.main([command, "--help"]) == 2
    err = capsys.readouterr().err
    assert f"dyvte {command} needs the optional dependencies of {extras} (missing: {blocked})" in err
    assert f"pip install '{extras}'" in err
    assert module not in sys.modules  # the command's module was never imported


def test_help_and_version_load_no_training_or_evaluation_dependency():
    # in a fresh interpreter where every extra's package is missing
    blocked = sorted({name for names in cli.EXTRAS.values() for name in names})
    probe = (
        "import sys\n"
        f"for name in {blocked!r}:\n    sys.modules[name] = None\n"
        "from dyvte.cli import main\n"
        "assert main(['--help']) == 0 and main(['--version']) == 0\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "usage: dyvte" in done.stdout and f"dyvte {dyvte.__version__}" in done.stdout


def test_python_dash_m_dyvte_runs_the_command():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    run = [sys.executable, "-m", "dyvte"]
    done = subprocess.run([*run, "--version"], capture_output=True, text=True, env=env, timeout=300)
    assert (done.returncode, done.stdout) == (0, f"dyvte {dyvte.__version__}\n")
    done = subprocess.run([*run, "bogus"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and "unknown command 'bogus'" in done.stderr


def test_console_script_entry_point_is_the_dispatcher():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["dyvte"].partition(":")
    assert getattr(importlib.import_module(module), name) is cli.main


@pytest.mark.parametrize("command", list(LAUNCHERS))
def test_the_launcher_is_a_thin_call_to_the_command(command):
    script = load_script(f"train/{LAUNCHERS[command]}")
    assert script.main is importlib.import_module(f"dyvte.cli.{cli.COMMANDS[command].module}").main


def _normalized(text: str, prog: str) -> str:
    """Help text with its program name taken out and its wrapping undone (the usage lines wrap by name length)."""
    return " ".join(text.replace(prog, "PROG").split())


@pytest.mark.parametrize("command", list(LAUNCHERS))
@pytest.mark.parametrize("flags", [["--help"], ["-h"], ["--help", "all"]])
def test_command_help_is_the_launchers_help(command, flags, capsys, monkeypatch, recwarn):
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setattr(sys, "argv", [LAUNCHERS[command], *flags])
    with pytest.raises(SystemExit) as launcher_exit:
        runpy.run_path(str(REPO_ROOT / "train" / LAUNCHERS[command]), run_name="__main__")
    launcher = capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["dyvte", command, *flags])
    with pytest.raises(SystemExit) as command_exit:
        cli.main([command, *flags])
    captured = capsys.readouterr()
    assert launcher_exit.value.code == command_exit.value.code == 0
    assert captured.out.startswith(f"usage: dyvte {command} ") and launcher.startswith(f"usage: {LAUNCHERS[command]} ")
    assert _normalized(captured.out, f"dyvte {command}") == _normalized(launcher, LAUNCHERS[command])
    short = len(launcher.splitlines()) <= 40
    assert short if flags != ["--help", "all"] else (not short or command == "serve")  # short help: one screen
    assert not [w for w in recwarn if "LightningCLI's args parameter" in str(w.message)]  # sys.argv: the command's


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    return make_fit_setup(tmp_path_factory.mktemp("cli"))


def test_evaluate_command_runs_the_harness(setup_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["evaluate", f"--model={setup_dir / 'model'}", f"--data={setup_dir / 'records.jsonl'}", "--split=train"]
    argv += ["--samples=2", '--methods=["static:1"]', "--batch_size=2", "--max_new_tokens=1", f"--output_dir={out}"]
    assert cli.main(argv) == 0
    assert list(json.loads((out / "results.json").read_text())) == ["full", "static K=1", "timing"]
    assert "static K=1" in capsys.readouterr().out


def test_evaluate_command_refuses_a_bad_option_as_the_launcher_does(tmp_path, capsys):
    assert cli.main(["evaluate", "--batch_size=0", f"--output_dir={tmp_path / 'eval'}"]) == 2  # one error line
    assert "dyvte evaluate: error: --batch_size must be an int >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", "--no_such_option=1"])
    assert exit_info.value.code == 2 and "no_such_option" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_fit_command_trains_and_writes_the_heads(setup_dir, recwarn):
    assert cli.main(["fit", *fit_args(setup_dir, "heads-cli", 1)]) == 0
    written = json.loads((setup_dir / "heads-cli" / "training.json").read_text())
    assert written["steps"] >= 1 and (setup_dir / "heads-cli" / "exit_heads.safetensors").is_file()
    # sys.argv[1:] is pytest's here, not [command, *args]: LightningCLI's warning about both is silenced only for the
    # dyvte command, which passes its own arguments
    assert [str(w.message) for w in recwarn if "LightningCLI's args parameter" in str(w.message)] == []


@pytest.mark.parametrize("entry", ["launcher", "command"])
def test_a_refused_input_is_one_error_line_and_status_2(tmp_path, entry):
    """The main job on a calibration split too small for its 1% promise: `python train/fit.py` and `dyvte fit` print
    one `error:` line naming what it needs (no traceback) and exit 2, before any label is written."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("DYVTE_TRACEBACK", None)
    run = (
        [sys.executable, str(REPO_ROOT / "train" / "fit.py")]
        if entry == "launcher"
        else [sys.executable, "-m", "dyvte", "fit"]
    )
    done = subprocess.run(
        [*run, "--data.splits.calib_samples", "100"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300
    )
    prog = "fit.py" if entry == "launcher" else "dyvte fit"
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{prog}: error: a promise of at most 1% disagreement" in done.stderr
    assert "needs at least 230 calibration records" in done.stderr and "this run has 100" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "runs" / "label-cache").exists()
