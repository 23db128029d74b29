"""The shift check at use time (issue 31): the calibration reference, the two-sample test, the monitor, and the
committed demo heads' reference on the demo label caches (skipped where those caches are absent)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dyvte.policies.exit_heads import ExitHeads, ExitHeadsConfig, first_exit, head_inputs
from dyvte.policies.shift import (
    DEFAULT_ALPHA,
    MEANING_SHIFTED,
    ScoreMonitor,
    kolmogorov_sf,
    ks_statistic,
    reached,
    reference_from_features,
    score_reference,
    shift_report,
)

from ..demo_models import DEMO_HEADS

#: the demo's label caches as `python train/ablate_heads.py` writes them (about 10 min of labelling); the tests that
#: read them skip where they have not been built (a fresh clone)
LABELS = Path(__file__).resolve().parents[2] / "runs" / "ablate-heads" / "labels"
DRAW = 200  # rows per simulated use-time window


# ------------------------------------------------------------------------------------------------ pure parts
def test_reached_is_what_first_exit_leaves_in():
    """A record reaches head j exactly when its first exit is after head j (the engine's rule)."""
    torch.manual_seed(0)
    logits = torch.randn(500, 6) * 2
    thresholds = torch.tensor([1.5, 1.0, math.inf, 0.5, 2.0, 0.0])
    reach = reached(logits, thresholds)
    exits = first_exit(logits, thresholds)  # K = j + 1 of the first head that fires
    assert torch.equal(reach, exits[:, None] > torch.arange(6)[None])


def test_score_reference_summarizes_the_records_that_reach_each_head():
    torch.manual_seed(1)
    logits = torch.randn(1000, 4)
    thresholds = torch.tensor([1.0, 0.5, 0.0, -math.inf])
    ref = score_reference(logits, thresholds, num_quantiles=16)
    reach = reached(logits, thresholds)
    assert ref["n"] == reach.sum(0).tolist() and ref["n"][0] == 1000
    for j, quantiles in enumerate(ref["quantiles"]):
        values = logits[:, j][reach[:, j]]
        assert len(quantiles) == 16 and quantiles == sorted(quantiles)
        assert quantiles[0] == pytest.approx(float(values.min())) and quantiles[-1] == pytest.approx(
            float(values.max())
        )
    none_reach = score_reference(torch.full((10, 2), 5.0), torch.tensor([0.0, 0.0]))
    assert none_reach["n"] == [10, 0] and none_reach["quantiles"][1] is None


def test_ks_statistic_and_p_value_match_scipy():
    """Against a uniform reference (its quantiles define the CDF exactly) the statistic is the one-sample KS
    distance, and the tail is the Kolmogorov distribution's."""
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for size in (25, 200, 1000):
        sample = rng.beta(1.3, 1.0, size)
        expected = stats.kstest(sample, "uniform").statistic
        assert ks_statistic(sample, np.linspace(0, 1, 64)) == pytest.approx(expected, abs=1e-12)
    for x in (0.05, 0.3, 0.7, 0.99, 1.0, 1.36, 1.63, 2.5, 5.0):
        assert kolmogorov_sf(x) == pytest.approx(stats.kstwobign.sf(x), abs=1e-10)


def test_report_is_bonferroni_over_the_tested_heads():
    """A head with too few rows is not tested; `shifted` follows min p < alpha / tested; the meaning is stated."""
    rng = np.random.default_rng(2)
    reference = score_reference(torch.as_tensor(rng.normal(size=(20000, 3))), torch.full((3,), math.inf))
    quiet = shift_report([rng.normal(size=300), rng.normal(size=300), rng.normal(size=5)], reference)
    assert quiet.tested == 2 and quiet.heads[2].p_value is None and not quiet.shifted
    moved = shift_report([rng.normal(size=300), rng.normal(0.5, 1, size=300), rng.normal(size=5)], reference)
    assert moved.shifted and moved.meaning == MEANING_SHIFTED and moved.alpha == DEFAULT_ALPHA
    assert min(h.p_value for h in moved.heads if h.p_value is not None) < DEFAULT_ALPHA / 2
    assert json.loads(json.dumps(moved.to_dict()))["shifted"] is True


def test_monitor_keeps_the_reached_rows_of_the_latest_window():
    monitor = ScoreMonitor(2, None, window=10)
    for step in range(5):
        logits = torch.arange(4, dtype=torch.float32) + 10 * step
        monitor.record(0, logits, torch.ones(4, dtype=torch.bool))
        monitor.record(1, logits, torch.tensor([True, False, True, False]))
    head0, head1 = monitor.scores()  # the 10 latest rows offered; of them, head 1 keeps those that reached it
    assert head0.tolist() == [22, 23, 30, 31, 32, 33, 40, 41, 42, 43]
    assert head1.tolist() == [20, 22, 30, 32, 40, 42]
    monitor.record(0, torch.tensor([50.0]), torch.tensor([True]))
    assert monitor.scores()[0].tolist() == [23, 30, 31, 32, 33, 40, 41, 42, 43, 50]
    with pytest.raises(ValueError, match="no score_reference"):
        monitor.report()


def test_config_refuses_a_malformed_reference():
    base = {"model_type": "llava", "hidden_size": 8, "num_layers": 3}
    good = {"num_quantiles": 2, "n": [3, 0], "quantiles": [[0.0, 1.0], None]}
    assert ExitHeadsConfig(**base, score_reference=good).score_reference == good
    for bad in ({"num_quantiles": 2, "n": [3], "quantiles": [[0.0, 1.0]]}, {**good, "quantiles": [[1.0, 0.0], None]}):
        with pytest.raises(ValueError, match="score_reference"):
            ExitHeadsConfig(**base, score_reference=bad)


# ---------------------------------------------------------------------------------- the committed demo heads
def _cache(name: str):
    path = LABELS / name
    if not path.is_dir():
        pytest.skip(f"no demo label cache at {path} (python train/ablate_heads.py builds it)")
    datasets = pytest.importorskip("datasets")

    return datasets.load_from_disk(str(path)).with_format("numpy")[:]


@pytest.fixture(scope="module")
def demo_heads() -> ExitHeads:
    return ExitHeads.from_pretrained(DEMO_HEADS)


def _scored(heads: ExitHeads, columns) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        logits = heads(head_inputs(columns, None))
    return logits.numpy(), reached(logits, heads.exit_logits()).numpy()


def _per_head(logits: np.ndarray, reach: np.ndarray, rows: np.ndarray) -> list[np.ndarray]:
    return [logits[rows, j][reach[rows, j]] for j in range(logits.shape[1])]


def test_committed_reference_is_the_calibration_records(demo_heads):
    """The saved reference is recomputed, to float32, from the calibration cache (validation 2000..14999)."""
    columns = _cache("calib-validation-2000-15000")
    assert demo_heads.config.calibration["samples"] == len(columns["match"])
    recomputed = reference_from_features(demo_heads, head_inputs(columns, None))
    saved = demo_heads.config.score_reference
    assert recomputed["n"] == saved["n"] and saved["n"][0] == len(columns["match"])
    np.testing.assert_allclose(
        np.array(recomputed["quantiles"], dtype=float), np.array(saved["quantiles"], dtype=float), rtol=0, atol=1e-5
    )


def test_validation_records_stay_quiet(demo_heads):
    """(a) 2000 validation records (never calibrated on) look like the calibration records."""
    logits, reach = _scored(demo_heads, _cache("val-validation-0-2000"))
    report = shift_report(_per_head(logits, reach, np.arange(len(logits))), demo_heads.config.score_reference)
    assert report.tested == demo_heads.num_heads and report.n == len(logits)
    assert not report.shifted, report.summary()


def test_false_alarm_rate_on_calibration_like_draws(demo_heads):
    """(b) Draws of 200 calibration records: the rate of `shifted` is at most alpha plus three binomial standard
    errors of the simulated rate."""
    logits, reach = _scored(demo_heads, _cache("calib-validation-2000-15000"))
    rng = np.random.default_rng(0)
    draws = 400
    alarms = [
        shift_report(
            _per_head(logits, reach, rng.choice(len(logits), DRAW, replace=False)), demo_heads.config.score_reference
        ).shifted
        for _ in range(draws)
    ]
    slack = 3 * math.sqrt(DEFAULT_ALPHA * (1 - DEFAULT_ALPHA) / draws)
    assert np.mean(alarms) <= DEFAULT_ALPHA + slack


def test_exists_questions_alone_fire(demo_heads):
    """(c) A shifted use: only `exists` questions (one of five question types). Detection at n = 200 is measured
    at 100% over 200 draws; the test asks for >= 90%."""
    columns = _cache("val-validation-0-2000")
    logits, reach = _scored(demo_heads, columns)
    exists = np.flatnonzero(np.asarray(columns["qtype"]) == "exists")
    rng = np.random.default_rng(1)
    fired = [
        shift_report(
            _per_head(logits, reach, rng.choice(exists, DRAW, replace=len(exists) < DRAW)),
            demo_heads.config.score_reference,
        ).shifted
        for _ in range(50)
    ]
    assert np.mean(fired) >= 0.9


def test_evaluate_warns_when_shifted(caplog):
    """`dyvte evaluate` logs a warning naming the head and the meaning when a result's shift check fired."""
    pytest.importorskip("jsonargparse")  # the evaluate command's extra
    from dyvte.cli.evaluate import warn_if_shifted
    from dyvte.eval.harness import EvalResult

    rng = np.random.default_rng(3)
    reference = score_reference(torch.as_tensor(rng.normal(size=(5000, 2))), torch.full((2,), math.inf))
    moved = shift_report([rng.normal(1.0, 1, 200), rng.normal(size=200)], reference).to_dict()
    result = EvalResult("heads(x)", {}, [], [], [], [], moved)
    with caplog.at_level("INFO"):
        warn_if_shifted(result)
        warn_if_shifted(EvalResult("full", {}, [], [], []))
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "head 0" in warnings[0].getMessage() and MEANING_SHIFTED in warnings[0].getMessage()


# ------------------------------------------------------------------------------------------------ end to end
def test_demo_model_through_withdraw_and_the_harness_stays_quiet():
    """The demo model on 48 demo validation records, evaluated under the committed heads: the harness reports the
    check over every row (head j saw exactly the rows whose exit is after it), and it stays quiet."""
    pytest.importorskip("torchmetrics")
    import dyvte
    from dyvte.data.sources import load_model, load_records
    from dyvte.eval.methods import Full, PolicyRun

    model, processor = load_model("demo")
    records = load_records("demo", "validation", 48)
    method = PolicyRun("heads", {"heads": ExitHeads.from_pretrained(DEMO_HEADS)})
    full = dyvte.evaluate(model, processor, records, Full(), progress=False, warmup=False, batch_size=16)
    assert full.shift is None
    result = dyvte.evaluate(
        model, processor, records, method, reference=full, progress=False, warmup=False, batch_size=16
    )
    shift = result.shift
    assert shift is not None and not shift["shifted"], shift
    assert [h["n"] for h in shift["heads"]] == [sum(e > j for e in result.exit_layers) for j in range(7)]
    assert shift["heads"][0]["n"] == 48 and shift["tested"] >= 1
