"""Learned exits (DyVTE): each row leaves after the first layer whose exit head fires (see
:mod:`dyvte.policies.exit_heads`).

A run-time policy: at each layer where some row is still in, the engine reads the ``(B,)`` decision once (one host
sync), and none once every row has left. Decode steps replay the exits fixed at prefill.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dyvte.engine.layout import take
from dyvte.engine.policy import ExitPolicy, PolicyView, register_policy
from dyvte.engine.registry import ModelSpec
from dyvte.policies.exit_heads import ExitHeads, head_features
from dyvte.policies.shift import DEFAULT_ALPHA, DEFAULT_WINDOW, ScoreMonitor, ShiftReport
from dyvte.utils.syntax import ArgumentError, MethodSyntax, float_in, items
from dyvte.utils.threads import PerThread

__all__ = ["LearnedExit"]


class LearnedExit(ExitPolicy):
    """Row ``b`` leaves at layer ``k`` when head ``k - 1`` gives ``logit >= logits[k - 1]`` (the logit of its P(exit)
    threshold; compared as logits, as :func:`dyvte.policies.exit_heads.first_exit` does, so no float32 sigmoid rounds a
    confident head to a tie at 1.0).

    Args:
        heads: exit heads made for the model.
        threshold: one P(exit) threshold for every head; ``None``: the heads' calibrated thresholds (or their
            config's single threshold).
        allow_other_model: attach heads whose saved model fingerprint differs from the model's, with a warning
            (:meth:`dyvte.ExitHeads.check_model`); by default that is an error.
        monitor_shift: keep the scores of the rows reaching each head for :meth:`shift_report` (device tensors, read
            only by the report: no host sync in the forward); ``None``: when the heads carry a ``score_reference``.
        shift_window: rows per head the monitor keeps (the most recent).

    Attributes:
        shift_monitor: the :class:`dyvte.policies.shift.ScoreMonitor`, or ``None`` when not monitoring.
    """

    _reach = PerThread()  # (B,) rows no head has fired on yet in this prefill (device), per calling thread
    _scores = PerThread(factory=lambda self: {})  # head -> ((B,) logits, (B,) reached) of the thread's last prefill
    _previous = PerThread()  # (head, (B, w) features) of the last head run in this prefill, for layer_change heads

    def __init__(
        self,
        heads: ExitHeads,
        threshold: float | None = None,
        allow_other_model: bool = False,
        monitor_shift: bool | None = None,
        shift_window: int | None = DEFAULT_WINDOW,
    ) -> None:
        if threshold is not None and not 0.0 <= threshold:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.heads = heads
        self.threshold = threshold
        self.allow_other_model = allow_other_model
        self.thresholds = heads.exit_thresholds(threshold).tolist()  # one P(exit) per head, on the host (reading)
        self.logits = heads.exit_logits(threshold).tolist()  # what each head fires on, on the host
        self.layer_change = heads.config.layer_change  # heads that read the previous head's features too
        self.visual_inputs = heads.config.visual_inputs  # heads that read the visual tokens' pooled states too
        reference = heads.config.score_reference
        if monitor_shift is None:
            monitor_shift = reference is not None
        self.shift_monitor = ScoreMonitor(heads.num_heads, reference, shift_window) if monitor_shift else None

    def bind(self, spec: ModelSpec) -> None:
        self.heads.check_model(spec.model, allow_other_model=self.allow_other_model)
        super().bind(spec)

    def start(self, view: PolicyView, kwargs: dict[str, Any]) -> None:
        """A new sequence: every row reaches the first head again."""
        if view.new_sequence:
            self._reach = None
            self._scores = {}
            self._previous = None

    def decide(self, layer: int, hidden: torch.Tensor, view: PolicyView) -> torch.Tensor:
        """Rows whose head ``layer - 1`` fires on the output of layer ``layer - 1`` (the input of ``layer``); with a
        shift monitor, the logits of the rows that reached the head are kept (on the device)."""
        visual, valid = view.visual, view.valid
        if view.idx is not None:  # the current layout of the hidden states
            visual = take(visual, view.idx, 1) & (view.idx >= 0)
            valid = take(valid, view.idx, 1) & (view.idx >= 0)
        head = layer - 1
        with torch.no_grad():
            features = head_features(hidden, visual, valid, visual_inputs=self.visual_inputs)  # (B, 2d or 4d)
            previous = None
            if self.layer_change and head > 0:
                if self._previous is None or self._previous[0] != head - 1:
                    raise RuntimeError(f"exit head {head} reads head {head - 1}'s features, which did not run")
                previous = self._previous[1]
            logits = self.heads.layer_logits(head, features, previous)  # (B,)
        if self.layer_change:
            self._previous = (head, features)
        fires = logits.float() >= self.logits[layer - 1]
        reach = self._reach if self._reach is not None else torch.ones_like(fires)
        self._scores[layer - 1] = (logits.detach().float(), reach)
        if self.shift_monitor is not None:  # device work only: the engine ignores rows that left, the monitor too
            self.shift_monitor.record(layer - 1, logits, reach)
        self._reach = reach & ~fires
        return fires

    def exit_probabilities(self) -> list[list[float | None]]:
        """Per row of the calling thread's last prefill, each head's P(exit) (``sigmoid`` of its logit) where the
        row reached the head, ``None`` where it had left before it (its later heads never ran on its full state).
        Reads the kept device tensors (one host read per head); ``[]`` before any prefill."""
        scores = self._scores
        if not scores:
            return []
        batch = next(iter(scores.values()))[0].shape[0]
        rows: list[list[float | None]] = [[None] * self.heads.num_heads for _ in range(batch)]
        for head, (logits, reach) in scores.items():
            probability, reached = torch.sigmoid(logits).tolist(), reach.tolist()
            for row in range(batch):
                if reached[row]:
                    rows[row][head] = probability[row]
        return rows

    def shift_report(self, alpha: float = DEFAULT_ALPHA) -> ShiftReport | None:
        """Whether the scores seen so far look like the calibration records' (:func:`dyvte.policies.shift.shift_report`;
        ``None`` when not monitoring).

        Raises:
            ValueError: monitoring heads that carry no ``score_reference``.
        """
        return None if self.shift_monitor is None else self.shift_monitor.report(alpha)


def _heads(
    model: nn.Module, heads: ExitHeads, threshold: float | None = None, allow_other_model: bool = False
) -> LearnedExit:
    return LearnedExit(heads, threshold, allow_other_model)


def _parse(argument: str, num_layers: int) -> list[dict[str, Any]]:
    """``heads:DIR[:P[,P...]]``: the heads are loaded (and checked for consistency) here.

    P = 0 would fire every head on every row (static:1 under another name) and P > 1 would never fire (the full model
    under another name), so the method string refuses both; ``dyvte.withdraw(heads=..., threshold=...)`` itself
    takes any P >= 0.
    """
    path, colon, thresholds = argument.partition(":")
    if not path.strip():
        raise ArgumentError("the exit-heads directory is missing")
    ps: list[float | None] = [None]
    if colon:
        interval = "(0, 1]"
        ps = [float_in(p, "threshold P", lambda t: 0.0 < t <= 1.0, interval) for p in items(thresholds, "threshold P")]
    try:
        heads = ExitHeads.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ArgumentError(f"cannot load the exit heads: {err}") from err
    if heads.config.thresholds is None:  # no per-head thresholds saved: no P means the config's single threshold
        ps = [heads.config.threshold if p is None else p for p in ps]
    return [{"heads": heads, "threshold": p} for p in ps]


def _name(options: dict[str, Any]) -> str:
    """``heads(DIR) calibrated tol=...`` for the saved certified thresholds, else ``heads(DIR) p=...``."""
    heads, threshold = options["heads"], options.get("threshold")
    source = Path(heads.name_or_path).name if heads.name_or_path else ""
    label = f"heads({source})" if source else "heads"
    certificate = heads.config.calibration
    if threshold is None and heads.config.thresholds is not None and certificate is not None:
        return f"{label} calibrated tol={certificate['tolerance']:g}"
    return f"{label} p={heads.config.threshold if threshold is None else threshold:g}"


SYNTAX = MethodSyntax(
    form="heads:DIR[:P[,P...]] (DIR an exit-heads directory, P a P(exit) threshold in (0, 1])",
    short="heads:DIR[:P]",
    parse=_parse,
    name=_name,
)
register_policy("heads", _heads, SYNTAX)
