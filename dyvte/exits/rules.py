"""Label rules, head targets and exact offline scoring of exit decisions, from a label cache.

A label cache (:func:`dyvte.exits.labels.build_label_cache`) holds, per sample and exit layer K = 0..L-1, whether
withdrawal at K gives the full model's greedy answer (``match``), the answer-position KL (``kl``), the paper's rule
(``dyvte``) and whether the answer at K is right (``correct``, K = L: the full model). Everything here is computed
from those columns without running the model.

Label rules (``ok[K]``: "exiting at K is acceptable"):

* ``agreement`` (default): ``match[K]``, the answer equals the full model's;
* ``kl``: ``kl[K] <= eta``;
* ``dyvte``: the paper's rule (argmax agreement > 99% of the gold answer's positions AND answer loss <= 1.03x the
  full model's). On a confident model its loss clause fails even when the answer does not change (the ablation in
  checkpoints/README.md).

Targets: head j (exit layer K = j + 1) learns ``safe_from[K]``: ``ok`` at K and at every later exit layer, the
oracle's own target; the ``-layer`` rules keep the per-layer target ``ok[K]`` (not monotone): ``dyvte-layer`` the
paper's, ``agreement-layer`` ``match[K]``, exactly the promised risk of a first exit at K (an answer that equals the
full model's at K is not made wrong by a later layer's disagreement).

Exits: the first head j with P(exit) >= its threshold gives K = j + 1; none gives L (nothing withdrawn). Before a
row's exit no token has left, so the heads read exactly the cached full-model features: the simulated exit layer
equals the engine's (tested in tests/exits/test_rules.py), and so do its answer and its prefill FLOPs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from dyvte.exits.risk import LttResult, default_grid, learn_then_test
from dyvte.policies.exit_heads import NEVER, exit_logit, first_exit
from dyvte.utils.devices import model_device

__all__ = [
    "ThresholdCertificate",
    "certify_thresholds",
    "exit_savings",
    "platt_scaling",
    "savings_levels",
    "platt_thresholds",
    "agrees_at",
    "disagreement_at",
    "group_disagreement_at",
    "LABEL_RULES",
    "check_rule",
    "exit_ok",
    "head_targets",
    "outcome",
    "safe_from",
]

LABEL_RULES = ("agreement", "agreement-layer", "kl", "dyvte", "dyvte-layer")


def check_rule(rule: str) -> str:
    """``rule`` when it names a label rule.

    Raises:
        ValueError: an unknown rule, naming the known ones.
    """
    if rule not in LABEL_RULES:
        raise ValueError(f"label_rule must be one of {', '.join(LABEL_RULES)}, got {rule!r}")
    return rule


def exit_ok(columns: Mapping[str, np.ndarray], rule: str, eta: float = 0.05) -> np.ndarray:
    """``(N, L)`` bool: exiting at K = 0..L-1 is acceptable under ``rule`` (``eta``: the ``kl`` rule's bound)."""
    rule = check_rule(rule)
    if rule in ("agreement", "agreement-layer"):
        return np.asarray(columns["match"], dtype=bool)
    if rule == "kl":
        return np.asarray(columns["kl"]) <= eta
    return np.asarray(columns["dyvte"], dtype=bool)


def safe_from(ok: np.ndarray) -> np.ndarray:
    """``(N, L)`` bool: ``ok`` at K and at every later exit layer ``K' < L``."""
    return np.flip(np.logical_and.accumulate(np.flip(ok, 1), axis=1), 1)


def head_targets(columns: Mapping[str, np.ndarray], rule: str, eta: float = 0.05) -> torch.Tensor:
    """``(N, L-1)`` float targets of heads j = 0..L-2 (exit layer j + 1) under ``rule`` (module docstring)."""
    rule = check_rule(rule)
    ok = exit_ok(columns, rule, eta)
    target = ok if rule.endswith("-layer") else safe_from(ok)
    return torch.from_numpy(np.ascontiguousarray(target[:, 1:])).float()


def agrees_at(match: np.ndarray, exits) -> np.ndarray:
    """``(N,)`` bool: each sample's answer at its exit layer is the full model's (``match`` ``(N, L)``; K = L is the
    full model itself)."""
    match = np.asarray(match, dtype=bool)
    exits = np.asarray(exits)
    at_exit = match[np.arange(len(exits)), np.minimum(exits, match.shape[1] - 1)]
    return at_exit | (exits == match.shape[1])


def outcome(columns: Mapping[str, np.ndarray], exits: torch.Tensor) -> dict[str, np.ndarray]:
    """Per sample at its exit layer: ``agree`` (the full model's answer) and ``correct`` (the gold answer)."""
    exits = np.asarray(exits)
    correct = np.asarray(columns["correct"], dtype=bool)
    num_layers = np.asarray(columns["match"]).shape[1]
    if correct.shape[1] != num_layers + 1:
        raise ValueError(f"correct: {num_layers + 1} columns (K = 0..L) expected, got {correct.shape[1]}")
    return {"agree": agrees_at(columns["match"], exits), "correct": correct[np.arange(len(exits)), exits]}


def disagreement_at(logits: torch.Tensor, match: np.ndarray, thresholds: torch.Tensor) -> tuple[int, float]:
    """``(disagreements, exit rate)`` of samples whose heads give ``logits`` (``(N, L-1)``) at logit
    ``thresholds``."""
    exits = first_exit(logits, thresholds).numpy()
    return int((~agrees_at(match, exits)).sum()), float((exits < logits.shape[1] + 1).mean())


def group_disagreement_at(
    logits: torch.Tensor, match: np.ndarray, thresholds: torch.Tensor, codes: np.ndarray, num_groups: int
) -> tuple[np.ndarray, float]:
    """``(disagreements per group (num_groups,), exit rate)`` as :func:`disagreement_at`, counted per group
    (``codes``: ``(N,)`` each sample's group number in ``0..num_groups-1``)."""
    exits = first_exit(logits, thresholds).numpy()
    wrong = ~agrees_at(match, exits)
    return np.bincount(codes[wrong], minlength=num_groups), float((exits < logits.shape[1] + 1).mean())


def platt_scaling(logits: torch.Tensor, targets: torch.Tensor, steps: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head Platt scaling: ``(a, b)``, each ``(L-1,)``, so that ``sigmoid(a * logit + b)`` is a calibrated
    P(safe) on reference data (log loss minimized by L-BFGS).

    Heads trained with class weights (``balance``) read differently: a head whose positives are rare is pushed up,
    one whose negatives are rare is pushed down, so one global threshold on raw probabilities treats them unevenly.

    Args:
        logits: ``(N, L-1)`` exit logits of the reference samples (validation data, not the training set: on
            their own training samples the heads are overconfident).
        targets: ``(N, L-1)`` their 0/1 head targets.
        steps: L-BFGS iterations.
    """
    logits, targets = logits.detach().double(), targets.double()
    a = torch.ones(logits.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(logits.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([a, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(a * logits + b, targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return a.detach(), b.detach()


def platt_thresholds(a: torch.Tensor, b: torch.Tensor, level: float | torch.Tensor) -> torch.Tensor:
    """``(L-1,)`` float64 raw logit thresholds equivalent to ``sigmoid(a * logit + b) >= level`` for each head (a
    head with ``a <= 0`` ranks samples the wrong way round and never fires: ``+inf``).

    ``level`` is one precision level for every head, or an ``(L-1,)`` tensor of one level per head; a level >= 1
    never fires."""
    level = torch.as_tensor(level, dtype=torch.float64).expand(a.shape)
    raw = (exit_logit(level) - b) / a.clamp(min=1e-12)
    return torch.where((a > 0) & (level < 1.0), raw, math.inf)


def savings_levels(savings: torch.Tensor, mu: float) -> torch.Tensor:
    """``(L-1,)`` per-head precision levels of the ``savings`` family: head j may fire when its calibrated P(unsafe)
    is at most ``mu * savings[j] / max(savings)``, i.e. the risk an exit may take is proportional to the prefill
    FLOPs it saves (an early exit saves more, so it may be taken on weaker evidence).

    Args:
        savings: ``(L-1,)`` mean relative prefill FLOPs saved by exiting at K = j + 1 (:func:`exit_savings`).
        mu: the family's parameter in ``[0, 1]``; 0 never exits, larger exits more.
    """
    savings = torch.as_tensor(savings, dtype=torch.float64).clamp(min=0.0)
    return 1.0 - mu * savings / savings.max().clamp(min=1e-12)


def exit_savings(flops: np.ndarray) -> torch.Tensor:
    """``(L-1,)`` mean relative prefill FLOPs saved by exiting at K = 1..L-1, from ``(N, L+1)`` per-sample prefill
    FLOPs at K = 0..L relative to the full model (e.g. the validation samples';
    :func:`dyvte.eval.flops.prefill_flops`)."""
    flops = np.asarray(flops, dtype=np.float64)
    return torch.from_numpy(1.0 - flops[:, 1:-1].mean(0))


@dataclass
class ThresholdCertificate:
    """Calibrated per-head thresholds and the Learn-then-Test record behind them.

    Attributes:
        logits: each head's logit threshold, what the heads fire on (``None``: never fires).
        thresholds: the same as P(exit) thresholds, for reading (float64; a logit above ~37 reads as 1.0 and
            :data:`dyvte.exits.risk.NEVER` marks a head that never fires).
        result: the Learn-then-Test record.
        family: the threshold family walked (``"savings"``, ``"platt"`` or ``"global"``).
        group_sizes: each group's calibration records (``None``: pooled).
    """

    logits: list[float | None]
    thresholds: list[float]
    result: LttResult
    family: str
    group_sizes: dict[str, int] | None = None

    def record(self) -> dict:
        """A JSON-ready record for the heads' config: the Learn-then-Test record (with groups: each group's
        calibration records, disagreements and p-value at the chosen λ, ``groups``), the family, and ``group_sizes``
        (each group's calibration records, also when nothing was certified)."""
        return {**self.result.as_dict(), "family": self.family, "group_sizes": self.group_sizes}


def certify_thresholds(
    heads,
    features: torch.Tensor,
    match: np.ndarray,
    tolerance: float,
    delta: float,
    reference: tuple[torch.Tensor, torch.Tensor] | None = None,
    savings: torch.Tensor | None = None,
    groups: np.ndarray | None = None,
    margin: float = 0.0,
) -> ThresholdCertificate:
    """Choose the heads' thresholds on held-out calibration samples with the promise of :mod:`dyvte.exits.risk`.

    The risk of a sample is that its answer at its exit layer differs from the full model's (``match`` of a label
    cache). The thresholds are one family with one parameter walked through a grid fixed in advance
    (:func:`dyvte.exits.risk.default_grid`), from the most conservative end:

    * ``"savings"`` (``reference`` and ``savings`` given; what ``train/fit.py`` uses): head j fires when its
      Platt-scaled P(unsafe) is <= μ · savings[j] / max(savings) (:func:`savings_levels`), μ walked up from 0: the
      risk an exit may take is proportional to the FLOPs it saves;
    * ``"platt"`` (``reference`` only): every head fires when its Platt-scaled P(safe) is >= λ
      (:func:`platt_scaling`, fitted on ``reference``; :func:`platt_thresholds`), λ walked down from 1;
    * ``"global"`` (neither): every raw P(exit) is compared with λ.

    Either way, with calibration and new samples from one distribution,
    ``P(disagreement rate on new samples > tolerance) <= delta``. With ``groups`` the promise is per group:
    ``P(some group's disagreement rate > tolerance) <= delta``, each group tested at ``delta / G``
    (:func:`dyvte.exits.risk.learn_then_test`); with ``margin`` the calibration records certify
    ``tolerance * (1 - margin)``.

    Args:
        heads: the trained :class:`dyvte.policies.exit_heads.ExitHeads`.
        features: ``(N, L-1, 2d)`` head inputs of the calibration samples.
        match: ``(N, L)`` the calibration label cache's ``match`` column.
        tolerance: ε, e.g. 0.01 for "at most 1% of answers may differ".
        delta: δ, e.g. 0.1.
        reference: ``(features, targets)`` of validation samples (disjoint from training and calibration), which
            put the heads on one scale.
        savings: ``(L-1,)`` mean relative prefill FLOPs saved by an exit at K = j + 1 (:func:`exit_savings`),
            computed on data other than the calibration samples; needs ``reference``.
        groups: ``(N,)`` each calibration sample's group (e.g. the label cache's ``qtype``); ``None``: pooled.
        margin: in ``[0, 1)``, the share of ``tolerance`` kept in reserve.

    Returns:
        The :class:`ThresholdCertificate` (every threshold ``NEVER`` when nothing can be certified).
    """
    with torch.no_grad():
        device = model_device(heads)  # the heads may still be where they trained; the search runs on the host
        logits = heads(features.to(device)).float().cpu()  # (N, L-1)
        ref_logits = None if reference is None else heads(reference[0].to(device)).float().cpu()
    num_heads = logits.shape[1]
    grid = default_grid()  # λ from 1 down
    if savings is not None and ref_logits is None:
        raise ValueError("certify_thresholds: savings needs reference (the savings family is Platt-scaled)")
    if ref_logits is None:
        family = "global"

        def thresholds(lam: float) -> torch.Tensor:
            return exit_logit(torch.full((num_heads,), lam))
    else:
        a, b = platt_scaling(ref_logits, reference[1])
        if savings is None:
            family = "platt"

            def thresholds(lam: float) -> torch.Tensor:
                return platt_thresholds(a, b, lam)
        else:
            family, grid = "savings", 1.0 - grid  # μ from 0 up
            savings = torch.as_tensor(savings, dtype=torch.float64)
            if savings.shape != (num_heads,) or not bool(torch.isfinite(savings).all()) or savings.max() <= 0:
                raise ValueError(f"savings: {num_heads} finite values with a positive maximum expected")

            def thresholds(lam: float) -> torch.Tensor:
                return platt_thresholds(a, b, savings_levels(savings, lam))

    if groups is None:
        sizes = None
        result = learn_then_test(
            lambda lam: disagreement_at(logits, match, thresholds(lam)),
            len(logits),
            tolerance,
            delta,
            grid,
            margin=margin,
        )
    else:
        labels = np.asarray(groups).astype(str)
        if labels.shape != (len(logits),):
            raise ValueError(f"groups: one label per calibration sample ({len(logits)}) expected, got {labels.shape}")
        names, codes = np.unique(labels, return_inverse=True)
        sizes = {str(name): int(n) for name, n in zip(names, np.bincount(codes), strict=True)}
        result = learn_then_test(
            lambda lam: group_disagreement_at(logits, match, thresholds(lam), codes, len(names)),
            len(logits),
            tolerance,
            delta,
            grid,
            sizes,
            margin,
        )
    chosen = torch.full((num_heads,), math.inf) if result.parameter is None else thresholds(result.parameter)
    chosen = chosen.float().double()  # what a float32 comparison sees, so the record reads what fires
    readable = torch.where(torch.isinf(chosen) & (chosen > 0), NEVER, torch.sigmoid(chosen))
    as_logits = [None if math.isinf(t) and t > 0 else float(t) for t in chosen.tolist()]
    return ThresholdCertificate(as_logits, [float(t) for t in readable], result, family, sizes)
