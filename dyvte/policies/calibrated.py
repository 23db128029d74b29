"""Calibrated exits: the static K that VTW's KL criterion chose (:func:`dyvte.calibrate`), saved as a
:class:`Calibration` and checked against the model it is applied to."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from dyvte.engine.fingerprint import check_fingerprint
from dyvte.engine.policy import register_policy
from dyvte.engine.registry import resolve
from dyvte.policies.static import StaticExit
from dyvte.utils.io import write_text_atomic
from dyvte.utils.syntax import ArgumentError, MethodSyntax

__all__ = ["Calibration", "calibrated", "choose_layer"]

FILENAME = "calibration.json"
POSITIONS = ("first", "answer")


@dataclass
class Calibration:
    """Result of :func:`dyvte.calibrate`: the KL curve and the exit layer it chose.

    Attributes:
        layer: chosen exit layer K (``num_layers`` when no K meets the threshold).
        kl_per_layer: mean KL at K = 0..L (index K).
        threshold: eta.
        num_samples: samples averaged.
        positions: ``"first"`` (first answer position) or ``"answer"`` (every teacher-forced answer position).
        model_type: the calibrated model's ``model_type``.
        num_layers: its decoder layer count L.
        met: whether some K < L met the threshold.
        model_fingerprint: the fingerprint of the calibrated model (:func:`dyvte.engine.fingerprint.model_fingerprint`):
            :meth:`check_model` refuses any other model unless told to allow it. ``None`` (a file written before
            fingerprints): accepted with a warning that the model cannot be checked.
        record_digests: the digests of the records it was calibrated on, in the compact form of
            :func:`dyvte.data.fingerprints.short_digests` (``train/calibrate.py`` saves them, so that
            ``train/evaluate.py`` can refuse to evaluate the layer on those very records); ``None``: not known.
    """

    layer: int
    kl_per_layer: list[float]
    threshold: float
    num_samples: int
    positions: str
    model_type: str
    num_layers: int
    met: bool
    model_fingerprint: dict | None = None
    record_digests: list[str] | None = None

    def save(self, directory: str | Path) -> Path:
        """Write ``calibration.json`` into ``directory`` (created if needed, written atomically); returns its path."""
        self.validate(Path(directory) / FILENAME)
        return write_text_atomic(Path(directory) / FILENAME, json.dumps(asdict(self), indent=2) + "\n")

    def validate(self, source: str | Path = "calibration") -> None:
        """Raise ``ValueError`` (naming ``source``) unless the fields agree with each other.

        The stored layer must be the one its own KL curve and threshold choose, ``met`` must say whether a K < L
        met the threshold, and the curve must hold ``L + 1`` values, each a KL divergence: a number >= 0 (never
        negative, never infinite), or ``NaN`` for a layer K < L that was not scored (K = L is always scored).
        """
        problems = []
        if not isinstance(self.num_layers, int) or isinstance(self.num_layers, bool) or self.num_layers < 1:
            raise ValueError(f"{source}: num_layers must be a positive int, got {self.num_layers!r}")
        if not isinstance(self.kl_per_layer, list) or len(self.kl_per_layer) != self.num_layers + 1:
            raise ValueError(
                f"{source}: kl_per_layer must hold L + 1 = {self.num_layers + 1} values (K = 0..L), "
                f"got {self.kl_per_layer!r:.80}"
            )
        bad = _impossible_kl(self.kl_per_layer)
        if bad:
            raise ValueError(
                f"{source}: kl_per_layer holds impossible KL values: {'; '.join(bad)} (a KL divergence is a number "
                ">= 0; NaN marks a layer K < L that was not scored)"
            )
        if self.model_fingerprint is not None and not isinstance(self.model_fingerprint, dict):
            problems.append(f"model_fingerprint must be a dict or null, got {self.model_fingerprint!r:.80}")
        if self.positions not in POSITIONS:
            problems.append(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if not isinstance(self.threshold, (int, float)) or not self.threshold > 0:
            problems.append(f"threshold eta must be > 0, got {self.threshold!r}")
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            problems.append(f"num_samples must be a positive int, got {self.num_samples!r}")
        digests = self.record_digests
        if digests is not None and (not isinstance(digests, list) or not all(isinstance(d, str) for d in digests)):
            problems.append(f"record_digests must be null or a list of hex strings, got {digests!r:.80}")
        if not problems:
            layer, met = choose_layer(self.kl_per_layer, self.threshold, self.num_layers)
            if (self.layer, self.met) != (layer, met):
                kl = (
                    self.kl_per_layer[self.layer]
                    if isinstance(self.layer, int) and 0 <= self.layer <= self.num_layers
                    else None
                )
                problems.append(
                    f"it stores layer={self.layer!r}, met={self.met!r}, but its own KL curve and threshold "
                    f"eta={self.threshold:g} choose layer={layer}, met={met} (KL at the stored layer: {kl})"
                )
        if problems:
            raise ValueError(f"{source} is not a consistent dyvte calibration: " + "; ".join(problems))

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a calibration from a directory holding ``calibration.json`` or from the file itself."""
        file = Path(path)
        if file.is_dir():
            file = file / FILENAME
        try:
            data = json.loads(file.read_text())
            calibration = cls(**data)
        except FileNotFoundError:
            raise
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as err:
            raise ValueError(f"{file} is not a dyvte calibration file: {err}") from err
        calibration.validate(file)
        calibration.source = str(file)
        return calibration

    def with_threshold(self, threshold: float) -> Calibration:
        """The same KL curve with the layer chosen for another eta (no model run needed)."""
        layer, met = choose_layer(self.kl_per_layer, threshold, self.num_layers)
        return dataclasses.replace(self, layer=layer, threshold=threshold, met=met)

    def check_model(self, model: nn.Module, processor: object = None, *, allow_other_model: bool = False) -> None:
        """Raise ``ValueError`` if ``model`` is not the model this calibration was made for.

        The type and depth must match; then the saved model fingerprint must match ``model``'s (and, with
        ``processor``, its tokenizer's): another model of the same shape has another KL curve.

        Args:
            model: the model the calibrated K is about to be applied to.
            processor: its processor (compares the tokenizer and chat template too).
            allow_other_model: accept a fingerprint mismatch with a warning instead of an error.

        Raises:
            ValueError: another model type or depth.
            dyvte.engine.fingerprint.ModelMismatchError: the fingerprint differs (the message names each field).
        """
        spec = resolve(model)
        if (spec.model_type, spec.num_layers) != (self.model_type, self.num_layers):
            raise ValueError(
                f"calibration made for {self.model_type} with {self.num_layers} layers, "
                f"not for {spec.model_type} with {spec.num_layers} layers"
            )
        source = getattr(self, "source", None)
        if not hasattr(self, "logged"):  # the warnings already logged for this calibration (not a saved field)
            self.logged: set[str] = set()
        check_fingerprint(
            self.model_fingerprint,
            model,
            processor,
            what=f"calibration {source}" if source else "this calibration",
            allow_other_model=allow_other_model,
            logged=self.logged,
        )


