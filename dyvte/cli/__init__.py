"""The ``dyvte`` command: ``dyvte fit | calibrate | evaluate | report | serve`` (also ``python -m dyvte ...``).

Each command is the job of a launcher of ``train/`` (``dyvte fit`` = ``python train/fit.py``, same options, same
outputs), implemented in a module of this package (:mod:`dyvte.cli.fit`, ...). This dispatcher imports a command's
module only when that command runs, after checking that the extra it needs is installed: ``dyvte --help`` and
``dyvte --version`` work on an inference-only install, and a command whose extra is missing says which one to
install instead of failing on an import deep inside it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["COMMANDS", "EXTRAS", "Command", "MissingExtraError", "main", "missing_modules", "user_errors"]

#: what a command raises for input it refuses (a bad option, record, file or model): one ``error:`` line on stderr and
#: exit status 2 instead of a traceback (``DYVTE_TRACEBACK=1`` shows the traceback too)
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)

#: the import names each optional extra of pyproject.toml provides that a command needs
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("lightning", "jsonargparse", "datasets", "torchmetrics"),
    "eval": ("torchmetrics", "matplotlib"),
    "serve": ("fastapi", "uvicorn"),
}


@dataclass(frozen=True)
class Command:
    """One ``dyvte`` command.

    Attributes:
        module: the module under ``dyvte.cli`` that implements it.
        runner: the module's function that takes ``(args, prog)`` and runs the job.
        summary: one line for ``dyvte --help``.
        extras: the optional extras it needs (``dyvte[train]``, ...).
        launcher: the ``train/`` script that runs the same job.
    """

    module: str
    runner: str
    summary: str
    extras: tuple[str, ...]
    launcher: str


COMMANDS: dict[str, Command] = {
    "fit": Command("fit", "main", "train exit heads on a frozen MLLM (learned per-sample exit)", ("train",), "fit.py"),
    "calibrate": Command(
        "calibrate", "run", "VTW calibration: per-layer KL curve and the static exit layer", ("train",), "calibrate.py"
    ),
    "evaluate": Command(
        "evaluate", "run", "run method strings over a dataset: accuracy, FLOPs, exits", ("train", "eval"), "evaluate.py"
    ),
    "report": Command(
        "report", "run", "the comparison report: every method at matched prefill FLOPs", ("train", "eval"), "report.py"
    ),
    "serve": Command(
        "serve",
        "run",
        "an OpenAI-compatible server with per-request withdrawal and a chat page",
        ("serve",),
        "serve.py",
    ),
}


class MissingExtraError(RuntimeError):
    """A command's optional dependencies are not installed; the message names the extra to install."""


def missing_modules(extras: Sequence[str]) -> list[str]:
    """The import names of ``extras`` that cannot be found (nothing is imported to find out)."""
    names = dict.fromkeys(name for extra in extras for name in EXTRAS[extra])
    return [name for name in names if importlib.util.find_spec(name) is None]


def _usage() -> str:
    from dyvte import __version__

    width = max(map(len, COMMANDS))
    lines = [
        "usage: dyvte [-h] [--version] COMMAND [OPTIONS]",
        "",
        f"dyvte {__version__}: visual-token withdrawal, learned exit heads and token pruning for HuggingFace",
        "vision-language models.",
        "",
        "commands:",
    ]
    for name, command in COMMANDS.items():
        lines.append(f"  {name:<{width}}  {command.summary}")
        extras = ",".join(command.extras)
        lines.append(f"  {'':<{width}}  needs dyvte[{extras}]; the same as python train/{command.launcher}")
    lines += [
        "",
        "options:",
        "  -h, --help  show this message and exit",
        "  --version   print dyvte's version and exit",
        "",
        "`dyvte COMMAND --help`: its common options (--samples, --image_folder, --device, ..., the same on every",
        "command) and examples; `dyvte COMMAND --help all`: every option. Install the extras a command needs with",
        "pip install 'dyvte[train,eval]' (in a clone: pip install -e \".[dev]\" -c constraints.txt).",
        'Guide: docs/guide.md, "Command line".',
    ]
    return "\n".join(lines)


def _load(name: str, command: Command):
    """The function that runs ``command``, imported after checking its extras."""
    missing = missing_modules(command.extras)
    if missing:
        extras = ",".join(command.extras)
        raise MissingExtraError(
            f"dyvte {name} needs the optional dependencies of dyvte[{extras}] (missing: {', '.join(missing)}); "
            f"install them with pip install 'dyvte[{extras}]' (in a clone of the repository: "
            'pip install -e ".[dev]" -c constraints.txt)'
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as the launchers: before transformers reads it at import
    module = importlib.import_module(f"{__name__}.{command.module}")
    return getattr(module, command.runner)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dyvte COMMAND [OPTIONS]``.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 after a command ran, ``--help`` or ``--version``; 2 for a missing or unknown command or
        option, or a missing extra (with a message on stderr). A command's own errors propagate, as they do from
        its launcher.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(_usage(), file=sys.stderr)
        print("\ndyvte: error: a command is required", file=sys.stderr)
        return 2
    first, rest = args[0], args[1:]
    if first in ("-h", "--help"):
        print(_usage())
        return 0
    if first == "--version":
        from dyvte import __version__

        print(f"dyvte {__version__}")
        return 0
    if first not in COMMANDS:
        what = "option" if first.startswith("-") else "command"
        print(
            f"dyvte: error: unknown {what} {first!r}; the commands are {', '.join(COMMANDS)} "
            "(dyvte --help describes them)",
            file=sys.stderr,
        )
        return 2
    try:
        runner = _load(first, COMMANDS[first])
    except MissingExtraError as error:
        print(f"dyvte: error: {error}", file=sys.stderr)
        return 2
    return user_errors(runner, rest, f"dyvte {first}")


def user_errors(runner, args: Sequence[str] | None, prog: str | None, name: str | None = None) -> int:
    """Run ``runner(args, prog=prog)``; a refusal (:data:`USER_ERRORS`: every dyvte error about its input is a
    ``ValueError``) becomes ``<name>: error: <message>`` on stderr (``name``: default ``prog``) and status 2, as
    argparse reports a bad option. ``DYVTE_TRACEBACK=1`` re-raises it with its traceback.

    Returns:
        0 when the command ran, 2 when it refused its input.
    """
    try:
        runner(args, prog=prog)
    except USER_ERRORS as error:
        if os.environ.get("DYVTE_TRACEBACK"):
            raise
        print(f"{name or prog}: error: {error}", file=sys.stderr)
        return 2
    return 0
