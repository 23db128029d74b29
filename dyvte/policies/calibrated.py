"""Calibrated exits: the static K a :class:`dyvte.Calibration` chose (VTW's KL criterion), checked against the model."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..policy import register_policy
from .static import StaticExit

__all__ = ["calibrated"]


def calibrated(model: nn.Module, calibration: object | str | Path) -> StaticExit:
    """The static policy at ``calibration``'s layer (a :class:`dyvte.Calibration`, or a path to its directory/file).

    Raises:
        ValueError: the calibration was made for another kind of model, or its file is inconsistent.
    """
    from ..calibrate import Calibration

    if not isinstance(calibration, Calibration):
        calibration = Calibration.load(calibration)
    calibration.check_model(model)
    return StaticExit(calibration.layer)


register_policy("calibration", calibrated)
