"""A shift check at use time (issue 31): do the exit heads' scores still look like the calibration records'?

The thresholds of :class:`dyvte.policies.exit_heads.ExitHeads` are certified on calibration records (Learn-then-Test):
the promise "disagreement <= ε with probability >= 1 - δ" holds for new records drawn like them. What can be checked
cheaply at use time is whether the heads' logits still look like they did on the calibration records.

* At fit time, :func:`score_reference` summarizes the calibration records' logits of each head ``j`` over the records
  that reach it (no earlier head fired at the certified thresholds; every record reaches head 0): ``NUM_QUANTILES``
  quantiles and the count, saved in ``ExitHeadsConfig.score_reference``.
* At use time, :class:`ScoreMonitor` collects the logits of the rows that reach each head (device tensors, moved to
  the host only when read: no host sync in the forward), the most recent ``window`` rows per head.
* :func:`shift_report` (pure, on arrays) compares each head's scores with its reference by a two-sample
  Kolmogorov–Smirnov statistic, the reference CDF read off the quantile summary (piecewise linear between the
  quantiles), with the asymptotic p-value at the effective size ``n m / (n + m)``; Bonferroni over the heads tested
  (those that saw at least ``min_samples`` rows); ``shifted`` when some head's p-value is below ``alpha / tested``.
  Under no shift, ``shifted`` is a false alarm with probability about ``alpha`` or less.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

__all__ = [
    "DEFAULT_ALPHA",
    "MEANING_QUIET",
    "MEANING_SHIFTED",
    "NUM_QUANTILES",
    "HeadShift",
    "ScoreMonitor",
    "ShiftReport",
    "check_reference",
    "kolmogorov_sf",
    "ks_statistic",
    "reached",
    "reference_from_features",
    "score_reference",
    "shift_report",
]

logger = logging.getLogger(__name__)

NUM_QUANTILES = 64
DEFAULT_ALPHA = 0.01
#: heads that saw fewer rows are not tested (the asymptotic p-value needs some rows)
MIN_SAMPLES = 20
#: rows per head a monitor keeps by default (the most recent)
DEFAULT_WINDOW = 4096
MEANING_SHIFTED = (
    "the scores no longer look like the calibration records': the <= ε promise may not hold; recalibrate on data "
    "like this"
)
MEANING_QUIET = (
    "the scores look like the calibration records' (no head's test rejects at the stated false-alarm rate); this "
    "cannot prove the <= ε promise holds, only that no shift was seen in the heads' scores"
)


# ---------------------------------------------------------------------------------------------------- reference
def reached(logits: torch.Tensor, threshold_logits: torch.Tensor) -> torch.Tensor:
    """``(N, H)`` bool: record ``i`` reaches head ``j`` (no head before ``j`` fires on it at ``threshold_logits``).

    Args:
        logits: ``(N, H)`` exit logits of each head.
        threshold_logits: ``(H,)`` logit thresholds (``+inf``: never fires), as
            :meth:`dyvte.policies.exit_heads.ExitHeads.exit_logits`.
    """
    fires = logits.float() >= threshold_logits.to(logits.device).float()[None]
    before = fires.long().cumsum(1)[:, :-1]  # (N, H-1) heads that fired before head j (j >= 1)
    first = torch.ones_like(fires[:, :1])
    return torch.cat([first, before == 0], dim=1)


def score_reference(logits: torch.Tensor, threshold_logits: torch.Tensor, num_quantiles: int = NUM_QUANTILES) -> dict:
    """The calibration distribution of each head's logits, over the records that reach it.

    Args:
        logits: ``(N, H)`` the calibration records' exit logits.
        threshold_logits: ``(H,)`` the certified logit thresholds.
        num_quantiles: quantiles per head, at probabilities ``0, 1/(Q-1), ..., 1`` (min and max included).

    Returns:
        ``{"num_quantiles": Q, "n": [n_j], "quantiles": [[Q float32 values] or None (no record reaches head j)]}``.
    """
    if num_quantiles < 2:
        raise ValueError(f"num_quantiles must be >= 2, got {num_quantiles}")
    reach = reached(logits, threshold_logits)
    probs = torch.linspace(0.0, 1.0, num_quantiles, dtype=torch.float64)
    counts, quantiles = [], []
    for j in range(logits.shape[1]):
        scores = logits[:, j].double()[reach[:, j]]
        counts.append(int(scores.numel()))
        if scores.numel() == 0:
            quantiles.append(None)
            continue
        values = torch.quantile(scores, probs).float()  # stored as float32 values
        quantiles.append([float(v) for v in values])
    return {"num_quantiles": num_quantiles, "n": counts, "quantiles": quantiles}


@torch.no_grad()
def reference_from_features(heads, features: torch.Tensor, batch_size: int = 4096) -> dict:
    """:func:`score_reference` of ``heads`` (:class:`dyvte.policies.exit_heads.ExitHeads`, at their certified
    thresholds) on ``(N, H, width)`` calibration features."""
    was_training = heads.training
    heads.eval()
    try:
        parts = [heads(features[i : i + batch_size]).float().cpu() for i in range(0, features.shape[0], batch_size)]
    finally:
        heads.train(was_training)
    return score_reference(torch.cat(parts), heads.exit_logits())


def check_reference(reference: object, num_heads: int) -> None:
    """Raise ``ValueError`` unless ``reference`` is a :func:`score_reference` summary for ``num_heads`` heads."""
    if not isinstance(reference, dict) or not {"num_quantiles", "n", "quantiles"} <= set(reference):
        raise ValueError("score_reference must be a dict with num_quantiles, n and quantiles")
    q = reference["num_quantiles"]
    if isinstance(q, bool) or not isinstance(q, int) or q < 2:
        raise ValueError(f"score_reference: num_quantiles must be an int >= 2, got {q!r}")
    counts, quantiles = reference["n"], reference["quantiles"]
    if not isinstance(counts, list) or not isinstance(quantiles, list):
        raise ValueError("score_reference: n and quantiles must be lists")
    if len(counts) != num_heads or len(quantiles) != num_heads:
        raise ValueError(f"score_reference: one entry per head ({num_heads}) expected in n and quantiles")
    for j, (n, values) in enumerate(zip(counts, quantiles, strict=True)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"score_reference: n[{j}] must be an int >= 0, got {n!r}")
        if values is None:
            if n:
                raise ValueError(f"score_reference: head {j} has n = {n} but no quantiles")
            continue
        if len(values) != q or any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
            raise ValueError(f"score_reference: head {j} needs {q} finite quantiles")
        if any(b < a for a, b in zip(values, values[1:], strict=False)):
            raise ValueError(f"score_reference: head {j}'s quantiles are not sorted")


# ---------------------------------------------------------------------------------------------------- the test
def kolmogorov_sf(x: float) -> float:
    """``P(K > x)`` for the Kolmogorov distribution (the limit of ``sqrt(n) D_n``)."""
    if x <= 0.0:
        return 1.0
    if x < 1.0:  # the theta-function form converges fast for small x
        s = sum(math.exp(-((2 * k - 1) ** 2) * math.pi**2 / (8 * x * x)) for k in range(1, 8))
        return min(1.0, max(0.0, 1.0 - math.sqrt(2 * math.pi) / x * s))
    s = sum((-1) ** (k - 1) * math.exp(-2 * k * k * x * x) for k in range(1, 101))
    return min(1.0, max(0.0, 2.0 * s))


def ks_statistic(sample: np.ndarray, quantiles: Sequence[float]) -> float:
    """Kolmogorov–Smirnov distance between the empirical CDF of ``sample`` and the reference CDF read off
    ``quantiles`` (at probabilities ``0 .. 1``, linear between them; 0 below the first, 1 above the last)."""
    x = np.sort(np.asarray(sample, dtype=np.float64).ravel())
    n = x.size
    if n == 0:
        raise ValueError("ks_statistic: empty sample")
    q = np.asarray(quantiles, dtype=np.float64)
    probs = np.linspace(0.0, 1.0, q.size)
    cdf = np.interp(x, q, probs, left=0.0, right=1.0)
    i = np.arange(1, n + 1, dtype=np.float64)
    return float(max(np.max(i / n - cdf), np.max(cdf - (i - 1) / n)))


@dataclass
class HeadShift:
    """One head's test.

    Attributes:
        head: head index ``j`` (its exit layer is ``j + 1``).
        n: rows seen that reached the head.
        n_reference: calibration records that reached it.
        statistic: the KS distance (``None``: not tested, fewer than ``min_samples`` rows or no reference).
        p_value: its asymptotic two-sample p-value (unadjusted; ``None``: not tested).
    """

    head: int
    n: int
    n_reference: int
    statistic: float | None = None
    p_value: float | None = None


@dataclass
class ShiftReport:
    """Whether the heads' scores at use time look like the calibration records' (:func:`shift_report`).

    Attributes:
        heads: one :class:`HeadShift` per head.
        alpha: the stated false-alarm rate: with no shift, ``shifted`` is true with probability about ``alpha`` or
            less (Bonferroni over the tested heads).
        tested: heads tested.
        shifted: some tested head's p-value is below ``alpha / tested``.
        meaning: what it means for the calibrated promise.
    """

    heads: list[HeadShift]
    alpha: float
    tested: int
    shifted: bool
    meaning: str

    @property
    def n(self) -> int:
        """Rows seen (those reaching head 0)."""
        return self.heads[0].n if self.heads else 0

    def to_dict(self) -> dict:
        """JSON-ready."""
        return asdict(self)

    def summary(self) -> str:
        """One line: verdict, the smallest adjusted p-value, the rows seen."""
        ps = [(h.p_value, h.head) for h in self.heads if h.p_value is not None]
        if not ps:
            return f"shift check: nothing tested ({self.n} rows seen; each head needs {MIN_SAMPLES})"
        p, head = min(ps)
        verdict = "SHIFTED" if self.shifted else "no shift seen"
        return (
            f"shift check: {verdict} (smallest Bonferroni p = {min(1.0, p * self.tested):.3g} at head {head}, "
            f"alpha = {self.alpha:g}, {self.tested} heads tested, {self.n} rows): {self.meaning}"
        )


def shift_report(
    scores: Sequence[np.ndarray],
    reference: dict,
    alpha: float = DEFAULT_ALPHA,
    min_samples: int = MIN_SAMPLES,
) -> ShiftReport:
    """Test each head's use-time scores against its calibration reference (see the module docstring).

    Args:
        scores: per head ``j``, the logits of the rows that reached it.
        reference: :func:`score_reference`'s summary (``ExitHeadsConfig.score_reference``).
        alpha: the false-alarm rate, in (0, 1).
        min_samples: heads with fewer rows are not tested.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    check_reference(reference, len(scores))
    heads = []
    for j, sample in enumerate(scores):
        sample = np.asarray(sample, dtype=np.float64).ravel()
        n, m, quantiles = sample.size, reference["n"][j], reference["quantiles"][j]
        row = HeadShift(head=j, n=int(n), n_reference=int(m))
        if n >= min_samples and quantiles is not None and m >= min_samples:
            row.statistic = ks_statistic(sample, quantiles)
            effective = n * m / (n + m)
            root = math.sqrt(effective)
            row.p_value = kolmogorov_sf((root + 0.12 + 0.11 / root) * row.statistic)  # Stephens' correction
        heads.append(row)
    tested = sum(h.p_value is not None for h in heads)
    shifted = tested > 0 and min(h.p_value for h in heads if h.p_value is not None) < alpha / tested
    return ShiftReport(heads, alpha, tested, bool(shifted), MEANING_SHIFTED if shifted else MEANING_QUIET)


