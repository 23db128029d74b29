"""Method strings: how a registered exit policy or pruning method is written on a command line and named in a table.

A registration (:func:`dyvte.engine.policy.register_policy`, :func:`dyvte.pruning.prune.register_pruning`) may carry a
:class:`MethodSyntax`; the evaluation harness (:mod:`dyvte.eval.methods`) then parses ``KIND:ARGS`` strings and names
result rows through it, and keeps no list of its own. A parser raises :class:`ArgumentError` with the problem alone
("exit layer K 9 is out of range ..."); the harness adds the method string and its expected form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ArgumentError", "MethodSyntax", "float_in", "int_in", "items", "pruned_fraction"]

Options = dict[str, Any]


class ArgumentError(ValueError):
    """A method string's argument is malformed or out of range (the message states the problem only)."""


@dataclass(frozen=True)
class MethodSyntax:
    """How the harness writes, parses and names one registered method.

    Attributes:
        form: the full form, quoted in every error about the method (``"static:K[,K...] (K an int in [0, L]...)"``).
        short: the short form, used where compositions are explained (``"static:K"``).
        parse: ``parse(argument, num_layers)`` -> one options dict per method the string stands for; the options are
            the keyword arguments of the policy's factory (or of :func:`dyvte.prune`). ``argument`` is the text after
            the first ``:`` (``""`` when there is none).
        name: ``name(options)`` -> the method's row name in tables and reports (its first word is its kind).
    """

    form: str
    short: str
    parse: Callable[[str, int], list[Options]]
    name: Callable[[Options], str]


def items(text: str, what: str) -> list[str]:
    """The comma-separated items of ``text``, none of them empty."""
    parts = [t.strip() for t in text.split(",")]
    if not text.strip():
        raise ArgumentError(f"{what} is missing")
    if any(not t for t in parts):
        raise ArgumentError(f"an empty {what} in {text!r}")
    return parts


def int_in(text: str, low: int, high: int, what: str) -> int:
    """``text`` as an int in ``[low, high]`` (``high`` is the model's layer count L)."""
    try:
        value = int(text)
    except ValueError:
        raise ArgumentError(f"{what} {text!r} is not an int") from None
    if not low <= value <= high:
        raise ArgumentError(f"{what} {value} is out of range [{low}, {high}] (this model has L={high} layers)")
    return value


def float_in(text: str, what: str, ok: Callable[[float], bool], interval: str) -> float:
    """``text`` as a float for which ``ok`` holds (``interval`` describes it; nan is refused)."""
    try:
        value = float(text)
    except ValueError:
        raise ArgumentError(f"{what} {text!r} is not a number") from None
    if not ok(value):  # also refuses nan
        raise ArgumentError(f"{what} {text} is outside {interval}")
    return value


def pruned_fraction(text: str) -> float:
    """A pruned fraction R in ``[0, 1)``."""
    return float_in(text, "pruned fraction R", lambda r: 0.0 <= r < 1.0, "[0, 1)")
