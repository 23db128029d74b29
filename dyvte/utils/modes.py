"""Measurement runs in eval mode: dropout would make KL, labels and accuracy random (and K = L non-zero)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from torch import nn

__all__ = ["eval_mode"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def eval_mode(model: nn.Module, what: str) -> Iterator[nn.Module]:
    """Run ``what`` (calibration, labelling, evaluation) with ``model`` in eval mode; restore its modes after.

    A model in training mode is switched with a warning that names ``what``: its dropout would otherwise perturb
    every measured number (a calibration would report KL > 0 at K = L, which is 0 by construction).
    """
    training = {name: module.training for name, module in model.named_modules()}
    if any(training.values()):
        logger.warning("%s: the model was in training mode (dropout on); running it in eval mode", what)
        model.eval()
    try:
        yield model
    finally:
        for name, module in model.named_modules():
            module.training = training.get(name, module.training)