def _impossible_kl(curve: list) -> list[str]:
    """``kl_per_layer[K] = value: why`` for each entry no KL curve can hold (K = L: the last entry)."""
    last = len(curve) - 1
    bad = []
    for k, value in enumerate(curve):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            bad.append(f"kl_per_layer[{k}] = {value!r} is not a number")
        elif math.isnan(value):
            if k == last:
                bad.append(f"kl_per_layer[{k}] = NaN, but K = L is always scored")
        elif value < 0:
            bad.append(f"kl_per_layer[{k}] = {value!r} is negative")
        elif math.isinf(value):
            bad.append(f"kl_per_layer[{k}] = {value!r} is infinite")
    return bad


def choose_layer(curve: list[float], threshold: float, num_layers: int) -> tuple[int, bool]:
    """Smallest K < L with ``curve[K] <= threshold`` (``nan`` = not scored), else ``L``; and whether one met it."""
    if not threshold > 0:
        raise ValueError(f"threshold eta must be > 0, got {threshold}")
    meeting = [k for k in range(num_layers) if curve[k] == curve[k] and curve[k] <= threshold]
    return (meeting[0], True) if meeting else (num_layers, False)


def calibrated(model: nn.Module, calibration: object | str | Path, allow_other_model: bool = False) -> StaticExit:
    """The static policy at ``calibration``'s layer (a :class:`dyvte.Calibration`, or a path to its directory/file).

    Args:
        model: the model.
        calibration: the calibration or its path.
        allow_other_model: apply a calibration whose saved model fingerprint differs from the model's, with a
            warning (:meth:`Calibration.check_model`); by default that is an error.

    Raises:
        ValueError: the calibration was made for another model, or its file is inconsistent.
    """
    if not isinstance(calibration, Calibration):
        calibration = Calibration.load(calibration)
    calibration.check_model(model, allow_other_model=allow_other_model)
    return StaticExit(calibration.layer)


def _parse(argument: str, num_layers: int) -> list[dict[str, Calibration]]:
    """``calibrated:DIR``: the calibration is loaded (and checked for consistency) here."""
    if not argument.strip():
        raise ArgumentError("the calibration directory is missing")
    try:
        return [{"calibration": Calibration.load(argument)}]
    except (OSError, ValueError) as err:
        raise ArgumentError(f"cannot load the calibration: {err}") from err


def _name(options: dict[str, Calibration]) -> str:
    calibration = options["calibration"]
    return f"calibrated eta={calibration.threshold:g} (K={calibration.layer})"


SYNTAX = MethodSyntax(
    form="calibrated:DIR (a directory holding calibration.json, or the file itself)",
    short="calibrated:DIR",
    parse=_parse,
    name=_name,
)
register_policy("calibrated", calibrated, SYNTAX)
