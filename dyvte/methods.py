"""Methods the evaluation harness can run: each opens a context on the model and names itself.

A method's ``apply(model)`` is a context manager yielding the active handle (or ``None``); the harness reads the
per-row exit layers from ``handle.exit_layers`` after each ``generate``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .calibrate import Calibration
from .prune import prune
from .withdraw import withdraw

__all__ = ["Method", "Full", "Static", "Calibrated", "Heads", "Prune", "Compose", "parse_method"]


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
        threshold = self.heads.config.threshold if self.threshold is None else self.threshold
        return f"heads{'(' + self.label + ')' if self.label else ''} p={threshold:g}"

    @contextlib.contextmanager
    def apply(self, model: nn.Module) -> Iterator[Any]:
        with withdraw(model, heads=self.heads, threshold=self.threshold) as handle:
            yield handle


class _Handles:
    """Attributes of the inner handle first (exit layers), then the outer one (what the LLM received)."""

    def __init__(self, inner: Any, outer: Any) -> None:
        self._inner, self._outer = inner, outer

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name, None)
        return value if value is not None else getattr(self._outer, name, None)


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
            yield _Handles(inner, outer)


def parse_method(spec: str, num_layers: int) -> list[Method]:
    """Methods from a short string.

    ``full``, ``static:K[,K...]``, ``static:all`` (K = 0..L), ``calibrated:PATH``, ``heads:PATH[:P[,P...]]``
    (exit heads at thresholds P), ``A+B`` (pruning A around withdrawal B, e.g. ``fastervlm:0.75+heads:DIR:0.5``),
    and pruning with R the fraction
    pruned: ``fastervlm:R[,R...]``, ``random:R[,R...]``, ``fastv:K:R[,R...]``.
    """
    if "+" in spec:  # e.g. "fastervlm:0.75+heads:DIR:0.5": every pair of the two sides
        left, right = spec.split("+", 1)
        return [Compose(o, i) for o in parse_method(left, num_layers) for i in parse_method(right, num_layers)]
    kind, _, arg = spec.partition(":")
    if kind in ("fastervlm", "random"):
        return [Prune(kind, ratio=float(r)) for r in arg.split(",")]
    if kind == "fastv":
        layer, _, ratios = arg.partition(":")
        if not ratios:
            raise ValueError(f"fastv needs fastv:K:R, got {spec!r}")
        return [Prune("fastv", ratio=float(r), layer=int(layer)) for r in ratios.split(",")]
    if kind == "full":
        return [Full()]
    if kind == "static":
        if arg == "all":
            return [Static(k) for k in range(num_layers + 1)]
        return [Static(int(k)) for k in arg.split(",")]
    if kind == "calibrated":
        return [Calibrated(Calibration.load(arg))]
    if kind == "heads":
        from .heads import ExitHeads

        path, _, thresholds = arg.partition(":")
        heads = ExitHeads.from_pretrained(path)
        label = Path(path).name
        return (
            [Heads(heads, float(p), label) for p in thresholds.split(",")]
            if thresholds
            else [Heads(heads, None, label)]
        )
    raise ValueError(
        f"unknown method {spec!r}: use full, static:K[,K...], static:all, calibrated:PATH, heads:PATH[:P,...], "
        "fastervlm:R, random:R or fastv:K:R"
    )