# ------------------------------------------------------------------------------------------------- the monitor
class ScoreMonitor:
    """The head scores seen at use time: per head, the logits of the rows that reached it (most recent ``window``).

    :meth:`record` keeps device tensors (no host sync); :meth:`scores` moves them to the host when read.

    Args:
        num_heads: H.
        reference: the heads' ``score_reference`` (``None``: :meth:`report` cannot test).
        window: rows kept per head (the most recent; ``None``: all).
    """

    def __init__(self, num_heads: int, reference: dict | None, window: int | None = DEFAULT_WINDOW) -> None:
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        if reference is not None:
            check_reference(reference, num_heads)
        self.num_heads = num_heads
        self.reference = reference
        self.window = window
        self._pending: list[deque[tuple[torch.Tensor, torch.Tensor]]] = [deque() for _ in range(num_heads)]
        self._pending_rows = [0] * num_heads  # rows offered (reached or not), known from shapes
        self._host: list[np.ndarray] = [np.zeros(0, dtype=np.float32) for _ in range(num_heads)]
        self._lock = threading.RLock()  # threads calling the model under one handle record into one monitor

    def record(self, head: int, logits: torch.Tensor, reach: torch.Tensor) -> None:
        """Keep head ``head``'s ``(B,)`` logits and ``(B,)`` bool mask of the rows that reached it (device; no sync)."""
        with self._lock:
            pending = self._pending[head]
            pending.append((logits.detach().float(), reach))
            self._pending_rows[head] += logits.shape[0]
            if self.window is not None:  # drop whole old entries while the rest still offers window rows
                while len(pending) > 1 and self._pending_rows[head] - pending[0][0].shape[0] >= self.window:
                    self._pending_rows[head] -= pending.popleft()[0].shape[0]
                    self._host[head] = self._host[head][:0]  # older than anything pending

    def scores(self) -> list[np.ndarray]:
        """Per head, the float32 logits of the rows that reached it (host; the pending device tensors are read)."""
        with self._lock:
            for j, pending in enumerate(self._pending):
                parts = [self._host[j]]
                while pending:
                    logits, reach = pending.popleft()
                    parts.append(logits[reach].cpu().numpy().astype(np.float32))
                self._pending_rows[j] = 0
                self._host[j] = self._trim(np.concatenate(parts))
            return [s.copy() for s in self._host]

    def extend(self, other: ScoreMonitor) -> None:
        """Add ``other``'s scores (e.g. one handle's per batch) after this monitor's."""
        if other.num_heads != self.num_heads:
            raise ValueError(f"monitors of {other.num_heads} and {self.num_heads} heads")
        mine = self.scores()
        for j, theirs in enumerate(other.scores()):
            self._host[j] = self._trim(np.concatenate([mine[j], theirs]))

    def _trim(self, values: np.ndarray) -> np.ndarray:
        return values if self.window is None else values[-self.window :]

    def report(self, alpha: float = DEFAULT_ALPHA, min_samples: int = MIN_SAMPLES) -> ShiftReport:
        """:func:`shift_report` of the scores seen so far.

        Raises:
            ValueError: the heads carry no ``score_reference`` (saved before it existed: refit or add it with
                :func:`reference_from_features`).
        """
        if self.reference is None:
            raise ValueError(
                "these exit heads carry no score_reference (the calibration distribution of their scores): "
                "add one with dyvte.policies.shift.reference_from_features on their calibration features"
            )
        return shift_report(self.scores(), self.reference, alpha, min_samples)
