"""Learned exits (DyVTE): each row leaves after the first layer whose exit head fires (see :mod:`dyvte.heads`).

A run-time policy: at each layer where some row is still in, the engine reads the ``(B,)`` decision once (one host
sync), and none once every row has left. Decode steps replay the exits fixed at prefill.
"""

from __future__ import annotations

import torch
from torch import nn

from ..engine import ForwardState, Withdrawal
from ..heads import ExitHeads, head_features
from ..layout import take
from ..policy import ExitPolicy, register_policy
from ..registry import ModelSpec, unwrap

__all__ = ["HeadsExit", "HeadsWithdrawal"]


class HeadsExit(ExitPolicy):
    """Row ``b`` leaves at layer ``k`` when head ``k - 1`` gives ``logit >= logits[k - 1]`` (the logit of its P(exit)
    threshold; compared as logits, as :func:`dyvte.exits.first_exit` does, so no float32 sigmoid rounds a confident
    head to a tie at 1.0).

    Args:
        heads: exit heads made for the model.
        threshold: one P(exit) threshold for every head; ``None``: the heads' calibrated thresholds (or their
            config's single threshold).
    """

    def __init__(self, heads: ExitHeads, threshold: float | None = None) -> None:
        if threshold is not None and not 0.0 <= threshold:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.heads = heads
        self.threshold = threshold
        self.thresholds = heads.exit_thresholds(threshold).tolist()  # one P(exit) per head, on the host (reading)
        self.logits = heads.exit_logits(threshold).tolist()  # what each head fires on, on the host

    def bind(self, spec: ModelSpec) -> None:
        self.heads.check_model(spec.model)
        super().bind(spec)

    def decide(self, layer: int, hidden: torch.Tensor, state: ForwardState) -> torch.Tensor:
        """Rows whose head ``layer - 1`` fires on the output of layer ``layer - 1`` (the input of ``layer``)."""
        visual, valid = state.visual, state.valid
        if state.idx is not None:  # the current layout of the hidden states
            visual = take(visual, state.idx, 1) & (state.idx >= 0)
            valid = take(valid, state.idx, 1) & (state.idx >= 0)
        with torch.no_grad():
            logits = self.heads.layer_logits(layer - 1, head_features(hidden, visual, valid))  # (B,)
        return logits.float() >= self.logits[layer - 1]


class HeadsWithdrawal(Withdrawal):
    """Per-row adaptive withdrawal by exit heads: ``Withdrawal(model, HeadsExit(heads, threshold))``."""

    def __init__(self, model: nn.Module, heads: ExitHeads, threshold: float | None = None) -> None:
        super().__init__(unwrap(model), HeadsExit(heads, threshold))

    @property
    def heads(self) -> ExitHeads:
        """The exit heads."""
        return self.policy.heads

    @property
    def threshold(self) -> float | None:
        """The threshold passed (``None``: the heads' calibrated thresholds)."""
        return self.policy.threshold

    @property
    def thresholds(self) -> list[float]:
        """The P(exit) threshold of each head, on the host."""
        return self.policy.thresholds


def _heads(model: nn.Module, heads: ExitHeads, threshold: float | None = None) -> HeadsExit:
    return HeadsExit(heads, threshold)


register_policy("heads", _heads)
