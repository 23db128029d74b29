"""When a run's wall-clock timings are noise: the full model timed twice, and the machine's load around the run.

``train/evaluate.py`` (like ``train/report.py``) times the full model first and again after every other method. The two
passes bracket the sweep: if they differ by more than :data:`MAX_DRIFT` of their mean, the machine's speed changed
during the run (another job, thermal throttling, a frequency governor), and a method's time cannot be told from the
drift. A 1-minute load average above the number of usable cores at the start or at the end means the timed process
shared its cores. Either marks the timing columns unreliable; accuracy, agreement and FLOPs are unaffected.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["MAX_DRIFT", "TimingCheck", "check_timings", "machine_load", "usable_cores"]

#: the largest relative gap between the two full-model passes, ``|again - first| / mean``, still called reliable
MAX_DRIFT = 0.10


@dataclass(frozen=True)
class TimingCheck:
    """Whether the timings of one run can be trusted, and why not.

    Attributes:
        reliable: no reason below.
        reasons: one sentence per reason the timings are noise (empty when reliable).
        drift: ``|again - first| / mean(first, again)`` of the full model's prefill ms per sample.
        max_drift: the drift allowed.
        load_start / load_end: 1-minute load averages at the start and end of the run (``None``: not measured).
        cores: the cores the load is compared with.
    """

    reliable: bool
    reasons: list[str] = field(default_factory=list)
    drift: float = 0.0
    max_drift: float = MAX_DRIFT
    load_start: float | None = None
    load_end: float | None = None
    cores: int | None = None

    def record(self) -> dict[str, Any]:
        """A JSON-ready dict (``results.json``'s ``"timing"`` entry)."""
        return asdict(self)

    def mark(self) -> str:
        """The marker appended to timing column headers: ``""`` when reliable."""
        return "" if self.reliable else " (unreliable)"


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite time > 0, got {value!r}")
    return float(value)


def _load(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite load average >= 0 or None, got {value!r}")
    return float(value)


def check_timings(
    first_ms: float,
    again_ms: float,
    load_start: float | None = None,
    load_end: float | None = None,
    cores: int | None = None,
    max_drift: float = MAX_DRIFT,
) -> TimingCheck:
    """Whether a run's timings are reliable, from its two full-model timings and the machine's load.

    Args:
        first_ms: the full model's time (e.g. prefill ms per sample) timed first.
        again_ms: the same, timed again after every other method.
        load_start / load_end: the 1-minute load average at the start and end of the run (:func:`machine_load`).
        cores: the number of cores the run may use (:func:`usable_cores`); needed when a load is given.
        max_drift: the largest ``|again - first| / mean(first, again)`` still reliable, in ``[0, 2)``.

    Returns:
        The :class:`TimingCheck`.

    Raises:
        ValueError: a time that is not finite and > 0, a negative or non-finite load, a load without ``cores``,
            ``cores`` < 1 or ``max_drift`` outside ``[0, 2)``.
    """
    first, again = _positive("first_ms", first_ms), _positive("again_ms", again_ms)
    start, end = _load("load_start", load_start), _load("load_end", load_end)
    if isinstance(max_drift, bool) or not isinstance(max_drift, (int, float)) or not 0 <= max_drift < 2:
        raise ValueError(f"max_drift must be in [0, 2) (a fraction of the mean time), got {max_drift!r}")
    if cores is not None and (isinstance(cores, bool) or not isinstance(cores, int) or cores < 1):
        raise ValueError(f"cores must be an int >= 1 or None, got {cores!r}")
    if cores is None and (start is not None or end is not None):
        raise ValueError("a load average needs cores to compare it with")
    drift = abs(again - first) / ((first + again) / 2)
    reasons = []
    if drift > max_drift:
        reasons.append(
            f"the full model took {first:.3g} ms then {again:.3g} ms: a drift of {drift:.1%} over the run, more "
            f"than {max_drift:.0%}"
        )
    for when, load in (("start", start), ("end", end)):
        if load is not None and load > cores:
            reasons.append(f"the 1-minute load average was {load:.2f} at the {when}, more than the {cores} cores")
    return TimingCheck(not reasons, reasons, drift, float(max_drift), start, end, cores)


def machine_load() -> float | None:
    """The 1-minute load average (``None`` where the OS has none, e.g. Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one, else every core)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
