"""Learn-then-Test (dyvte.exits.risk): the binomial tail is exact, and the chosen rule keeps its promise (its true
risk exceeds the tolerance in at most a δ share of calibration draws) without being vacuous; bad promises are refused.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from dyvte.exits.risk import binomial_cdf, calibration_records_needed, learn_then_test, promise_text, small_groups


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


def test_group_rule_blocks_a_lambda_the_pooled_rule_accepts():
    """Two groups of 1,000: at λ = 1 no disagreement, at λ = 2 all 12 disagreements fall in group b. Pooled, 12 of
    2,000 (0.6%) certifies 1% at δ = 0.1; per group, 12 of b's 1,000 does not, so only λ = 1 is kept."""
    tolerance, delta = 0.01, 0.1
    counts = {1.0: np.array([0, 0]), 2.0: np.array([0, 12])}
    pooled = learn_then_test(lambda lam: (int(counts[lam].sum()), lam / 2), 2000, tolerance, delta, [1.0, 2.0])
    assert pooled.parameter == 2.0 and pooled.errors == 12 and pooled.level == delta
    grouped = learn_then_test(
        lambda lam: (counts[lam], lam / 2), 2000, tolerance, delta, [1.0, 2.0], groups={"a": 1000, "b": 1000}
    )
    assert grouped.parameter == 1.0 and grouped.tested == 2
    assert binomial_cdf(12, 1000, tolerance) > delta / 2  # why group b fails
    assert grouped.groups == {
        "a": {"samples": 1000, "errors": 0, "p_value": pytest.approx(0.99**1000)},
        "b": {"samples": 1000, "errors": 0, "p_value": pytest.approx(0.99**1000)},
    }
    assert grouped.as_dict()["groups"]["b"]["samples"] == 1000


def test_group_rule_tests_each_group_at_delta_over_g():
    """A p-value between δ/G and δ in one group: accepted by one group at δ, refused among G = 4 groups at δ/4."""
    tolerance, delta, n = 0.01, 0.2, 500
    errors = next(k for k in range(n) if delta / 4 < binomial_cdf(k, n, tolerance) <= delta)
    alone = learn_then_test(lambda lam: (np.array([errors]), 0.5), n, tolerance, delta, [0.5], groups={"x": n})
    assert alone.parameter == 0.5 and alone.level == delta
    four = learn_then_test(
        lambda lam: (np.array([errors, 0, 0, 0]), 0.5),
        4 * n,
        tolerance,
        delta,
        [0.5],
        groups={"w": n, "x": n, "y": n, "z": n},
    )
    assert four.parameter is None and four.level == pytest.approx(delta / 4)
    with pytest.raises(ValueError, match="summing to"):
        learn_then_test(lambda lam: (np.array([0]), 0.5), 10, tolerance, delta, [0.5], groups={"x": 9})
    with pytest.raises(ValueError, match="group counts"):
        learn_then_test(lambda lam: (np.array([0, 0]), 0.5), 10, tolerance, delta, [0.5], groups={"x": 10})


def test_margin_certifies_a_smaller_rate():
    """6 disagreements in 2,000 (0.3%) certify 1% at margin 0 but not 0.5% (margin 0.5): the margin refuses it."""
    tolerance, delta = 0.01, 0.1
    assert binomial_cdf(6, 2000, tolerance) <= delta < binomial_cdf(6, 2000, tolerance * 0.5)
    plain = learn_then_test(lambda lam: (6, 0.4), 2000, tolerance, delta, [0.5])
    assert plain.parameter == 0.5 and plain.certified_at == tolerance
    cushioned = learn_then_test(lambda lam: (6, 0.4), 2000, tolerance, delta, [0.5], margin=0.5)
    assert cushioned.parameter is None and cushioned.tolerance == tolerance
    assert cushioned.as_dict()["certified_at"] == pytest.approx(0.005) and cushioned.margin == 0.5
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"margin must be in \[0, 1\)"):
            learn_then_test(lambda lam: (0, 0.0), 100, tolerance, delta, [0.5], margin=bad)


def test_small_groups_and_promise_text_name_what_is_covered():
    """A group below calibration_records_needed(ε(1-m), δ/G) is named; the promise states groups, δ/G, margin."""
    needed = calibration_records_needed(0.01 * 0.75, 0.1 / 2)
    assert small_groups({"a": needed, "b": needed - 1}, 0.01, 0.1, margin=0.25) == {"b": needed}
    assert small_groups({"a": needed}, 0.01, 0.1, margin=0.25) == {}
    text = promise_text(0.01, 0.1, 2000, margin=0.25, groups={"cell": 1200, "count": 800})
    assert "in each of the 2 groups by qtype" in text and "cell 1,200" in text and "delta / 2 = 0.05" in text
    assert "certified 0.75%" in text and "margin 0.25" in text and "exchangeable" in text
    pooled = promise_text(0.01, 0.1, 2000)
    assert "2,000 calibration records" in pooled and "margin" not in pooled
