"""The batching worker in process (dyvte/serve/runner.py): a batch runs as one model call per method, and its greedy
answers and exit layers equal each request run alone; a row whose client went away ends while the others go on."""

from __future__ import annotations

import threading

import pytest

from ..tools import require_module

require_module("fastapi", tool="serve", install="pip install -e '.[serve]'")

from dyvte.serve.metrics import Metrics  # noqa: E402
from dyvte.serve.parse import ChatRequest  # noqa: E402
from dyvte.serve.runner import Batcher, Job, ServedModel  # noqa: E402

from .server import NEW_TOKENS, Offline, demo_records  # noqa: E402

LAYER = 3
WAIT_S = 120


@pytest.fixture(scope="module")
def offline():
    return Offline()


@pytest.fixture(scope="module")
def served(offline):
    return ServedModel(offline.model, offline.processor, "demo-mllm", offline.heads, LAYER)


class Collector:
    """A job's events, with a flag once it ended."""

    def __init__(self, on_event=None) -> None:
        self.events: list[dict] = []
        self.ended = threading.Event()
        self.on_event = on_event

    def __call__(self, event: dict) -> None:
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)
        if event["kind"] in ("end", "error"):
            self.ended.set()

    @property
    def text(self) -> str:
        return "".join(e["text"] for e in self.events if e["kind"] == "delta")

    @property
    def end(self) -> dict:
        return next(e for e in self.events if e["kind"] == "end")


def job(record: dict, method: str, collector: Collector) -> Job:
    threshold = float(method.partition(":")[2]) if method.startswith("heads:") else None
    request = ChatRequest(
        record={"image": record["image"], "question": record["question"]},
        method="heads" if threshold is not None else method,
        threshold=threshold,
        max_tokens=NEW_TOKENS,
    )
    return Job(request, collector, prompt_tokens=1)


def test_a_batch_runs_once_per_method_and_equals_each_request_alone(served, offline):
    records = demo_records(10)
    methods = ["heads"] * 6 + ["full", f"static:{LAYER}", "heads:0.6", "heads:0.6"]
    metrics = Metrics()
    batcher = Batcher(served, metrics, max_batch_size=len(records), batch_timeout=5.0)
    collectors = [Collector() for _ in records]
    try:
        for record, method, collector in zip(records, methods, collectors, strict=True):
            batcher.submit(job(record, method, collector))
        for collector in collectors:
            assert collector.ended.wait(WAIT_S), "a job never ended"
    finally:
        batcher.stop()
    assert metrics.batches == 4 and metrics.batch_rows == len(records)  # one call per method, every row in one
    heads_exits = set()
    for record, method, collector in zip(records, methods, collectors, strict=True):
        text, exit_layer = offline.answer(record, method)
        assert collector.events[0]["kind"] == "start"
        assert (collector.text, collector.end["dyvte"]["exit_layer"]) == (text, exit_layer), method
        assert collector.end["dyvte"] == collector.events[0]["dyvte"]
        if method == "heads":
            heads_exits.add(exit_layer)
            probabilities = collector.end["dyvte"]["exit_probabilities"]
            reached = [p for p in probabilities if p is not None]
            assert len(reached) == min(exit_layer, len(probabilities))  # the heads the row reached
        else:
            assert (collector.end["dyvte"]["exit_probabilities"] is None) == (not method.startswith("heads"))
    assert len(heads_exits) > 1, heads_exits  # the heads batch mixes exit layers (grouped execution)


def test_a_row_whose_client_went_away_ends_and_the_others_go_on(served, offline):
    records = demo_records(3)
    metrics = Metrics()
    batcher = Batcher(served, metrics, max_batch_size=3, batch_timeout=5.0)
    jobs: list[Job] = []

    def leave(event: dict) -> None:  # the client of row 0 goes away once its stream started (after the prefill)
        if event["kind"] == "start":
            jobs[0].cancelled.set()

    collectors = [Collector(leave), Collector(), Collector()]
    jobs.extend(job(record, "heads", c) for record, c in zip(records, collectors, strict=True))
    try:
        for item in jobs:
            batcher.submit(item)
        for collector in collectors[1:]:
            assert collector.ended.wait(WAIT_S)
    finally:
        batcher.stop()
    assert [e["kind"] for e in collectors[0].events] == ["start"]  # nothing after it left
    assert metrics.cancelled == 1 and metrics.batches == 1
    for record, collector in zip(records[1:], collectors[1:], strict=True):
        assert (collector.text, collector.end["dyvte"]["exit_layer"]) == offline.answer(record, "heads")
