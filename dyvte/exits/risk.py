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

Two refinements (issue 31):

* **groups** (e.g. the question type): the promise becomes "in EACH group at most ε differ". At each λ every group g
  gets its own binomial p-value on its own ``n_g`` records, and λ is rejected only if every one is ``<= δ / G``
  (Bonferroni over the G groups). This is conservative: since the claim is "every group is within ε", the
  intersection-union argument would allow ``<= δ`` per group, but the Bonferroni level is the one stated here and in
  the promise. A group with fewer than ``calibration_records_needed(ε, δ / G)`` records can never be certified, so
  nothing exits (callers refuse such a split before any labelling, see ``dyvte fit --group_by``). Because each group
  is certified on its own, the promise holds for any mix of these groups on new data, as long as each group's new
  records are exchangeable with that group's calibration records.
* **a margin** m in ``[0, 1)``: the calibration records certify ``ε (1 - m)`` while the promise states ε, so that a
  moderate shift between calibration and use (a disagreement rate up to ``1 / (1 - m)`` times the calibration
  one) still keeps ε. The guarantee itself stays the exchangeable one; the margin is a stated cushion, not a proof.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "LttResult",
    "binomial_cdf",
    "calibration_records_needed",
    "check_margin",
    "default_grid",
    "learn_then_test",
    "promise_text",
    "small_groups",
]


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


def check_margin(margin: float) -> float:
    """``margin`` when it is in ``[0, 1)`` (the share of ε kept in reserve).

    Raises:
        ValueError: a margin outside ``[0, 1)``.
    """
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1) (0.25 certifies 75% of the tolerance), got {margin!r}")
    return float(margin)


def small_groups(sizes: Mapping[str, int], tolerance: float, delta: float, margin: float = 0.0) -> dict[str, int]:
    """The groups of ``sizes`` (name -> calibration records) too small to ever be certified at ``ε (1 - margin)``
    with the Bonferroni level ``δ / G``, and the records each would need (:func:`calibration_records_needed`);
    ``{}`` when every group can be certified."""
    needed = calibration_records_needed(tolerance * (1.0 - check_margin(margin)), delta / max(1, len(sizes)))
    return {name: needed for name, n in sizes.items() if n < needed}


