"""Learn-then-Test (dyvte.exits.risk): the binomial tail is exact, and the chosen rule keeps its promise (its true
risk exceeds the tolerance in at most a δ share of calibration draws) without being vacuous; bad promises are refused.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from dyvte.exits.risk import binomial_cdf, learn_then_test


def test_binomial_cdf_is_the_exact_tail():
    assert binomial_cdf(0, 10, 0.1) == pytest.approx(0.9**10)
    for n, p in ((7, 0.3), (40, 0.05)):
        for k in range(n + 1):
            exact = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
            assert binomial_cdf(k, n, p) == pytest.approx(exact, rel=1e-9, abs=1e-15)
    assert binomial_cdf(-1, 5, 0.5) == 0.0 and binomial_cdf(5, 5, 0.5) == 1.0
    with pytest.raises(ValueError, match="p in"):
        binomial_cdf(1, 5, 1.5)


def test_learn_then_test_keeps_its_promise_over_many_calibration_draws():
    """A known risk curve: a sample exits when its score >= λ and is then wrong with probability (1 - score)^3.
    The true risk R(λ) is known in closed form; R(λ̂) > ε may happen in at most ~δ of the draws."""
    rng = np.random.default_rng(0)
    tolerance, delta, n, draws = 0.02, 0.1, 400, 400
    grid = np.linspace(1.0, 0.0, 101)

    def true_risk(lam: float) -> float:  # ∫_λ^1 (1 - s)^3 ds
        return (1 - lam) ** 4 / 4

    failures, chosen = 0, []
    for _ in range(draws):
        score = rng.random(n)
        wrong = rng.random(n) < (1 - score) ** 3
        result = learn_then_test(
            lambda lam, s=score, w=wrong: (int((w & (s >= lam)).sum()), float((s >= lam).mean())),
            n,
            tolerance,
            delta,
            grid,
        )
        lam = 1.0 if result.parameter is None else result.parameter
        chosen.append(lam)
        failures += true_risk(lam) > tolerance
    assert failures / draws <= delta + 3 * math.sqrt(delta * (1 - delta) / draws)
    # and it is not vacuous: it exits a real share of samples, close to the best certifiable λ
    best = min(lam for lam in grid if true_risk(lam) <= tolerance)
    assert np.median(chosen) < 0.7 and np.median(chosen) >= best


def test_learn_then_test_refuses_bad_promises():
    with pytest.raises(ValueError, match="tolerance must be in"):
        learn_then_test(lambda lam: (0, 0.0), 10, 0.0, 0.1)
    with pytest.raises(ValueError, match="delta must be in"):
        learn_then_test(lambda lam: (0, 0.0), 10, 0.01, 1.0)
    with pytest.raises(ValueError, match="at least one calibration sample"):
        learn_then_test(lambda lam: (0, 0.0), 0, 0.01, 0.1)
    never = learn_then_test(lambda lam: (10, 1.0), 10, 0.01, 0.1, [0.9, 0.5])
    assert never.parameter is None and never.tested == 1


def test_calibration_records_needed_is_the_smallest_size_that_certifies():
    """230 records for a 1% promise at delta 0.1 (with no disagreement), 667 for a rule that realizes half of it; one
    record fewer does not certify, and the size grows as the promise tightens."""
    from dyvte.exits.risk import calibration_records_needed, promise_text

    assert calibration_records_needed(0.01, 0.1) == 230
    assert binomial_cdf(0, 230, 0.01) <= 0.1 < binomial_cdf(0, 229, 0.01)
    half = calibration_records_needed(0.01, 0.1, 0.005)
    assert half == 667
    assert binomial_cdf(3, 667, 0.01) <= 0.1 < binomial_cdf(3, 666, 0.01)  # floor(0.005 n) = 3 at both sizes
    assert calibration_records_needed(0.005, 0.1) > 230 > calibration_records_needed(0.02, 0.1)
    with pytest.raises(ValueError, match="realized"):
        calibration_records_needed(0.01, 0.1, 0.01)
    text = promise_text(0.01, 0.1, 13000)
    assert "at most 1% of answers differ" in text and "13,000 calibration records" in text
    assert "in about 1 run in 10 the realized share may exceed 1%" in text
