"""dyvte.eval.timing: when a run's timings are noise, on fabricated timings and loads (the logic is pure)."""

from __future__ import annotations

import json
import math

import pytest

from dyvte.eval.harness import EvalResult, format_table
from dyvte.eval.timing import MAX_DRIFT, check_timings, machine_load, usable_cores


def test_steady_timings_on_an_idle_machine_are_reliable():
    check = check_timings(10.0, 10.5, load_start=0.3, load_end=1.9, cores=2)
    assert check.reliable and check.reasons == [] and check.mark() == ""
    assert check.drift == pytest.approx(0.5 / 10.25)
    assert json.loads(json.dumps(check.record())) == {
        "reliable": True,
        "reasons": [],
        "drift": pytest.approx(0.5 / 10.25),
        "max_drift": MAX_DRIFT,
        "load_start": 0.3,
        "load_end": 1.9,
        "cores": 2,
    }


@pytest.mark.parametrize(("first", "again"), [(10.0, 11.6), (11.6, 10.0), (1.0, 3.0)])
def test_a_drift_beyond_the_limit_marks_the_timings(first, again):
    check = check_timings(first, again)
    assert not check.reliable and check.mark() == " (unreliable)"
    assert len(check.reasons) == 1 and "drift" in check.reasons[0] and "more than 10%" in check.reasons[0]


def test_the_drift_limit_is_inclusive_and_configurable():
    # 10 -> 11: |1| / 10.5 = 9.5% (reliable at 10%, not at 5%)
    assert check_timings(10.0, 11.0).reliable
    assert not check_timings(10.0, 11.0, max_drift=0.05).reliable
    assert check_timings(4.0, 4.0, max_drift=0.0).reliable  # no drift at all meets a zero limit


@pytest.mark.parametrize(
    ("start", "end", "whens"), [(2.5, 1.0, ["start"]), (0.5, 2.01, ["end"]), (3.0, 4.0, ["start", "end"])]
)
def test_a_load_above_the_cores_at_the_start_or_end_marks_the_timings(start, end, whens):
    check = check_timings(10.0, 10.0, load_start=start, load_end=end, cores=2)
    assert not check.reliable
    assert [r.split(" at the ")[1].split(",")[0] for r in check.reasons] == whens
    assert all("more than the 2 cores" in r for r in check.reasons)


def test_every_reason_is_given_together():
    check = check_timings(10.0, 20.0, load_start=9.0, load_end=None, cores=4)
    assert len(check.reasons) == 2 and check.load_end is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"first_ms": 0.0}, r"first_ms must be a finite time > 0, got 0.0"),
        ({"again_ms": math.nan}, r"again_ms must be a finite time > 0"),
        ({"again_ms": -1.0}, r"again_ms must be a finite time > 0"),
        ({"load_start": -0.1, "cores": 2}, r"load_start must be a finite load average >= 0"),
        ({"load_end": math.inf, "cores": 2}, r"load_end must be a finite load average"),
        ({"load_start": 1.0}, r"a load average needs cores"),
        ({"cores": 0}, r"cores must be an int >= 1"),
        ({"max_drift": 2.0}, r"max_drift must be in \[0, 2\)"),
        ({"max_drift": True}, r"max_drift must be in"),
    ],
)
def test_bad_inputs_are_refused(kwargs, match):
    args = {"first_ms": 1.0, "again_ms": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        check_timings(**args)


def test_the_machine_readings_are_what_the_check_takes():
    load = machine_load()
    assert load is None or load >= 0
    assert usable_cores() >= 1
    check_timings(1.0, 1.0, load, load, usable_cores())


def test_the_table_marks_its_timing_columns():
    metrics = {
        "all": {
            "accuracy": 1.0,
            "agreement": 1.0,
            "exit_mean": 4.0,
            "exit_p10": 4.0,
            "exit_p50": 4.0,
            "exit_p90": 4.0,
            "relative_flops": 1.0,
            "prefill_ms": 2.0,
            "total_ms": 3.0,
        }
    }
    result = EvalResult("full", metrics, ["a"], [4], [1.0], ["all"])
    header = format_table([result], unreliable=True).splitlines()[0]
    assert "prefill ms/sample (unreliable)" in header and "total ms/sample (unreliable)" in header
    assert "unreliable" not in format_table([result])
