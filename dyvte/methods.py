"""Methods the evaluation harness can run: each opens a context on the model and names itself.

A method's ``apply(model)`` is a context manager yielding the active :class:`dyvte.handle.Handle` (or ``None``); the
harness reads the per-row exit layers from ``handle.exit_layers`` after each ``generate``, and what the LLM received
from ``fed_tokens`` / ``fed_visual`` / ``visual_after``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .calibrate import Calibration
from .handle import ComposedHandle
from .prune import prune
from .withdraw import withdraw

__all__ = [
    "Method",
    "MethodError",
    "Full",
    "Static",
    "Calibrated",
    "Heads",
    "Prune",
    "Compose",
    "check_method",
    "parse_method",
]


class Method:
    """Base class: ``name`` for tables, ``apply(model)`` as a context manager."""

    name: str = "method"

    @contextlib.contextmanager
    def apply(self, model: nn.Module) -> Iterator[Any]:
        yield None


@dataclass
class Full(Method):
    """The unmodified model."""

    name: str = "full"


@dataclass
class Static(Method):
    """Static withdrawal at exit layer ``layer`` (VTW)."""

    layer: int = 0

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"static K={self.layer}"

    @contextlib.contextmanager
    def apply(self, model: nn.Module) -> Iterator[Any]:
        with withdraw(model, layer=self.layer) as handle:
            yield handle


@dataclass
class Calibrated(Method):
    """Static withdrawal at a calibrated layer."""

    calibration: Calibration

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"calibrated eta={self.calibration.threshold:g} (K={self.calibration.layer})"

    @contextlib.contextmanager
    def apply(self, model: nn.Module) -> Iterator[Any]:
        with withdraw(model, calibration=self.calibration) as handle:
            yield handle


@dataclass
class Prune(Method):
    """Visual-token pruning (``dyvte.prune``): ``fastervlm`` / ``random`` before the LLM, ``fastv`` at layer K.

    The handle exposes what the LLM received (``fed_tokens`` / ``fed_visual``) or kept after K (``visual_after``),
    which the harness uses for the FLOPs.
    """

    method: str = "fastervlm"
    ratio: float | None = None
    keep: int | None = None
    layer: int | None = None
    seed: int = 0

    @property
    def name(self) -> str:  # type: ignore[override]
        budget = f"R={self.ratio:g}" if self.ratio is not None else f"keep={self.keep}"
        return f"{self.method} K={self.layer} {budget}" if self.method == "fastv" else f"{self.method} {budget}"

    @contextlib.contextmanager
    def apply(self, model: nn.Module) -> Iterator[Any]:
        with prune(model, self.method, keep=self.keep, ratio=self.ratio, layer=self.layer, seed=self.seed) as handle:
            yield handle


@dataclass
class Heads(Method):
    """Per-sample adaptive withdrawal by learned exit heads (DyVTE) at a P(exit) threshold."""

    heads: Any
    threshold: float | None = None
    label: str = ""

    @property
    def name(self) -> str:  # type: ignore[override]
        label = f"heads{'(' + self.label + ')' if self.label else ''}"
        calibration = self.heads.config.calibration
        if self.threshold is None and self.heads.config.thresholds is not None and calibration is not None:
            return f"{label} calibrated tol={calibration['tolerance']:g}"
        threshold = self.heads.config.threshold if self.threshold is None else self.threshold
        return f"{label} p={threshold:g}"

    @contextlib.contextmanager
    def apply(self, model: nn.Module) -> Iterator[Any]:
        with withdraw(model, heads=self.heads, threshold=self.threshold) as handle:
            yield handle


@dataclass
class Compose(Method):
    """``outer`` (pruning before the LLM) around ``inner`` (a withdrawal method), e.g. FasterVLM + exit heads."""

    outer: Method
    inner: Method

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.outer.name} + {self.inner.name}"

    @contextlib.contextmanager
    def apply(self, model: nn.Module) -> Iterator[Any]:
        with self.outer.apply(model) as outer, self.inner.apply(model) as inner:
            yield ComposedHandle(inner, outer)


#: the form of each method string, quoted in every error about one
FORMS = {
    "full": "full (no argument)",
    "static": "static:K[,K...] (K an int in [0, L]; L never withdraws) or static:all",
    "calibrated": "calibrated:DIR (a directory holding calibration.json, or the file itself)",
    "heads": "heads:DIR[:P[,P...]] (DIR an exit-heads directory, P a P(exit) threshold in (0, 1])",
    "fastervlm": "fastervlm:R[,R...] (R the fraction of visual tokens pruned, in [0, 1))",
    "random": "random:R[,R...] (R the fraction of visual tokens pruned, in [0, 1))",
    "fastv": "fastv:K:R[,R...] (K an int in [1, L], R the fraction of visual tokens pruned, in [0, 1))",
    "+": "A+B (A pruning before the LLM: fastervlm:R or random:R; B withdrawal: static:K, calibrated:DIR or "
    "heads:DIR[:P])",
}
PRUNE_BEFORE_LLM = ("fastervlm", "random")
WITHDRAWALS = ("static", "calibrated", "heads")


class MethodError(ValueError):
    """A malformed or out-of-range method string; the message quotes it and gives its expected form."""


def _fail(spec: str, kind: str, problem: str) -> MethodError:
    form = FORMS.get(kind)
    expected = f"expected {form}" if form else "expected one of: " + "; ".join(FORMS.values())
    return MethodError(f"method {spec!r}: {problem}; {expected}")


def _items(spec: str, kind: str, text: str, what: str) -> list[str]:
    """The comma-separated items of ``text``, none of them empty."""
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise _fail(spec, kind, f"{what} is missing" if not text.strip() else f"an empty {what} in {text!r}")
    return items


def _int(spec: str, kind: str, text: str, low: int, high: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _fail(spec, kind, f"{what} {text!r} is not an int") from None
    if not low <= value <= high:
        raise _fail(spec, kind, f"{what} {value} is out of range [{low}, {high}] (this model has L={high} layers)")
    return value


def _float(spec: str, kind: str, text: str, what: str, ok: Callable[[float], bool], interval: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _fail(spec, kind, f"{what} {text!r} is not a number") from None
    if not ok(value):  # also refuses nan
        raise _fail(spec, kind, f"{what} {text} is outside {interval}")
    return value


def _ratio(spec: str, kind: str, text: str) -> float:
    return _float(spec, kind, text, "pruned fraction R", lambda r: 0.0 <= r < 1.0, "[0, 1)")


def parse_method(spec: str, num_layers: int) -> list[Method]:
    """Methods from a short string; a malformed or out-of-range string raises :class:`MethodError` (a ValueError).

    ``full``, ``static:K[,K...]`` (K in ``[0, L]``), ``static:all`` (K = 0..L), ``calibrated:PATH``,
    ``heads:PATH[:P[,P...]]`` (exit heads at thresholds P in ``(0, 1]``; without P, the heads' saved threshold),
    ``A+B`` (pruning A before the LLM around withdrawal B, e.g. ``fastervlm:0.75+heads:DIR:0.5``), and pruning with
    R the fraction pruned, in ``[0, 1)``: ``fastervlm:R[,R...]``, ``random:R[,R...]``, ``fastv:K:R[,R...]``
    (K in ``[1, L]``).

    P = 0 would fire every head on every row (static:1 under another name) and P > 1 would never fire (the full model
    under another name), so both are refused here; ``dyvte.withdraw(heads=..., threshold=...)`` itself still takes
    any P >= 0. Calibration and heads directories are loaded (and checked for consistency) here; whether they, and
    every K, fit a given model is checked by :func:`check_method`.

    Raises:
        MethodError: the message quotes ``spec`` and gives the expected form.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise _fail(str(spec), "", "empty method string")
    spec = spec.strip()
    if "+" in spec:  # e.g. "fastervlm:0.75+heads:DIR:0.5": every pair of the two sides
        parts = spec.split("+")
        left, right = (parts[0].strip(), parts[1].strip()) if len(parts) == 2 else ("", "")
        if left.partition(":")[0] not in PRUNE_BEFORE_LLM or right.partition(":")[0] not in WITHDRAWALS:
            raise _fail(spec, "+", "a composition needs one pruning before the LLM, '+', and one withdrawal")
        return [Compose(o, i) for o in parse_method(left, num_layers) for i in parse_method(right, num_layers)]
    kind, colon, arg = spec.partition(":")
    if kind in PRUNE_BEFORE_LLM:
        return [Prune(kind, ratio=_ratio(spec, kind, r)) for r in _items(spec, kind, arg, "ratio R")]
    if kind == "fastv":
        layer, _, ratios = arg.partition(":")
        if not ratios.strip():
            raise _fail(spec, kind, "FastV needs a layer K and ratios R")
        k = _int(spec, kind, layer.strip(), 1, num_layers, "layer K")
        return [Prune("fastv", ratio=_ratio(spec, kind, r), layer=k) for r in _items(spec, kind, ratios, "ratio R")]
    if kind == "full":
        if colon:
            raise _fail(spec, kind, "full takes no argument")
        return [Full()]
    if kind == "static":
        if arg.strip() == "all":
            return [Static(k) for k in range(num_layers + 1)]
        return [Static(_int(spec, kind, k, 0, num_layers, "exit layer K")) for k in _items(spec, kind, arg, "K")]
    if kind == "calibrated":
        if not arg.strip():
            raise _fail(spec, kind, "the calibration directory is missing")
        try:
            return [Calibrated(Calibration.load(arg))]
        except (OSError, ValueError) as err:
            raise _fail(spec, kind, f"cannot load the calibration: {err}") from err
    if kind == "heads":
        from .heads import ExitHeads

        path, colon, thresholds = arg.partition(":")
        if not path.strip():
            raise _fail(spec, kind, "the exit-heads directory is missing")
        ps = (
            [
                _float(spec, kind, p, "threshold P", lambda t: 0.0 < t <= 1.0, "(0, 1]")
                for p in _items(spec, kind, thresholds, "threshold P")
            ]
            if colon
            else [None]
        )
        try:
            heads = ExitHeads.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise _fail(spec, kind, f"cannot load the exit heads: {err}") from err
        label = Path(path).name
        return [Heads(heads, p, label) for p in ps]
    raise _fail(spec, "", f"unknown method {kind!r}")


def check_method(method: Method, model: nn.Module, spec: str | None = None) -> None:
    """Raise :class:`MethodError` unless ``method`` can run on ``model``, without running the model.

    The method's context is entered and left at once: that checks what it checks on entry (exit layers in range,
    calibrations and exit heads made for this kind of model, pruning supported by the family, nesting) and leaves
    the model exactly as before.
    """
    try:
        with method.apply(model):
            pass
    except Exception as err:  # whatever entering the method refuses, named with the method string
        label = spec if spec is not None else method.name
        raise MethodError(f"method {label!r} ({method.name}) cannot run on this model: {err}") from err
