"""The server's counters in the Prometheus text format (``GET /metrics``), and the exit heads' shift check.

Counters: requests by method, errors by type, prompt and completion tokens, rows by exit layer, prefill FLOPs
(spent and saved against the full model), batches and their rows. Gauges: requests in flight, and per exit head
the shift check of :meth:`dyvte.policies.learned.LearnedExit.shift_report` over the requests served so far (its KS
statistic, p-value, the rows it saw, and whether the heads' scores have drifted from the calibration records').
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

__all__ = ["Metrics"]

PREFIX = "dyvte"


def _escape(value: Any) -> str:
    """A label value in the text format: backslash, quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: Any) -> str:
    inner = ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items())
    return "{" + inner + "}" if inner else ""


class Metrics:
    """Thread-safe counters (the worker and the HTTP handlers write, ``/metrics`` reads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()  # method -> answered requests
        self.errors: Counter[str] = Counter()  # error type -> refused or failed requests
        self.exits: Counter[int] = Counter()  # exit layer -> rows
        self.prompt_tokens = self.completion_tokens = 0
        self.flops = self.flops_saved = 0.0
        self.batches = self.batch_rows = 0
        self.in_flight = 0
        self.cancelled = 0  # rows whose client went away before their answer ended

    def error(self, kind: str) -> None:
        """Count a refused (4xx, by its code) or failed (5xx, by exception name) request."""
        with self._lock:
            self.errors[kind] += 1

    def row(self, job: Any, block: dict[str, Any], completion_tokens: int) -> None:
        """Count one answered row: its method, tokens, exit layer and prefill FLOPs."""
        withdrawn, full = block["_flops"]
        with self._lock:
            self.requests[block["method"]] += 1
            self.prompt_tokens += job.prompt_tokens
            self.completion_tokens += completion_tokens
            self.exits[block["exit_layer"]] += 1
            self.flops += withdrawn
            self.flops_saved += full - withdrawn

    def cancel(self, rows: int = 1) -> None:
        """Count rows ended (or never run) because their client went away."""
        with self._lock:
            self.cancelled += rows

    def batch(self, rows: int) -> None:
        """Count one model call of ``rows`` rows."""
        with self._lock:
            self.batches += 1
            self.batch_rows += rows

    def enter(self, delta: int) -> None:
        """A request starts (+1) or ends (-1)."""
        with self._lock:
            self.in_flight += delta

    def render(self, shift_report: Callable[[], Any] | None = None) -> str:
        """The Prometheus text exposition (format 0.0.4)."""
        lines: list[str] = []

        def family(name: str, kind: str, text: str, samples: list[tuple[dict[str, Any], float]]) -> None:
            lines.append(f"# HELP {PREFIX}_{name} {text}")
            lines.append(f"# TYPE {PREFIX}_{name} {kind}")
            for labels, value in samples:
                lines.append(f"{PREFIX}_{name}{_labels(**labels)} {value:.17g}")

        with self._lock:
            family(
                "requests_total",
                "counter",
                "answered requests",
                [({"method": m}, n) for m, n in sorted(self.requests.items())],
            )
            family(
                "request_errors_total",
                "counter",
                "refused (4xx) or failed (5xx) requests, by type",
                [({"type": t}, n) for t, n in sorted(self.errors.items())],
            )
            family("prompt_tokens_total", "counter", "prompt tokens of answered requests", [({}, self.prompt_tokens)])
            family("completion_tokens_total", "counter", "tokens generated", [({}, self.completion_tokens)])
            family(
                "exits_total",
                "counter",
                "answered rows by the layer their visual tokens left at (L: never)",
                [({"layer": k}, n) for k, n in sorted(self.exits.items())],
            )
            family(
                "prefill_flops_total",
                "counter",
                "prefill FLOPs of the text decoder spent (analytic)",
                [({}, self.flops)],
            )
            family(
                "prefill_flops_saved_total",
                "counter",
                "prefill FLOPs saved against the full model (analytic)",
                [({}, self.flops_saved)],
            )
            family("batches_total", "counter", "model calls", [({}, self.batches)])
            family("batch_rows_total", "counter", "rows of the model calls", [({}, self.batch_rows)])
            family("requests_cancelled_total", "counter", "rows whose client went away", [({}, self.cancelled)])
            family("requests_in_flight", "gauge", "requests being answered", [({}, self.in_flight)])
        report = shift_report() if shift_report is not None else None
        if report is not None:
            heads = report.heads
            family(
                "exit_head_shift_rows",
                "gauge",
                "rows that reached each exit head",
                [({"head": h.head}, h.n) for h in heads],
            )
            tested = [h for h in heads if h.statistic is not None]
            family(
                "exit_head_shift_statistic",
                "gauge",
                "KS distance of each head's scores to its calibration records'",
                [({"head": h.head}, h.statistic) for h in tested],
            )
            family(
                "exit_head_shift_p_value",
                "gauge",
                "its two-sample p-value (unadjusted)",
                [({"head": h.head}, h.p_value) for h in tested],
            )
            bound = report.alpha / max(report.tested, 1)
            family(
                "exit_head_shift_drift",
                "gauge",
                "1 where the head's p-value is below alpha / tested heads",
                [({"head": h.head}, float(h.p_value < bound)) for h in tested],
            )
            family(
                "exit_heads_shifted",
                "gauge",
                "1 when some head drifted (the calibrated promise may not hold)",
                [({"alpha": report.alpha}, float(report.shifted))],
            )
        return "\n".join(lines) + "\n"
