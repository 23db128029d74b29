"""Exit thresholds with a statistical promise: Learn-then-Test with fixed-sequence testing and a binomial bound.

The user states a tolerance ε ("at most 1% of answers may differ from the full model") and a failure probability
δ. The exit rule has one parameter λ (a global threshold, or the precision level of per-head thresholds, see
:mod:`dyvte.exits.rules`), and a grid of λ values is fixed in advance, from "exit almost never" to "exit often". On
``n`` held-out calibration samples each λ gets the null hypothesis H_λ: "the disagreement rate R(λ) on new data exceeds
ε". Its p-value is the binomial tail ``P(Bin(n, ε) <= errors(λ))``: how likely so few disagreements would be if the rate
really were ε. The grid is walked in order, rejecting while ``p <= δ``, and the chosen λ is the last one rejected.
Fixed-sequence testing controls the family-wise error at δ with no multiplicity correction, so ``P(R(λ̂) > ε) <= δ`` for
calibration and new samples drawn from the same distribution (Angelopoulos et al., "Learn then Test", arXiv 2110.01052;
the same construction CALM, arXiv 2207.07061, uses for early-exit language models). When even the first λ is not
rejected the heads never fire, which keeps the promise trivially. See docs/design.md §2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["LttResult", "binomial_cdf", "calibration_records_needed", "default_grid", "learn_then_test", "promise_text"]


def binomial_cdf(k: int, n: int, p: float) -> float:
    """``P(Bin(n, p) <= k)``, summed in log space (exact for the sizes used here, n up to ~10^6).

    Raises:
        ValueError: ``n < 0``, ``p`` outside ``[0, 1]``.
    """
    if n < 0 or not 0.0 <= p <= 1.0:
        raise ValueError(f"binomial_cdf needs n >= 0 and p in [0, 1], got n={n}, p={p}")
    if k < 0:
        return 0.0
    if k >= n or p == 0.0:
        return 1.0
    if p == 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
        for i in range(k + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def calibration_records_needed(tolerance: float, delta: float, realized: float = 0.0) -> int:
    """The fewest calibration records on which a rule whose disagreement rate there is ``realized`` (a share of the
    records, ``0 <= realized < tolerance``) is certified at ``tolerance`` with failure probability ``delta``:
    the smallest ``n`` with ``P(Bin(n, tolerance) <= floor(realized * n)) <= delta``.

    With ``realized = 0`` this is the size below which no exit can ever be certified (one disagreement among them
    already fails): 230 records for a 1% promise at ``delta = 0.1``. ``realized = tolerance / 2`` gives the size at
    which a rule that realizes half the promise passes (a margin to exit with): 667 records for 1% at 0.1.

    Raises:
        ValueError: ε / δ outside ``(0, 1)``, or ``realized`` outside ``[0, tolerance)``.
    """
    if not 0.0 < tolerance < 1.0 or not 0.0 < delta < 1.0:
        raise ValueError(f"tolerance and delta must be in (0, 1), got {tolerance!r} and {delta!r}")
    if not 0.0 <= realized < tolerance:
        raise ValueError(f"realized must be in [0, tolerance={tolerance}), got {realized!r}")

    def certified(n: int) -> bool:
        return binomial_cdf(math.floor(realized * n + 1e-9), n, tolerance) <= delta

    high = 1
    while not certified(high):  # the binomial tail at a fixed share falls with n (not strictly: floor steps)
        high *= 2
    low = high // 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if certified(mid) else (mid, high)
    n = high
    while n > 1 and certified(n - 1):  # the first n that passes, whatever the floor steps did in between
        n -= 1
    return n


def promise_text(tolerance: float, delta: float, samples: int) -> str:
    """The promise the certified thresholds carry, in words a user can act on (saved with the heads, logged by fit)."""
    return (
        f"at most {100 * tolerance:g}% of answers differ from the full model's on new data exchangeable with the "
        f"{samples:,} calibration records (the same distribution: same sources, question mix and images), except "
        f"with probability delta = {delta:g}: in about 1 run in {round(1 / delta):,} the realized share may exceed "
        f"{100 * tolerance:g}%. Data from elsewhere (new writers, sources or question types) is not covered."
    )


def default_grid() -> np.ndarray:
    """Candidate λ values (a P(exit) threshold or a precision level), from the most conservative down, fixed before
    any data is seen: 1, then ``1 - 10^-x`` for x from 6 to 0.3 (200 values, dense near 1), then 0.49 down to 0.05."""
    return np.concatenate([[1.0], 1.0 - np.logspace(-6.0, np.log10(0.5), 200), np.linspace(0.49, 0.05, 45)])


@dataclass
class LttResult:
    """What :func:`learn_then_test` chose and why.

    Attributes:
        parameter: the chosen λ (``None`` when no candidate could be certified).
        tolerance: ε, the promised bound on the disagreement rate.
        delta: δ, the probability that the promise fails.
        samples: calibration samples n.
        errors: disagreements on the calibration samples at λ (the risk's count).
        exit_rate: share of calibration samples that exit at λ.
        p_value: the binomial p-value of λ.
        tested: candidates tested before the walk stopped.
    """

    parameter: float | None
    tolerance: float
    delta: float
    samples: int
    errors: int
    exit_rate: float
    p_value: float
    tested: int

    def as_dict(self) -> dict:
        """A JSON-ready record."""
        return asdict(self)


def learn_then_test(
    errors_at: Callable[[float], tuple[int, float]],
    samples: int,
    tolerance: float,
    delta: float,
    grid: np.ndarray | None = None,
) -> LttResult:
    """Walk ``grid`` (most conservative first) and return the last λ whose risk is certified ``<= tolerance``.

    Args:
        errors_at: ``λ -> (disagreements, exit rate)`` on the calibration samples at λ.
        samples: the number of calibration samples n.
        tolerance: ε in ``(0, 1)``.
        delta: δ in ``(0, 1)``.
        grid: candidate λ values in testing order (default :func:`default_grid`); it must not depend on the
            calibration data.

    Returns:
        The :class:`LttResult`.

    Raises:
        ValueError: ``samples < 1`` or ε / δ outside ``(0, 1)``.
    """
    if samples < 1:
        raise ValueError("Learn-then-Test needs at least one calibration sample")
    if not 0.0 < tolerance < 1.0:
        raise ValueError(f"tolerance must be in (0, 1) (a rate, e.g. 0.005 for 0.5 pt), got {tolerance!r}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    grid = default_grid() if grid is None else np.asarray(grid, dtype=np.float64)
    chosen = LttResult(None, tolerance, delta, samples, 0, 0.0, 0.0, 0)
    for tested, lam in enumerate(grid, start=1):
        errors, exit_rate = errors_at(float(lam))
        p_value = binomial_cdf(int(errors), samples, tolerance)
        if p_value > delta:
            chosen.tested = tested
            return chosen
        chosen = LttResult(float(lam), tolerance, delta, samples, int(errors), float(exit_rate), p_value, tested)
    return chosen
