"""dyvte.train.checkpoints: a fit stopped by a real SIGINT / SIGTERM leaves ``last.ckpt`` and logs the command that
resumes it; resuming gives the uninterrupted run's heads bit for bit; ``--ckpt_path last`` without a checkpoint is
refused (issue 28)."""

from __future__ import annotations

import os
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import dyvte.data.sources
from dyvte.policies.exit_heads import ExitHeads
from dyvte.train.checkpoints import SIGTERM_EXIT, EpochCheckpoint, capture_rng, restore_rng

from ..scripts import REPO_ROOT, fit_args, load_script, make_fit_setup

#: epochs of the interrupted runs: enough (about 30 ms each here) that the run is still training when the signal,
#: sent as soon as the first epoch's checkpoint is logged, arrives
EPOCHS = 100
#: the line the first epoch's checkpoint logs
SAVED = re.compile(r"epoch 1 of \d+ done: checkpoint (\S+last\.ckpt)")
#: the line an interrupted run logs
RESUME = re.compile(r"holds the training after epoch (\d+) .*Resume with: (.+)$")


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    return make_fit_setup(tmp_path_factory.mktemp("ckpt"))


def _runs(root: Path, name: str) -> list[str]:
    """Options that log (and checkpoint) under ``root / "runs-<name>"``: each run's own folder of versions."""
    runs = root / f"runs-{name}"
    return [f"--trainer.default_root_dir={runs}", f"--trainer.logger.init_args.save_dir={runs}"]


def _heads(path: Path) -> dict[str, torch.Tensor]:
    return ExitHeads.from_pretrained(path).state_dict()


def _signalled_run(root: Path, name: str, signum: int) -> tuple[subprocess.Popen, list[str], threading.Thread]:
    """Start ``train/fit.py`` for ``EPOCHS`` epochs; a thread collects its log and sends ``signum`` as soon as the
    first epoch's checkpoint is logged."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    # the same intra-op thread count as this process, which trains the uninterrupted run and the resumed one: other
    # thread counts sum in another order (1e-7 differences, not the bit-exact equality the test asserts)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    args = fit_args(root, name, EPOCHS, _runs(root, name))
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "train" / "fit.py"), *args],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C must raise KeyboardInterrupt there even where this test runs with SIGINT ignored (a background job)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if SAVED.search(line):
                proc.send_signal(signum)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return proc, lines, reader


@pytest.mark.slow
def test_a_signalled_fit_leaves_a_checkpoint_and_resumes_to_the_uninterrupted_heads(setup_dir):
    main = load_script("train/fit.py").main
    main(fit_args(setup_dir, "cache-warmup", 1, _runs(setup_dir, "warmup")))  # both runs below read the label cache
    runs = {sig: _signalled_run(setup_dir, f"sig{int(sig)}", sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    main(fit_args(setup_dir, "full", EPOCHS, _runs(setup_dir, "full")))  # the uninterrupted run, meanwhile
    full = _heads(setup_dir / "full")
    for sig, expected_status in ((signal.SIGINT, 1), (signal.SIGTERM, SIGTERM_EXIT)):
        proc, lines, reader = runs[sig]
        status = proc.wait(timeout=120)
        reader.join(timeout=10)
        log = "\n".join(lines)
        assert status == expected_status, f"{sig.name}: exit {status}\n{log[-3000:]}"
        name = f"sig{int(sig)}"
        assert not (setup_dir / name).exists()  # no heads written
        ckpt = Path(SAVED.search(log).group(1))
        stopped = [RESUME.search(line) for line in lines if RESUME.search(line)]
        assert len(stopped) == 1, log[-3000:]
        epochs_done, command = int(stopped[0].group(1)), shlex.split(stopped[0].group(2))
        assert 1 <= epochs_done < EPOCHS and ckpt.is_file() and not ckpt.with_name("last.ckpt.tmp").exists()
        state = torch.load(ckpt, weights_only=True)  # loadable as plain data, and small: heads and their optimizer
        assert state["epoch"] + 1 == epochs_done and state["global_step"] == 2 * epochs_done  # 2 batches per epoch
        assert all(key.startswith("heads.") for key in state["state_dict"])
        # the logged command: this launcher, the same arguments, the checkpoint
        assert command[:2] == ["python", str(REPO_ROOT / "train" / "fit.py")]
        assert command[-2:] == ["--ckpt_path", str(ckpt)] and command[2:-2] == fit_args(
            setup_dir, name, EPOCHS, _runs(setup_dir, name)
        )
        if sig == signal.SIGINT:  # the README's spelling: the newest last.ckpt of the run's log folder
            main([*command[2:-2], "--ckpt_path", "last"])
        else:
            main(command[2:])
        resumed = torch.load(sorted((setup_dir / f"runs-{name}").rglob("last.ckpt"))[-1], weights_only=True)
        assert resumed["global_step"] == 2 * EPOCHS  # it continued: 2 steps per remaining epoch, not a fresh run
        heads = _heads(setup_dir / name)
        assert heads.keys() == full.keys()
        for key in full:
            assert torch.equal(heads[key], full[key]), f"{sig.name}: {key} differs from the uninterrupted run's"


def test_ckpt_path_last_without_a_checkpoint_is_refused_before_labelling(setup_dir, monkeypatch):
    def forbid(*_args, **_kwargs):
        raise AssertionError("the model was loaded: the missing checkpoint should have been refused first")

    monkeypatch.setattr(dyvte.data.sources, "load_model", forbid)
    args = fit_args(setup_dir, "never", 1, [*_runs(setup_dir, "empty"), "--ckpt_path=last"])
    with pytest.raises(ValueError, match=r"--ckpt_path last: no checkpoint to resume from .*empty.*last\.ckpt"):
        load_script("train/fit.py").main(args)
    assert not (setup_dir / "never").exists()


def test_resume_command_replaces_the_checkpoint_and_quotes_arguments():
    callback = EpochCheckpoint("dyvte fit", ["--ckpt_path", "old.ckpt", "--data.source.data=my records.json"])
    assert callback.resume_command("/runs/last.ckpt") == (
        "dyvte fit '--data.source.data=my records.json' --ckpt_path /runs/last.ckpt"
    )
    callback = EpochCheckpoint("python train/fit.py", ["--ckpt_path=last", "--trainer.max_epochs=3"])
    assert callback.resume_command("a.ckpt") == "python train/fit.py --trainer.max_epochs=3 --ckpt_path a.ckpt"
    # stopped before its first checkpoint: the same command again (still resuming from what it resumed from)
    assert callback.resume_command(None) == "python train/fit.py --ckpt_path=last --trainer.max_epochs=3"


def test_generator_states_survive_a_weights_only_checkpoint(tmp_path):
    def draw() -> tuple:
        return torch.rand(3).tolist(), torch.randperm(10).tolist(), np.random.rand(2).tolist(), random.random()

    torch.manual_seed(3)
    state = capture_rng()
    expected = draw()
    torch.save(state, tmp_path / "rng.pt")
    torch.manual_seed(4), np.random.seed(4), random.seed(4)
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draw() == expected