def promise_text(
    tolerance: float,
    delta: float,
    samples: int,
    margin: float = 0.0,
    groups: Mapping[str, int] | None = None,
    group_by: str = "qtype",
) -> str:
    """The promise the certified thresholds carry, in words a user can act on (saved with the heads, logged by fit).

    Args:
        tolerance: ε, the promised share.
        delta: δ.
        samples: calibration records.
        margin: the share of ε kept in reserve (the calibration records certified ``ε (1 - margin)``).
        groups: group name -> calibration records, when each group was certified on its own (``None``: pooled).
        group_by: what the groups are (a column name).
    """
    eps = f"{100 * tolerance:g}%"
    if groups:
        listed = ", ".join(f"{name} {n:,}" for name, n in sorted(groups.items()))
        scope = (
            f"in each of the {len(groups)} groups by {group_by} ({listed} calibration records), at most {eps} of "
            "answers differ from the full model's, whatever the mix of these groups, on new data whose records of "
            "each group are exchangeable with that group's calibration records (same sources, images and question "
            f"wording), except with probability delta = {delta:g} for all groups together (each group tested at "
            f"delta / {len(groups)} = {delta / len(groups):.3g})"
        )
    else:
        scope = (
            f"at most {eps} of answers differ from the full model's on new data exchangeable with the {samples:,} "
            "calibration records (the same distribution: same sources, question mix and images), except with "
            f"probability delta = {delta:g}"
        )
    cushion = ""
    if margin > 0:
        cushion = (
            f" The calibration records certified {100 * tolerance * (1 - margin):.3g}% (margin {margin:g}), so a "
            f"shift that raises the disagreement rate up to {1 / (1 - margin):.3g}x the calibration one still keeps "
            f"{eps}; that cushion is stated, not proven."
        )
    other = "new groups, " if groups else "a different question mix, "
    return (
        f"{scope}: in about 1 run in {round(1 / delta):,} the realized share may exceed {eps}.{cushion} Data from "
        f"elsewhere ({other}new writers or sources) is not covered by the guarantee."
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
        p_value: the binomial p-value of λ (with groups: the largest group's p-value).
        tested: candidates tested before the walk stopped.
        margin: the share of ε kept in reserve: λ was certified at ``tolerance * (1 - margin)``.
        level: the level each p-value was compared with (δ pooled, ``δ / G`` with G groups).
        groups: per group at λ (``None``: pooled): ``{name: {"samples", "errors", "p_value"}}``.
    """

    parameter: float | None
    tolerance: float
    delta: float
    samples: int
    errors: int
    exit_rate: float
    p_value: float
    tested: int
    margin: float = 0.0
    level: float | None = None
    groups: dict[str, dict] | None = None

    @property
    def certified_at(self) -> float:
        """The rate the calibration records certified: ``tolerance * (1 - margin)``."""
        return self.tolerance * (1.0 - self.margin)

    def as_dict(self) -> dict:
        """A JSON-ready record."""
        return {**asdict(self), "certified_at": self.certified_at}


def learn_then_test(
    errors_at: Callable[[float], tuple[int | np.ndarray, float]],
    samples: int,
    tolerance: float,
    delta: float,
    grid: np.ndarray | None = None,
    groups: Mapping[str, int] | None = None,
    margin: float = 0.0,
) -> LttResult:
    """Walk ``grid`` (most conservative first) and return the last λ whose risk is certified ``<= tolerance``.

    Args:
        errors_at: ``λ -> (disagreements, exit rate)`` on the calibration samples at λ; with ``groups``, the
            disagreements are an array with one count per group, in the order of ``groups``.
        samples: the number of calibration samples n.
        tolerance: ε in ``(0, 1)``.
        delta: δ in ``(0, 1)``.
        grid: candidate λ values in testing order (default :func:`default_grid`); it must not depend on the
            calibration data.
        groups: group name -> its calibration samples (summing to ``samples``): λ is rejected only if every group's
            p-value is ``<= δ / G`` (module docstring). ``None``: one pooled test at δ.
        margin: in ``[0, 1)``: certify ``tolerance * (1 - margin)`` (the result still records ``tolerance``).

    Returns:
        The :class:`LttResult`.

    Raises:
        ValueError: ``samples < 1``, ε / δ outside ``(0, 1)``, a margin outside ``[0, 1)``, group sizes that do not
            sum to ``samples`` or a count array of the wrong length.
    """
    if samples < 1:
        raise ValueError("Learn-then-Test needs at least one calibration sample")
    if not 0.0 < tolerance < 1.0:
        raise ValueError(f"tolerance must be in (0, 1) (a rate, e.g. 0.005 for 0.5 pt), got {tolerance!r}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    margin = check_margin(margin)
    target = tolerance * (1.0 - margin)
    names = None if groups is None else list(groups)
    if names is not None:
        sizes = [int(groups[name]) for name in names]
        if not names or sum(sizes) != samples or min(sizes) < 1:
            raise ValueError(f"groups: positive sizes summing to {samples} expected, got {dict(groups)}")
    level = delta / (1 if names is None else len(names))
    grid = default_grid() if grid is None else np.asarray(grid, dtype=np.float64)
    chosen = LttResult(None, tolerance, delta, samples, 0, 0.0, 0.0, 0, margin, level)
    for tested, lam in enumerate(grid, start=1):
        errors, exit_rate = errors_at(float(lam))
        per_group = None
        if names is None:
            total = int(errors)
            p_value = binomial_cdf(total, samples, target)
        else:
            counts = np.asarray(errors, dtype=np.int64).reshape(-1)
            if len(counts) != len(names):
                raise ValueError(f"errors_at gave {len(counts)} group counts, {len(names)} groups expected")
            per_group = {
                name: {"samples": n, "errors": int(e), "p_value": binomial_cdf(int(e), n, target)}
                for name, n, e in zip(names, sizes, counts, strict=True)
            }
            total = int(counts.sum())
            p_value = max(g["p_value"] for g in per_group.values())
        if p_value > level:
            chosen.tested = tested
            return chosen
        chosen = LttResult(
            float(lam), tolerance, delta, samples, total, float(exit_rate), p_value, tested, margin, level, per_group
        )
    return chosen
