"""The short ``--help`` of every ``dyvte`` command: the common options first, the command's main ones, examples, on
one screen; ``--help all`` is the parser's full list (for ``fit``, LightningCLI's).

The common options (:data:`COMMON`) mean the same on every command that has them (docs/guide.md, "Command line").
This module imports nothing beyond the standard library: the dispatcher and every command use it.
"""

from __future__ import annotations

import inspect
import json
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["COMMON", "HelpOption", "defaults_of", "format_help", "help_request", "option_lines", "source_options"]

#: the most lines a short help may take (a terminal screen)
MAX_LINES = 40
#: the width of the help text, and of its option column
WIDTH, COLUMN = 118, 32


@dataclass(frozen=True)
class HelpOption:
    """One line of a short help: ``flag`` (with its metavar) and what it does."""

    flag: str
    text: str


#: option name -> (metavar, what it does); the same words on every command
COMMON: dict[str, tuple[str, str]] = {
    "samples": ("N", "a random N records (seeded, stratified by qtype), in dataset order"),
    "seed": ("S", "the seed of the --samples draw"),
    "image_folder": ("DIR", "resolve relative image paths against DIR (default: each records file's folder)"),
    "skip_bad_rows": ("BOOL", "true: skip bad records (e.g. a corrupt image), counted in the log"),
    "prompt_template": ("STR", "prompt format with {question}, for a model without a chat template"),
    "device": ("DEV", "where the model runs: cpu, cuda or cuda:N"),
    "dtype": ("DTYPE", "float32 or bfloat16 (float16 with a CUDA --device only)"),
}


def help_request(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """Whether ``args`` ask for help, and the arguments to give the full parser.

    Returns:
        ``("short", args)`` for ``-h`` / ``--help``; ``("all", args)`` for ``--help all`` (or ``-h all``,
        ``--help=all``), with ``all`` taken out and ``--help`` in its place; ``(None, args)`` otherwise.
    """
    args = list(args)
    for i, arg in enumerate(args):
        if arg == "--help=all" or (arg in ("-h", "--help") and i + 1 < len(args) and args[i + 1] == "all"):
            rest = args[i + 1 :] if arg == "--help=all" else args[i + 2 :]
            return "all", [*args[:i], "--help", *rest]
        if arg in ("-h", "--help"):
            return "short", args
    return None, args


def defaults_of(func: Callable[..., Any]) -> dict[str, Any]:
    """The default of each keyword argument of ``func`` (what a jsonargparse CLI function's options default to)."""
    return {
        name: p.default for name, p in inspect.signature(func).parameters.items() if p.default is not inspect._empty
    }


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return json.dumps(list(value))
    return str(value)


def option_lines(
    names: Sequence[str], defaults: dict[str, Any], notes: dict[str, str] | None = None
) -> list[HelpOption]:
    """The help lines of the common options ``names``, each with its default from ``defaults`` (a null default is
    left out, except ``--samples``'s: all records) or, instead, the note ``notes[name]``."""
    notes = notes or {}
    lines = []
    for name in names:
        metavar, text = COMMON[name]
        if name in notes:
            text = notes[name]
        elif name == "samples" and defaults.get(name, 0) is None:
            text += " (default: all)"
        elif defaults.get(name) is not None:
            text += f" (default: {_shown(defaults[name])})"
        lines.append(HelpOption(f"--{name} {metavar}", text))
    return lines


def source_options(defaults: dict[str, Any], split: str = "the dataset split") -> list[HelpOption]:
    """The short-help lines of ``--model``, ``--data`` and ``--split`` (``split``: what the split is for), with their
    ``defaults``: the first of each command's own options but fit's."""
    return [
        HelpOption("--model DIR", f'"demo" or a local model directory (default: {defaults["model"]})'),
        HelpOption(
            "--data PATH",
            f'"demo", a save_to_disk folder or a .json/.jsonl/.parquet file (default: {defaults["data"]})',
        ),
        HelpOption("--split NAME", f"{split} (default: {defaults['split']})"),
    ]


def format_help(
    prog: str,
    summary: str,
    sections: Sequence[tuple[str, Sequence[HelpOption]]],
    examples: Sequence[str],
    notes: Sequence[str] = (),
) -> str:
    """A short help: usage, ``summary``, each ``(title, options)`` section, ``notes``, ``examples`` and the line that
    points at ``--help all``.

    Raises:
        ValueError: the text is longer than :data:`MAX_LINES` lines (a test builds every command's help).
    """
    lines = [f"usage: {prog} [-h | --help all] [--config FILE] [--OPTION VALUE ...]", ""]
    lines += textwrap.wrap(summary, WIDTH)
    for title, options in sections:
        lines += ["", f"{title}:"]
        for option in options:
            head = f"  {option.flag:<{COLUMN - 2}}"
            if len(head) > COLUMN:
                head += " "
            lines += textwrap.wrap(
                option.text, WIDTH, initial_indent=head, subsequent_indent=" " * COLUMN, break_on_hyphens=False
            )
    if notes:
        lines.append("")
    for note in notes:
        lines += textwrap.wrap(note, WIDTH)
    lines += ["", "examples:", *(f"  {example}" for example in examples), "", f"all options: {prog} --help all"]
    if len(lines) > MAX_LINES:
        raise ValueError(f"the short help of {prog} takes {len(lines)} lines, more than {MAX_LINES}")
    return "\n".join(lines)
