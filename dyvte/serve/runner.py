"""The served model and its batching worker: requests gathered into batches, one model call per batch and method.

A single worker thread (:class:`Batcher`) owns the model: it takes the first waiting request, gathers more for up to
``batch_timeout`` seconds or ``max_batch_size`` requests, splits them into sub-batches by method (and runs each
sampled request alone, so its seed alone decides it), and runs each sub-batch as ONE ``generate`` call under its
withdrawal handle, with per-row exits (grouped execution, docs/design.md §4): a greedy batch's answers equal each
request run alone. A :class:`RowWatch` (a ``StoppingCriteria``, called after every decoding step) streams each row's
text as soon as its tokens exist, ends a row at its own ``max_tokens`` or stop string, and ends the row of a client
that went away while the other rows continue. Nothing here depends on timing but the gathering window.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from dyvte.data.errors import DataError
from dyvte.data.records import build_inputs
from dyvte.engine.registry import resolve
from dyvte.engine.withdrawal import Withdrawal
from dyvte.eval.flops import prefill_flops, prefill_kv_bytes
from dyvte.policies.exit_heads import ExitHeads
from dyvte.policies.learned import LearnedExit
from dyvte.policies.static import StaticExit
from dyvte.serve.errors import RequestError
from dyvte.serve.metrics import Metrics
from dyvte.serve.parse import ChatRequest, Limits

__all__ = ["Batcher", "Job", "RowWatch", "ServedModel"]

logger = logging.getLogger(__name__)

#: one event of a job, from the worker to the HTTP side: ``{"kind": "start" | "delta" | "end" | "error", ...}``
Event = dict[str, Any]


@dataclass
class Job:
    """One request on its way through the worker.

    Attributes:
        request: the checked request.
        emit: thread-safe sink of the job's events (start, deltas, end or error).
        prompt_tokens: the prompt's tokens (checked against the context length before queueing).
        cancelled: set when the client went away: the worker ends the row at its next step.
    """

    request: ChatRequest
    emit: Callable[[Event], None]
    prompt_tokens: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued: float = field(default_factory=time.monotonic)


class ServedModel:
    """A loaded model with the methods the server was started with.

    Args:
        model, processor: the model (eval mode) and its processor.
        model_id: the name clients see (``/v1/models``), the model directory's name.
        heads: exit heads (``heads`` and ``heads:P`` are served), or ``None``.
        layer: the static exit layer K (``static:K`` is served), or ``None``.

    Attributes:
        methods: the served method strings; ``default_method``: a request's when it names none (heads, else
            static:K, else full).
    """

    def __init__(self, model: Any, processor: Any, model_id: str, heads: ExitHeads | None, layer: int | None) -> None:
        self.model, self.processor, self.model_id = model, processor, model_id
        self.spec = resolve(model)
        self.num_layers = self.spec.num_layers
        if layer is not None and not 0 <= layer <= self.num_layers:
            raise ValueError(f"--layer K must be in [0, {self.num_layers}] for this model, got {layer}")
        self.heads, self.layer = heads, layer
        self.methods = ("full",) + ((f"static:{layer}",) if layer is not None else ()) + (("heads",) if heads else ())
        self.default_method = "heads" if heads else (f"static:{layer}" if layer is not None else "full")
        text = getattr(model.config, "text_config", model.config)
        self.max_positions: int | None = getattr(text, "max_position_embeddings", None)
        self.processor_lock = threading.Lock()  # a fast tokenizer refuses concurrent calls ("Already borrowed")
        self._policies: dict[float | None, LearnedExit] = {}
        self._active: tuple[tuple[str, float | None], Withdrawal] | None = None  # the attached handle, by method
        if heads is not None:
            self._policies[None] = LearnedExit(heads)  # its shift monitor sees every default-heads request
            Withdrawal(model, self._policies[None]).remove()  # checks the heads against the model now, not per call

    def limits(self, allow_local_files: bool, max_image_pixels: int) -> Limits:
        """What requests this model takes."""
        return Limits(self.methods, self.default_method, allow_local_files, max_image_pixels, self.max_positions)

    def prompt_tokens(self, request: ChatRequest) -> int:
        """The request's prompt tokens; checks the prompt builds (image count, special text) and fits the model.

        Raises:
            RequestError: the record does not build (the harness's message), or prompt + ``max_tokens`` exceeds
                the model's context length.
        """
        try:
            with self.processor_lock:
                inputs = build_inputs(self.processor, [request.record])
        except DataError as err:
            raise RequestError(f"the prompt cannot be built: {err}", "messages", code="invalid_prompt") from None
        tokens = int(inputs["attention_mask"].sum())
        if self.max_positions is not None and tokens + request.max_tokens > self.max_positions:
            raise RequestError(
                f"the prompt takes {tokens} tokens and max_tokens is {request.max_tokens}: together above this "
                f"model's context length {self.max_positions}; lower max_tokens to at most "
                f"{self.max_positions - tokens}",
                "max_tokens",
                code="invalid_max_tokens",
            )
        return tokens

    def handle(self, method: str, threshold: float | None) -> Withdrawal | None:
        """The withdrawal a sub-batch runs under (``None`` for ``full``: the model unhooked).

        The handle stays attached between batches of the same method (attaching one costs milliseconds: hooks and
        the heads' model check) and is replaced when the method changes; only the worker thread calls this.
        """
        key = (method, threshold)
        if self._active is not None and self._active[0] == key:
            return self._active[1]
        self.release()
        if method == "full":
            return None
        if method.startswith("static:"):
            handle = Withdrawal(self.model, StaticExit(int(method.partition(":")[2])))
        else:
            policy = self._policies.get(threshold)
            if policy is None:
                policy = self._policies[threshold] = LearnedExit(self.heads, threshold, monitor_shift=False)
            handle = Withdrawal(self.model, policy)
        self._active = (key, handle)
        return handle

    def release(self) -> None:
        """Remove the attached withdrawal, if any (the model is as loaded)."""
        if self._active is not None:
            self._active[1].remove()
            self._active = None

    def shift_report(self) -> Any:
        """The default heads' shift check over the requests served (``None`` without heads or a reference)."""
        policy = self._policies.get(None)
        if policy is None or policy.shift_monitor is None:
            return None
        return policy.shift_report()

    def blocks(self, method: str, inputs: dict, handle: Any) -> list[dict[str, Any]]:
        """Each row's ``dyvte`` response block, read after the prefill."""
        mask, ids = inputs["attention_mask"], inputs["input_ids"]
        tokens = mask.sum(1)  # (B,)
        visual = (torch.isin(ids, self.spec.visual_ids.to(ids.device)) & mask.bool()).sum(1)  # (B,)
        exits = handle.exit_layers if handle is not None and handle.exit_layers is not None else None
        exits = torch.full_like(tokens, self.num_layers) if exits is None else exits.to(tokens.device)
        flops = prefill_flops(self.model.config, tokens, visual, exits)
        item = self.model.dtype.itemsize
        kv = prefill_kv_bytes(self.model.config, tokens, visual, exits, bytes_per_value=item)
        kv_full = prefill_kv_bytes(self.model.config, tokens, visual, None, bytes_per_value=item)
        policy = getattr(handle, "policy", None)
        probabilities = policy.exit_probabilities() if isinstance(policy, LearnedExit) else []
        rows = []
        for row in range(ids.shape[0]):
            exit_layer = int(exits[row])
            rows.append(
                {
                    "method": method,
                    "exit_layer": exit_layer,
                    "num_layers": self.num_layers,
                    "visual_tokens": int(visual[row]),
                    "visual_tokens_withdrawn": int(visual[row]) if exit_layer < self.num_layers else 0,
                    "relative_prefill_flops": float(flops.ratio[row]),
                    "kv_bytes": int(kv[row]),
                    "kv_bytes_full": int(kv_full[row]),
                    "exit_probabilities": probabilities[row] if probabilities else None,
                    "_flops": (float(flops.flops[row]), float(flops.full[row])),  # for the metrics (taken out)
                }
            )
        return rows


class RowWatch(StoppingCriteria):
    """Called by ``generate`` after every step: streams each row's new text and says which rows are done.

    A row is done at its end-of-sequence token, a stop string (cut out of its text), its own ``max_tokens``, or
    when its client went away (``job.cancelled``). The first call (the prefill has run) emits each row's ``start``
    event with its ``dyvte`` block.
    """

    def __init__(self, jobs: list[Job], tokenizer: Any, on_prefill: Callable[[], list[dict[str, Any]]]) -> None:
        self.jobs, self.tokenizer, self.on_prefill = jobs, tokenizer, on_prefill
        self.eos = set(_ids(tokenizer.eos_token_id))
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.sent = [""] * len(jobs)  # text already emitted per row
        self.done: list[str | None] = [None] * len(jobs)  # finish reason once done
        self.blocks: list[dict[str, Any]] | None = None
        self.completion = [0] * len(jobs)  # tokens generated per row (the end token included)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.blocks is None:
            self.blocks = self.on_prefill()
            for job, block in zip(self.jobs, self.blocks, strict=True):
                job.emit({"kind": "start", "dyvte": _public(block)})
        last = input_ids[:, -1].tolist()
        for row, job in enumerate(self.jobs):
            if self.done[row] is not None:
                continue
            if job.cancelled.is_set():
                self.done[row] = "cancelled"
                continue
            token = last[row]
            self.completion[row] += 1
            if token in self.eos:
                self.advance(row, final="stop")
                continue
            self.tokens[row].append(token)
            self.advance(row, final="length" if self.completion[row] >= job.request.max_tokens else None)
        return torch.tensor([reason is not None for reason in self.done], device=input_ids.device)

    def advance(self, row: int, final: str | None) -> None:
        """Emit the row's new text; a stop string ends it (cut out); ``final``: the row ends here for that reason
        (``stop``: its end token, ``length``: its ``max_tokens``), with all its text."""
        stops = self.jobs[row].request.stop
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            self.emit_text(row, text[:cut])
            self.finish(row, "stop")
            return
        if final is not None:
            self.emit_text(row, text)
            self.finish(row, final)
            return
        hold = max((len(s) - 1 for s in stops), default=0)  # the start of a stop string may still be coming
        self.emit_text(row, text[: len(text) - hold] if hold else text)

    def emit_text(self, row: int, text: str) -> None:
        """Emit what ``text`` adds to the row's emitted text (nothing while a re-decoded prefix changed)."""
        sent = self.sent[row]
        if len(text) > len(sent) and text.startswith(sent):
            self.jobs[row].emit({"kind": "delta", "text": text[len(sent) :]})
            self.sent[row] = text

    def finish(self, row: int, reason: str) -> None:
        """End the row: the ``end`` event with usage and its ``dyvte`` block (its text was emitted)."""
        self.done[row] = reason
        job = self.jobs[row]
        usage = {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": self.completion[row],
            "total_tokens": job.prompt_tokens + self.completion[row],
        }
        job.emit({"kind": "end", "finish_reason": reason, "usage": usage, "dyvte": _public(self.blocks[row])})

    def close(self) -> None:
        """After ``generate``: end every row still open (``length``; a cancelled one silently)."""
        for row in range(len(self.jobs)):
            if self.done[row] is None:
                self.advance(row, final="length")


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [int(value)]


def _public(block: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in block.items() if not key.startswith("_")}


class Batcher:
    """The worker thread: gathers queued jobs into batches and runs them (see the module docstring).

    Args:
        served: the model.
        metrics: where each batch's rows are counted.
        max_batch_size: requests per batch at most.
        batch_timeout: seconds the first request of a batch waits for others.
    """

    def __init__(self, served: ServedModel, metrics: Metrics, max_batch_size: int = 8, batch_timeout: float = 0.02):
        if max_batch_size < 1:
            raise ValueError(f"--max_batch_size must be >= 1, got {max_batch_size}")
        if batch_timeout < 0:
            raise ValueError(f"--batch_timeout must be >= 0 seconds, got {batch_timeout}")
        self.served, self.metrics = served, metrics
        self.max_batch_size, self.batch_timeout = max_batch_size, batch_timeout
        self._queue: queue.Queue[Job] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dyvte-serve-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job (its events arrive through ``job.emit``)."""
        self._queue.put(job)

    def stop(self, timeout: float = 30.0) -> None:
        """Run what is queued, then stop the worker (waits up to ``timeout`` seconds)."""
        self._stop.set()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.served.release()

    def _loop(self) -> None:
        while not (self._stop.is_set() and self._queue.empty()):
            try:
                first = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self.batch_timeout
            while len(batch) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    batch.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
                except queue.Empty:
                    break
            for group in sub_batches(batch):
                self._run(group)

    def _run(self, jobs: list[Job]) -> None:
        """One model call for ``jobs`` (one method; greedy, or one sampled job)."""
        waiting = len(jobs)
        jobs = [job for job in jobs if not job.cancelled.is_set()]  # clients gone while queued
        self.metrics.cancel(waiting - len(jobs))
        if not jobs:
            return
        try:
            self._generate(jobs)
        except Exception as err:  # noqa: BLE001 - reported to each client and counted; the worker goes on
            logger.exception("a batch of %d failed", len(jobs))
            self.metrics.error(type(err).__name__)
            for job in jobs:
                job.emit({"kind": "error", "message": f"the model call failed: {type(err).__name__}: {err}"})

    def _generate(self, jobs: list[Job]) -> None:
        served, first = self.served, jobs[0].request
        with served.processor_lock:
            inputs = build_inputs(served.processor, [job.request.record for job in jobs], dtype=served.model.dtype)
        options: dict[str, Any] = {"do_sample": False}
        if not first.greedy:
            options = {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p}
            if first.seed is not None:
                torch.manual_seed(first.seed)
        handle = served.handle(first.method, first.threshold)
        watch = RowWatch(jobs, served.processor.tokenizer, lambda: served.blocks(_label(first), inputs, handle))
        with torch.inference_mode():
            served.model.generate(
                **inputs,
                max_new_tokens=max(job.request.max_tokens for job in jobs),
                stopping_criteria=StoppingCriteriaList([watch]),
                **options,
            )
        watch.close()
        for job, block, tokens, done in zip(jobs, watch.blocks or [], watch.completion, watch.done, strict=False):
            if done == "cancelled":
                self.metrics.cancel()
            else:
                self.metrics.row(job, block, tokens)
        self.metrics.batch(len(jobs))


def _label(request: ChatRequest) -> str:
    """The method as the response names it (``heads:0.6`` for a threshold)."""
    return request.method if request.threshold is None else f"heads:{request.threshold:g}"


def sub_batches(jobs: list[Job]) -> Iterator[list[Job]]:
    """Greedy jobs grouped by method (in arrival order); each sampled job alone."""
    groups: dict[tuple[str, float | None], list[Job]] = {}
    for job in jobs:
        request = job.request
        if not request.greedy:
            yield [job]
            continue
        groups.setdefault((request.method, request.threshold), []).append(job)
    yield from groups.values()


def model_name(directory: str | Path) -> str:
    """The id clients see: the model directory's name (``demo-mllm``)."""
    return Path(directory).resolve().name
