"""Methods the evaluation harness can run, parsed from method strings through the registries.

A method's ``apply(model)`` is a context manager yielding the active :class:`dyvte.engine.handle.Handle` (or
``None``); the harness reads the per-row exit layers from ``handle.exit_layers`` after each ``generate``, and what the
LLM received from ``fed_tokens`` / ``fed_visual`` / ``visual_after``.

This module keeps no list of methods. A method string ``KIND:ARGS`` is parsed by the
:class:`dyvte.utils.syntax.MethodSyntax` registered with ``KIND``: an exit policy's
(:func:`dyvte.engine.policy.register_policy`) or a pruning method's (:func:`dyvte.pruning.prune.register_pruning`).
A new policy registered with a syntax therefore runs in ``train/evaluate.py`` and the report with no edit here.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from dyvte.engine.handle import ComposedHandle
from dyvte.engine.policy import POLICIES, POLICY_SYNTAX, make_policy
from dyvte.engine.registry import unwrap
from dyvte.policies.calibrated import Calibration
from dyvte.policies.exit_heads import ExitHeads
from dyvte.policies.withdraw import withdraw
from dyvte.pruning.prune import PRUNING_METHODS, prune
from dyvte.utils.syntax import ArgumentError, MethodSyntax

__all__ = [
    "Compose",
    "Full",
    "Method",
    "MethodError",
    "PolicyRun",
    "PruningRun",
    "allow_other_model",
    "calibration_digests",
    "check_method",
    "load_plugins",
    "method_forms",
    "parse_method",
]

logger = logging.getLogger(__name__)


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
class PolicyRun(Method):
    """Withdrawal under the registered exit policy ``policy`` built with ``options`` (``dyvte.withdraw(model,
    policy=policy, **options)``), e.g. ``PolicyRun("static", {"layer": 6})``."""

    policy: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:  # type: ignore[override]
        syntax = POLICY_SYNTAX.get(self.policy)
        return syntax.name(self.options) if syntax is not None else _plain_name(self.policy, self.options)

    @contextlib.contextmanager
    def apply(self, model: nn.Module) -> Iterator[Any]:
        # the policy is built here, not through withdraw()'s keywords: its options may be named like them (layer=)
        with withdraw(model, policy=make_policy(self.policy, unwrap(model), **self.options)) as handle:
            yield handle


@dataclass
class PruningRun(Method):
    """Pruning by the registered method ``method`` with ``options`` (``dyvte.prune(model, method, **options)``):
    ``fastervlm`` / ``random`` before the LLM, ``fastv`` at layer K.

    The handle exposes what the LLM received (``fed_tokens`` / ``fed_visual``) or kept after K (``visual_after``),
    which the harness uses for the FLOPs.
    """

    method: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:  # type: ignore[override]
        entry = PRUNING_METHODS.get(self.method)
        if entry is not None and entry.syntax is not None:
            return entry.syntax.name(self.options)
        return _plain_name(self.method, self.options)

    @contextlib.contextmanager
    def apply(self, model: nn.Module) -> Iterator[Any]:
        with prune(model, self.method, **self.options) as handle:
            yield handle


def _plain_name(kind: str, options: dict[str, Any]) -> str:
    return " ".join([kind, *(f"{k}={v}" for k, v in options.items())])


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


class MethodError(ValueError):
    """A malformed or out-of-range method string; the message quotes it and gives its expected form."""


def _syntaxes() -> dict[str, tuple[str, MethodSyntax]]:
    """Every method string kind: ``kind -> ("policy" | "pruning", syntax)``, from the two registries."""
    kinds = {name: ("pruning", entry.syntax) for name, entry in PRUNING_METHODS.items() if entry.syntax is not None}
    kinds.update({name: ("policy", syntax) for name, syntax in POLICY_SYNTAX.items() if name not in kinds})
    return kinds


def _before_llm() -> list[str]:
    return [n for n, e in PRUNING_METHODS.items() if e.stage == "before" and e.syntax is not None]


def _composition_form() -> str:
    before = [PRUNING_METHODS[n].syntax.short for n in _before_llm()]
    after = [s.short for s in POLICY_SYNTAX.values()]

    def either(forms: list[str]) -> str:
        return forms[0] if len(forms) == 1 else ", ".join(forms[:-1]) + " or " + forms[-1]

    return f"A+B (A pruning before the LLM: {either(before)}; B withdrawal: {either(after)})"


def method_forms() -> dict[str, str]:
    """The form of every method string the harness accepts (``full``, the registered kinds, and ``A+B``)."""
    forms = {"full": "full (no argument)"}
    forms.update({kind: syntax.form for kind, (_, syntax) in _syntaxes().items()})
    forms["+"] = _composition_form()
    return forms


def _fail(spec: str, kind: str, problem: str) -> MethodError:
    forms = method_forms()
    form = forms.get(kind)
    expected = f"expected {form}" if form else "expected one of: " + "; ".join(forms.values())
    return MethodError(f"method {spec!r}: {problem}; {expected}")


def parse_method(spec: str, num_layers: int) -> list[Method]:
    """Methods from a short string; a malformed or out-of-range string raises :class:`MethodError` (a ValueError).

    ``full``; ``KIND:ARGS`` for every kind registered with a method syntax (built in: ``static:K[,K...]`` (K in
    ``[0, L]``), ``static:all`` (K = 0..L), ``calibrated:PATH``, ``heads:PATH[:P[,P...]]`` (exit heads at thresholds
    P in ``(0, 1]``; without P, the heads' saved thresholds), and pruning with R the fraction pruned, in ``[0, 1)``:
    ``fastervlm:R[,R...]``, ``random:R[,R...]``, ``fastv:K:R[,R...]`` (K in ``[1, L]``)); and ``A+B``: pruning A
    before the LLM around withdrawal B, e.g. ``fastervlm:0.75+heads:DIR:0.5``.

    Calibration and heads directories are loaded (and checked for consistency) here; whether they, and every K, fit
    a given model is checked by :func:`check_method`.

    Raises:
        MethodError: the message quotes ``spec`` and gives the expected form.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise _fail(str(spec), "", "empty method string")
    spec = spec.strip()
    if "+" in spec:  # e.g. "fastervlm:0.75+heads:DIR:0.5": every pair of the two sides
        parts = spec.split("+")
        left, right = (parts[0].strip(), parts[1].strip()) if len(parts) == 2 else ("", "")
        if left.partition(":")[0] not in _before_llm() or right.partition(":")[0] not in POLICY_SYNTAX:
            raise _fail(spec, "+", "a composition needs one pruning before the LLM, '+', and one withdrawal")
        return [Compose(o, i) for o in parse_method(left, num_layers) for i in parse_method(right, num_layers)]
    kind, colon, argument = spec.partition(":")
    if kind == "full":
        if colon:
            raise _fail(spec, kind, "full takes no argument")
        return [Full()]
    found = _syntaxes().get(kind)
    if found is None:
        raise _fail(spec, "", f"unknown method {kind!r}")
    role, syntax = found
    try:
        options = syntax.parse(argument, num_layers)
    except ArgumentError as err:
        raise _fail(spec, kind, str(err)) from err
    if role == "pruning":
        return [PruningRun(kind, o) for o in options]
    return [PolicyRun(kind, o) for o in options]


def load_plugins(plugins: list[str]) -> None:
    """Import each plugin (a ``.py`` file or an importable module name), so that the exit policies and pruning
    methods it registers (with their method syntax) can be named in ``--methods``."""
    for plugin in plugins:
        if plugin.endswith(".py"):
            path = Path(plugin)
            if not path.is_file():
                raise FileNotFoundError(f"--plugins: {path} does not exist")
            name = f"dyvte_plugin_{path.stem}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(plugin)
        logger.info("plugin %s loaded", plugin)


def allow_other_model(method: Method) -> Method:
    """Let ``method``'s exit heads or calibration run on a model whose fingerprint differs from the one they saved
    (with a warning naming what differs): ``allow_other_model=True`` in the options of every policy run whose
    registered factory takes that keyword (``heads``, ``calibrated``). Returns ``method``, changed in place."""
    if isinstance(method, Compose):
        allow_other_model(method.outer)
        allow_other_model(method.inner)
    elif isinstance(method, PolicyRun) and method.policy in POLICIES:
        if "allow_other_model" in inspect.signature(POLICIES[method.policy]).parameters:
            method.options["allow_other_model"] = True
    return method


def _checked_objects(method: Method) -> Iterator[tuple[Any, bool]]:
    """The options of ``method`` that check a model themselves (exit heads, calibrations), with the override."""
    if isinstance(method, Compose):
        yield from _checked_objects(method.outer)
        yield from _checked_objects(method.inner)
    elif isinstance(method, PolicyRun):
        allowed = bool(method.options.get("allow_other_model", False))
        for value in method.options.values():
            if callable(getattr(value, "check_model", None)):
                yield value, allowed


def check_method(method: Method, model: nn.Module, spec: str | None = None, processor: Any = None) -> None:
    """Raise :class:`MethodError` unless ``method`` can run on ``model``, without running the model.

    The method's context is entered and left at once: that checks what it checks on entry (exit layers in range,
    calibrations and exit heads made for this model, pruning supported by the family, nesting) and leaves the
    model exactly as before. With ``processor``, the exit heads and calibrations it holds are checked against the
    processor's tokenizer and chat template too (their model fingerprint).
    """
    label = spec if spec is not None else method.name
    try:
        with method.apply(model):
            pass
        if processor is not None:
            for value, allowed in _checked_objects(method):
                value.check_model(model, processor, allow_other_model=allowed)
    except Exception as err:  # whatever entering the method refuses, named with the method string
        raise MethodError(f"method {label!r} ({method.name}) cannot run on this model: {err}") from err


def calibration_digests(method: Method) -> list[str] | None:
    """The digests (:func:`dyvte.data.fingerprints.short_digests`) of the records that chose the thresholds ``method``
    runs at, when it runs at calibrated ones and they were saved with them, else ``None``.

    * ``heads:DIR`` at the heads' calibrated thresholds (no ``P``): ``calibration["record_digests"]`` of the heads'
      config (saved by ``train/fit.py``); at a threshold ``P`` of the caller's, ``None`` (nothing was calibrated);
    * ``calibrated:DIR``: the calibration's ``record_digests`` (saved by ``train/calibrate.py``);
    * ``A+B``: those of the withdrawal ``B``.
    """
    if isinstance(method, Compose):
        return calibration_digests(method.inner)
    if not isinstance(method, PolicyRun):
        return None
    for value in method.options.values():
        if isinstance(value, Calibration):
            return value.record_digests
        if isinstance(value, ExitHeads) and method.options.get("threshold") is None:
            calibration = value.config.calibration if value.config.thresholds is not None else None
            return (calibration or {}).get("record_digests")
    return None
