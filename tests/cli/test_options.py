"""The options the ``dyvte`` commands share (dyvte/cli/shared.py, dyvte/cli/help.py): the short ``--help`` on one
screen with the common options first and ``--help all`` behind it, fit's flat spellings of its nested options, the
checks of the common options before any model loads, and ``--samples`` as a seeded stratified subset.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys

import pytest
import torch
import yaml

import dyvte
from dyvte import cli
from dyvte.cli import calibrate as calibrate_cli
from dyvte.cli import evaluate as evaluate_cli
from dyvte.cli import fit as fit_cli
from dyvte.cli import report as report_cli
from dyvte.cli.help import COMMON, MAX_LINES, help_request
from dyvte.cli.shared import rewrite_aliases
from dyvte.data.subsets import subset_indices

from ..scripts import make_fit_setup

COMMANDS = ["fit", "calibrate", "evaluate", "report"]
#: the common options each command takes, in its short help's first section
TAKES = {
    "fit": ["--image_folder", "--skip_bad_rows", "--prompt_template", "--device"],
    **{name: [f"--{option}" for option in COMMON] for name in ("calibrate", "evaluate", "report")},
}


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def full_help() -> dict[str, str]:
    """Each command's ``--help all`` (the parser's full help), read once."""
    texts = {}
    for command in COMMANDS:
        buffer = io.StringIO()
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buffer):
            mp.setattr(sys, "argv", ["dyvte", command, "--help", "all"])
            with pytest.raises(SystemExit) as exit_info:
                cli.main([command, "--help", "all"])
        assert exit_info.value.code == 0
        texts[command] = buffer.getvalue()
    return texts


@pytest.mark.parametrize("command", COMMANDS)
def test_short_help_fits_a_screen_with_the_common_options_first(command, capsys):
    text = _help(capsys, [command, "--help"])
    lines = text.splitlines()
    assert len(lines) <= MAX_LINES <= 45 and max(map(len, lines)) <= 120
    assert lines[0].startswith(f"usage: dyvte {command} ")
    sections = [line for line in lines if line.endswith(":") and not line.startswith(" ")]
    assert sections[0].startswith("common options") and sections[1] == f"{command} options:"
    first = text.split(sections[1])[0]
    flags = re.findall(r"^  (--\w+)", first, flags=re.M)
    assert flags == [f for f in ["--samples", "--seed", *TAKES["fit"], "--dtype"] if f in TAKES[command]]
    assert lines[-1] == f"all options: dyvte {command} --help all"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_of_the_short_help_is_in_the_full_help(command, capsys, full_help):
    short = _help(capsys, [command, "--help"])
    full = full_help[command]
    assert len(full.splitlines()) > len(short.splitlines())
    for flag in re.findall(r"^  (--[\w.]+)", short, flags=re.M):
        nested = fit_cli.ALIASES.get(flag, flag) if command == "fit" else flag
        if command == "fit" and flag == "--device":
            nested = "--trainer.accelerator"
        assert re.search(rf"{re.escape(nested)}\b", full), (command, flag)


def test_fits_full_help_holds_the_nested_options(full_help):
    text = full_help["fit"]
    for option in ("--data.source.image_folder", "--data.source.skip_bad_rows", "--data.splits.train_samples"):
        assert option in text
    assert "--trainer.max_epochs" in text and len(text.splitlines()) > 200  # LightningCLI's whole list


@pytest.mark.parametrize("command", ["calibrate", "evaluate", "report"])
def test_full_help_of_the_other_commands_holds_every_common_option(command, full_help):
    for option in COMMON:
        assert re.search(rf"--{option}\b", full_help[command]), option


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--x", "1"], (None, ["--x", "1"])),
        (["--x", "1", "--help"], ("short", ["--x", "1", "--help"])),
        (["-h", "all", "--x"], ("all", ["--help", "--x"])),
        (["--help=all"], ("all", ["--help"])),
        (["--help", "al"], ("short", ["--help", "al"])),
    ],
)
def test_help_request(argv, expected):
    assert help_request(argv) == expected


# fit's flat spellings


def test_fit_takes_the_flat_spellings_of_its_nested_options():
    argv = ["--image_folder", "imgs", "--skip_bad_rows=true", "--prompt_template", "Q: {question}", "--trainer.x=1"]
    assert fit_cli.fit_arguments(argv) == [
        "--data.source.image_folder",
        "imgs",
        "--data.source.skip_bad_rows=true",
        "--data.source.prompt_template",
        "Q: {question}",
        "--trainer.x=1",
    ]
    nested = ["--data.source.image_folder=imgs", "--data.source.skip_bad_rows", "true"]
    assert fit_cli.fit_arguments(nested) == nested  # the nested spellings keep working
    both = ["--image_folder", "imgs", "--data.source.image_folder=imgs", "--skip_bad_rows", "True"]
    both += ["--data.source.skip_bad_rows", "true"]
    assert fit_cli.fit_arguments(both)[0] == "--data.source.image_folder"  # one value in both spellings: fine


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (
            ["--image_folder", "a", "--data.source.image_folder", "b"],
            r"--image_folder and --data.source.image_folder are one option in two spellings, given different values "
            r"\(a / b\): give one",
        ),
        (["--data.source.skip_bad_rows=false", "--skip_bad_rows=true"], r"--skip_bad_rows and --data.source.skip"),
        (["--image_folder"], r"--image_folder needs a value \(it is --data.source.image_folder\)"),
        (["--samples", "10"], r"fit takes no --samples: .*--data.splits.train_samples, --data.splits.val_samples"),
        (["--seed=1"], r"fit takes no --seed: --seed_everything seeds training, --data.splits.split_seed"),
        (["--dtype", "bfloat16"], r"fit takes no --dtype: it labels with the model in float32"),
        (["--device", "tpu"], r"--device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
        (["--device", "cpu", "--trainer.accelerator", "cuda"], r"--device cpu is --trainer.accelerator cpu, but"),
    ],
)
def test_fit_refuses_conflicting_or_foreign_options_before_parsing(argv, match):
    with pytest.raises(ValueError, match=match):
        fit_cli.fit_arguments(argv)


def test_fit_device_sets_the_trainers_accelerator_and_devices(monkeypatch):
    assert fit_cli.fit_arguments(["--device", "cpu", "--x=1"]) == ["--trainer.accelerator", "cpu", "--x=1"]
    assert fit_cli.fit_arguments(["--device=cpu", "--trainer.accelerator=cpu"])[:2] == ["--trainer.accelerator", "cpu"]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"--device 'cuda': CUDA is not available on this machine"):
            fit_cli.fit_arguments(["--device", "cuda"])
    monkeypatch.setattr(fit_cli, "check_device", lambda device, option: torch.device(device))  # as on a GPU machine
    assert fit_cli.fit_arguments(["--device", "cuda:1"]) == [
        "--trainer.accelerator",
        "cuda",
        "--trainer.devices",
        "[1]",
    ]
    assert fit_cli.fit_arguments(["--device", "cuda", "--trainer.accelerator", "gpu"])[:4] == [
        "--trainer.accelerator",
        "cuda",
        "--trainer.devices",
        "1",
    ]
    with pytest.raises(ValueError, match=r"--device cuda is .*--trainer.devices 1, but --trainer.devices 2"):
        fit_cli.fit_arguments(["--device", "cuda", "--trainer.devices", "2"])


def test_fit_parses_the_flat_spellings_into_its_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", f"--image_folder={tmp_path}", "--skip_bad_rows", "true", "--device", "cpu", "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["source"]["image_folder"] == str(tmp_path)
    assert config["data"]["source"]["skip_bad_rows"] is True and config["trainer"]["accelerator"] == "cpu"


def test_rewrite_aliases_leaves_other_tokens_alone():
    assert rewrite_aliases(["--a", "x", "--ab=y", "--b"], {"--a": "--n.a"}) == ["--n.a", "x", "--ab=y", "--b"]


# the common options of calibrate, evaluate and report


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the options were checked")


@pytest.mark.parametrize(
    ("module", "kwargs", "match"),
    [
        (evaluate_cli, {"image_folder": "no/such/folder"}, r"--image_folder no/such/folder: no such folder"),
        (calibrate_cli, {"image_folder": "no/such/folder"}, r"--image_folder no/such/folder: no such folder"),
        (report_cli, {"image_folder": "no/such/folder"}, r"--image_folder no/such/folder: no such folder"),
        (evaluate_cli, {"seed": 1.5}, r"--seed must be an int, got 1.5"),
        (calibrate_cli, {"seed": True}, r"--seed must be an int, got True"),
        (report_cli, {"samples": 0}, r"--samples must be an int >= 1 or null, got 0"),
        (calibrate_cli, {"samples": None}, r"--samples must be an int >= 1, got None"),
        (report_cli, {"dtype": "float16"}, r"--dtype"),
    ],
)
def test_common_options_are_checked_before_the_model_loads(module, kwargs, match, tmp_path, monkeypatch):
    monkeypatch.setattr(module, "load_model", _no_model)
    out = "output" if module is calibrate_cli else "output_dir"
    with pytest.raises(ValueError, match=match):
        module.main(**kwargs, **{out: str(tmp_path / "out")})
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    return make_fit_setup(tmp_path_factory.mktemp("options"))


def test_evaluate_samples_a_seeded_stratified_subset(setup_dir, tmp_path, monkeypatch):
    seen = []
    real = dyvte.evaluate

    def spy(model, processor, records, *args, **kwargs):
        seen.append([(r["answer"], r["qtype"]) for r in records])
        return real(model, processor, records, *args, **kwargs)

    monkeypatch.setattr(dyvte, "evaluate", spy)
    rows = [json.loads(line) for line in (setup_dir / "records.jsonl").read_text().splitlines()]
    argv = ["evaluate", f"--model={setup_dir / 'model'}", f"--data={setup_dir / 'records.jsonl'}", "--samples=4"]
    argv += ["--seed=5", '--methods=["full"]', "--batch_size=4", "--max_new_tokens=1", f"--output_dir={tmp_path}"]
    assert cli.main(argv) == 0
    chosen = subset_indices(len(rows), 4, [r["qtype"] for r in rows], seed=5)
    assert seen[0] == [(rows[i]["answer"], rows[i]["qtype"]) for i in chosen]  # the subset, in file order
    assert sorted(q for _, q in seen[0]) == ["a", "a", "b", "b"] and chosen != list(range(4))


def test_a_bad_record_names_an_option_the_command_takes(setup_dir, tmp_path, capsys, full_help):
    rows = [json.loads(line) for line in (setup_dir / "records.jsonl").read_text().splitlines()]
    rows = [{**rows[0], "image": "missing.png"}] + [{**r, "image": str(setup_dir / r["image"])} for r in rows[1:]]
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["evaluate", f"--model={setup_dir / 'model'}", f"--data={data}", '--methods=["full"]', "--batch_size=12"]
    argv += ["--max_new_tokens=1", f"--output_dir={tmp_path / 'eval'}"]
    assert cli.main(argv) == 2  # the dyvte command: one error line, status 2
    message = capsys.readouterr().err
    assert re.search(r"dyvte evaluate: error: .*record 0 .*missing\.png.*pass --skip_bad_rows true", message)
    hinted = re.search(r"pass (--\w+) true", message).group(1)
    for command in COMMANDS:  # every command takes the option the hint names
        assert re.search(rf"{hinted}\b", full_help[command]) or fit_cli.ALIASES.get(hinted) in full_help[command]
    assert cli.main([*argv, f"{hinted}=true"]) == 0
    assert len(json.loads((tmp_path / "eval" / "full.json").read_text())["answers"]) == 11  # the bad one skipped
