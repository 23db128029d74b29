"""Load test of the dyvte server: concurrent streamed clients, every answer checked against offline greedy decoding.

Starts ``train/serve.py`` on 127.0.0.1 on a free port (or uses ``--url``), then for each concurrency N in
``--clients`` and each method in ``--methods`` (``full``, ``static:K``, ``heads``) runs N client threads that each send
``--requests`` demo test records, streamed, with the official ``openai`` client (the ``dyvte`` method through
``extra_body``). It reports per (N, method): throughput (requests/s and completion tokens/s), p50/p95/p99 latency, time
to first token, errors (an exception or an HTTP error), lost requests (a stream that ended without its final chunk or
never got an answer within ``--request-timeout``), answers that differ from the offline greedy answer of the same
record and method (``dyvte.withdraw`` + ``generate`` on the prompt ``dyvte.data.records.build_inputs`` builds, as the
server does), the mean exit layer, and the peak RSS of the server's process tree; then the throughput ratio
heads / full at each N. Every count is bounded (``--max-seconds`` per cell, a timeout per request).

    python benchmarks/serve_load.py                                   # demo model + heads, N = 1, 8, 32
    python benchmarks/serve_load.py --smoke --output /tmp/load.md     # seconds: the code path, tiny counts
    python benchmarks/serve_load.py --soak 600 --clients 8            # RSS sampled over 10 minutes of load
    python benchmarks/serve_load.py --shape llava7b-4layers           # random weights, 4 layers of LLaVA-7B's shape
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --static-layer 4   # a server already running

``--shape llava7b-4layers`` saves a random-weight LLaVA (decoder: 4 layers of hidden 4096, FFN 11008, 32 heads; CLIP
at 336 px / patch 14, so 576 visual tokens, with a small 2-layer vision tower; the demo's word-level tokenizer, so the
LM head is 58 x 4096 instead of LLaVA's 32064 x 4096) and random-initialised exit heads (seed 0, weights N(0, 0.5),
one P(exit) threshold 0.5 for every head: they exit at whatever layer their random scores say, which is what a
throughput ratio needs, not a calibrated promise) to a temporary folder and serves it with ``--model/--heads``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("serve_load")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPES = ("llava7b-4layers",)


# ------------------------------------------------------------------------------------------------ the server


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health(url: str, timeout: float = 2.0) -> int | None:
    """``GET url/health``'s status code, or ``None`` when nothing answers."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (OSError, urllib.error.URLError):
        return None


@dataclass
class Server:
    """A server process started by :func:`start_server`."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's combined stdout/stderr."""
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


@contextlib.contextmanager
def start_server(
    options: Sequence[str] = (),
    log_path: Path | None = None,
    startup_timeout: float = 180.0,
    stop_timeout: float = 60.0,
) -> Iterator[Server]:
    """Run ``python train/serve.py --host 127.0.0.1 --port <free> *options`` as a user would, until /health says 200.

    Yields the :class:`Server`; on exit sends SIGTERM (the server drains) and waits up to ``stop_timeout`` s before
    killing it.

    Raises:
        RuntimeError: the process exited, or ``/health`` did not answer 200 within ``startup_timeout`` s (the message
            carries the end of its log).
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with contextlib.ExitStack() as stack:
        if log_path is None:
            log_path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dyvte-serve-"))) / "server.log"
        command = [sys.executable, str(REPO_ROOT / "train" / "serve.py"), "--host", "127.0.0.1", "--port", str(port)]
        log = stack.enter_context(open(log_path, "w"))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
        process = subprocess.Popen([*command, *options], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        server = Server(url, process, log_path)
        try:
            deadline = time.monotonic() + startup_timeout
            while health(url) != 200:
                if process.poll() is not None:
                    raise RuntimeError(f"the server exited with {process.returncode}:\n{server.log_tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"/health did not answer 200 within {startup_timeout:.0f} s:\n{server.log_tail()}"
                    )
                time.sleep(0.25)
            logger.info("server up at %s (pid %d)", url, process.pid)
            yield server
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=stop_timeout)
                except subprocess.TimeoutExpired:
                    logger.warning("the server did not stop within %.0f s of SIGTERM: killed", stop_timeout)
                    process.kill()
                    process.wait(timeout=30)


class RssSampler:
    """Samples the resident set size of a process and its children (LitServe's workers) in a background thread."""

    def __init__(self, pid: int | None, interval: float = 0.2) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []  # (seconds since start, bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.monotonic()

    def rss(self) -> int | None:
        """Bytes resident in the process tree now (``None`` without a pid or once it is gone)."""
        if self.pid is None:
            return None
        import psutil

        try:
            root = psutil.Process(self.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return None
        total = 0
        for proc in tree:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self.rss()
            if value is not None:
                self.samples.append((time.monotonic() - self._start, value))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        if self.pid is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def peak(self) -> int | None:
        """The largest sample, in bytes."""
        return max((value for _, value in self.samples), default=None)


# ----------------------------------------------------------------------------------------- records and offline


def data_url(image: Any) -> str:
    """A PIL image as a ``data:image/png;base64,...`` URL."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chat_messages(record: dict) -> list[dict]:
    """One user turn: the record's image as a data URL, then its question (the order the chat template places them)."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(record["image"])}},
                {"type": "text", "text": record["question"]},
            ],
        }
    ]


def method_context(model: torch.nn.Module, method: str, heads: Any) -> contextlib.AbstractContextManager:
    """The ``dyvte.withdraw`` context of a method string (``full``, ``static:K``, ``heads``, ``heads:P``)."""
    import dyvte

    if method == "full":
        return contextlib.nullcontext()  # the plain model
    kind, _, value = method.partition(":")
    if kind == "static":
        return dyvte.withdraw(model, layer=int(value))
    if kind == "heads":
        if heads is None:
            raise ValueError(f"method {method!r} needs --heads")
        return dyvte.withdraw(model, heads=heads, threshold=float(value) if value else None)
    raise ValueError(f"unknown method {method!r}: full, static:K, heads or heads:P")


@torch.no_grad()
def offline_reference(
    model_dir: str | Path,
    heads_dir: str | Path | None,
    records: Sequence[dict],
    methods: Sequence[str],
    max_tokens: int,
) -> dict[tuple[str, int], tuple[str, int]]:
    """``{(method, record index): (answer, exit layer)}``: greedy ``generate`` of each record alone, under each method.

    The prompt is what the server builds: ``dyvte.data.records.build_inputs`` on a record with one image and the
    question (the model's chat template); the answer is the new tokens decoded without special tokens.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import dyvte
    from dyvte.data.records import build_inputs

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    heads = dyvte.ExitHeads.from_pretrained(heads_dir) if heads_dir else None
    num_layers = model.config.text_config.num_hidden_layers
    out: dict[tuple[str, int], tuple[str, int]] = {}
    for index, record in enumerate(records):
        inputs = build_inputs(processor, [record], dtype=model.dtype)
        for method in methods:
            with method_context(model, method, heads) as handle:
                tokens = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)  # (1, T + new)
            exit_layer = int(handle.exit_layers[0]) if method.startswith("heads") else None
            if exit_layer is None:
                exit_layer = num_layers if method == "full" else int(method.split(":")[1])
            new = tokens[:, inputs["input_ids"].shape[1] :]
            out[method, index] = (processor.tokenizer.decode(new[0], skip_special_tokens=True), exit_layer)
    return out


# --------------------------------------------------------------------------------------------------- clients


@dataclass
class Outcome:
    """One request as a client saw it."""

    method: str
    record: int
    started: float
    latency: float | None = None  # seconds to the end of the stream
    ttft: float | None = None  # seconds to the first content token
    text: str = ""
    tokens: int = 0  # completion tokens (usage, else content chunks)
    exit_layer: int | None = None
    finished: bool = False  # the final chunk (finish_reason) arrived
    error: str | None = None


def one_request(client: Any, model_id: str, method: str, index: int, messages: list[dict], max_tokens: int) -> Outcome:
    """Send one streamed greedy request and record what came back."""
    outcome = Outcome(method, index, time.monotonic())
    chunks = 0
    try:
        stream = client.chat.completions.create(
            model=model_id,
            messages=messages,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            extra_body={"dyvte": {"method": method}},
        )
        for chunk in stream:
            block = (chunk.model_extra or {}).get("dyvte")
            if block is not None:
                outcome.exit_layer = block["exit_layer"]
            for choice in chunk.choices:
                if choice.delta.content:
                    if outcome.ttft is None:
                        outcome.ttft = time.monotonic() - outcome.started
                    outcome.text += choice.delta.content
                    chunks += 1
                if choice.finish_reason:
                    outcome.finished = True
            if chunk.usage is not None:
                outcome.tokens = chunk.usage.completion_tokens
        outcome.latency = time.monotonic() - outcome.started
        outcome.tokens = outcome.tokens or chunks
    except Exception as error:  # every failure is counted, with its message
        outcome.error = f"{type(error).__name__}: {error}"
    return outcome


def run_clients(
    url: str,
    model_id: str,
    method: str,
    clients: int,
    requests: int,
    messages: Sequence[list[dict]],
    max_tokens: int,
    max_seconds: float,
    request_timeout: float,
    first_record: int = 0,
) -> tuple[list[Outcome], float, int]:
    """``clients`` threads, each sending ``requests`` requests (records cycled), within ``max_seconds``.

    Returns the outcomes, the wall time and the number of requests never sent because the time ran out.
    """
    import openai

    outcomes: list[Outcome] = []
    unsent = 0
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def client_thread(client_index: int) -> None:
        nonlocal unsent
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=request_timeout)
        for step in range(requests):
            if time.monotonic() > deadline:
                with lock:
                    unsent += requests - step
                return
            index = (first_record + client_index * requests + step) % len(messages)
            outcome = one_request(client, model_id, method, index, messages[index], max_tokens)
            with lock:
                outcomes.append(outcome)
        client.close()

    started = time.monotonic()
    threads = [threading.Thread(target=client_thread, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()) + request_timeout + 5)
    wall = time.monotonic() - started
    if any(thread.is_alive() for thread in threads):
        logger.warning("client threads still running past the time limit (their requests count as lost)")
    return list(outcomes), wall, unsent


# ---------------------------------------------------------------------------------------------------- report


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


@dataclass
class Row:
    """One (clients, method) cell of the report."""

    clients: int
    method: str
    sent: int
    completed: int
    errors: int
    lost: int
    unsent: int
    differing: int
    exit_differing: int
    wall_s: float
    requests_per_s: float
    tokens_per_s: float
    latency_ms: tuple[float, float, float]  # p50, p95, p99
    ttft_ms: tuple[float, float]  # p50, p95
    mean_exit_layer: float
    peak_rss_mib: float | None
    error_samples: list[str] = field(default_factory=list)
    differing_samples: list[str] = field(default_factory=list)


def summarize(
    clients: int,
    method: str,
    outcomes: Sequence[Outcome],
    wall: float,
    unsent: int,
    sent: int,
    reference: dict[tuple[str, int], tuple[str, int]],
    peak_rss: int | None,
) -> Row:
    """Count and time one cell; compare each completed answer (and exit layer) with the offline reference."""
    errors = [o for o in outcomes if o.error is not None]
    done = [o for o in outcomes if o.error is None and o.finished]
    lost = sent - unsent - len(errors) - len(done)  # sent but neither answered in full nor failed
    differing = [o for o in done if o.text.strip() != reference[o.method, o.record][0].strip()]
    exit_differing = [o for o in done if o.exit_layer != reference[o.method, o.record][1]]
    latencies = [1000 * o.latency for o in done if o.latency is not None]
    ttfts = [1000 * o.ttft for o in done if o.ttft is not None]
    exits = [o.exit_layer for o in done if o.exit_layer is not None]
    return Row(
        clients=clients,
        method=method,
        sent=sent - unsent,
        completed=len(done),
        errors=len(errors),
        lost=lost,
        unsent=unsent,
        differing=len(differing),
        exit_differing=len(exit_differing),
        wall_s=wall,
        requests_per_s=len(done) / wall if wall > 0 else math.nan,
        tokens_per_s=sum(o.tokens for o in done) / wall if wall > 0 else math.nan,
        latency_ms=(percentile(latencies, 50), percentile(latencies, 95), percentile(latencies, 99)),
        ttft_ms=(percentile(ttfts, 50), percentile(ttfts, 95)),
        mean_exit_layer=sum(exits) / len(exits) if exits else math.nan,
        peak_rss_mib=peak_rss / 2**20 if peak_rss is not None else None,
        error_samples=sorted({o.error for o in errors})[:3],
        differing_samples=[
            f"{o.method} record {o.record}: served {o.text!r} (exit {o.exit_layer}), offline "
            f"{reference[o.method, o.record][0]!r} (exit {reference[o.method, o.record][1]})"
            for o in (differing or exit_differing)[:3]
        ],
    )


def format_table(rows: Sequence[Row]) -> str:
    """The Markdown table of every cell, then the heads / full throughput ratio per concurrency."""
    lines = [
        "| clients | method | sent | done | errors | lost | unsent | differ (answer / exit) | req/s | tok/s "
        "| latency p50 / p95 / p99 ms | TTFT p50 / p95 ms | mean exit layer | peak RSS MiB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rss = f"{r.peak_rss_mib:.0f}" if r.peak_rss_mib is not None else "n/a"
        lines.append(
            f"| {r.clients} | {r.method} | {r.sent} | {r.completed} | {r.errors} | {r.lost} | {r.unsent} "
            f"| {r.differing} / {r.exit_differing} | {r.requests_per_s:.2f} | {r.tokens_per_s:.1f} "
            f"| {r.latency_ms[0]:.0f} / {r.latency_ms[1]:.0f} / {r.latency_ms[2]:.0f} "
            f"| {r.ttft_ms[0]:.0f} / {r.ttft_ms[1]:.0f} | {r.mean_exit_layer:.2f} | {rss} |"
        )
    ratios = []
    for clients in sorted({r.clients for r in rows}):
        cell = {r.method.split(":")[0]: r for r in rows if r.clients == clients}
        if "heads" in cell and "full" in cell and cell["full"].requests_per_s > 0:
            ratios.append(f"| {clients} | {cell['heads'].requests_per_s / cell['full'].requests_per_s:.2f} |")
    if ratios:
        lines += ["", "| clients | throughput heads / full |", "|---:|---:|", *ratios]
    problems = [s for r in rows for s in r.error_samples + r.differing_samples]
    if problems:
        lines += ["", "Problems seen:", *(f"- {p}" for p in problems)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- the shape


def build_shape_model(name: str, directory: Path) -> tuple[Path, Path]:
    """Save a random-weight LLaVA of the named shape (``model/``) and random exit heads for it (``heads/``).

    ``llava7b-4layers``: 4 decoder layers of LLaVA-1.5-7B's shape (hidden 4096, FFN 11008, 32 heads, MHA), CLIP at
    336 px / patch 14 (576 visual tokens; a 2-layer, 64-wide vision tower: its cost is not what is measured), the
    demo's tokenizer and chat template (a 58-token vocabulary). Heads: seed 0, N(0, 0.5) weights, threshold 0.5.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    import dyvte
    from dyvte.demo import load_demo_processor

    if name != "llava7b-4layers":
        raise ValueError(f"unknown shape {name!r}: one of {', '.join(SHAPES)}")
    processor = load_demo_processor()
    side, patch = 336, 14
    processor.image_processor.size = {"height": side, "width": side}
    processor.image_processor.crop_size = {"height": side, "width": side}
    processor.patch_size = patch
    tok = processor.tokenizer
    tok.model_max_length = 1024  # 576 visual tokens + the question
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=side,
        patch_size=patch, projection_dim=64,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(side // patch) ** 2,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model_dir, heads_dir = directory / "model", directory / "heads"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    heads = dyvte.ExitHeads.for_model(model, threshold=0.5, processor=processor)
    for param in heads.parameters():
        torch.nn.init.normal_(param, std=0.5)
    heads.save_pretrained(heads_dir)
    return model_dir, heads_dir


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a server already running on 127.0.0.1 (default: start one)")
    parser.add_argument("--pid", type=int, help="with --url: the server's pid, for its RSS")
    parser.add_argument("--model", help="model directory (default: the demo model)")
    parser.add_argument("--heads", help="exit heads directory (default: the demo's committed heads)")
    parser.add_argument("--shape", choices=SHAPES, help="serve a random-weight model of this shape instead")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients N")
    parser.add_argument("--requests", type=int, default=4, help="requests M per client and method")
    parser.add_argument("--records", type=int, default=32, help="distinct demo test records (cycled)")
    parser.add_argument("--methods", nargs="+", default=["full", "static", "heads"], help="full, static[:K], heads[:P]")
    parser.add_argument("--static-layer", type=int, help="K of `static` (default: half the layers)")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="time limit of one (clients, method) cell")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="client timeout of one request")
    parser.add_argument("--max-batch-size", type=int, help="the server's --max_batch_size (default: its own)")
    parser.add_argument("--soak", type=float, help="instead: SECONDS of load at max(--clients), RSS sampled")
    parser.add_argument("--sample-interval", type=float, default=5.0, help="--soak: seconds between RSS samples")
    parser.add_argument("--smoke", action="store_true", help="tiny counts: 1 and 2 clients, 2 requests, 2 records")
    parser.add_argument("--output", help="write the Markdown report here")
    parser.add_argument("--json", help="write every row (and the soak samples) as JSON here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.clients, args.requests, args.records = [1, 2], 2, 2
    if min(args.clients) < 1 or args.requests < 1 or args.records < 1 or args.max_tokens < 1:
        parser.error("--clients, --requests, --records and --max-tokens must be >= 1")
    if args.shape and (args.model or args.heads or args.url):
        parser.error("--shape builds its own model and server: no --model, --heads or --url")
    return args


def resolve_methods(names: Sequence[str], num_layers: int, static_layer: int | None) -> list[str]:
    """``static`` -> ``static:K`` (``static_layer`` or ``num_layers // 2``); the others as given."""
    k = static_layer if static_layer is not None else num_layers // 2
    return [f"static:{k}" if name == "static" else name for name in names]


def soak(
    url: str, model_id: str, args: argparse.Namespace, methods: list[str], messages: list, reference: dict, pid: int
) -> tuple[str, dict]:
    """``--soak``: max(--clients) threads cycling the methods for ``args.soak`` s; the server's RSS over time."""
    rows, outcomes_all = [], []
    with RssSampler(pid, interval=args.sample_interval) as sampler:
        end = time.monotonic() + args.soak
        round_index = 0
        while time.monotonic() < end:
            method = methods[round_index % len(methods)]
            clients = max(args.clients)
            outcomes, wall, unsent = run_clients(
                url, model_id, method, clients, args.requests, messages, args.max_tokens,
                min(args.max_seconds, max(1.0, end - time.monotonic())), args.request_timeout,
                first_record=round_index,
            )  # fmt: skip
            rows.append(summarize(clients, method, outcomes, wall, unsent, clients * args.requests, reference, None))
            outcomes_all += outcomes
            round_index += 1
    samples = [value for _, value in sampler.samples]
    keys = ("sent", "completed", "errors", "lost", "differing", "exit_differing")
    totals = {key: sum(getattr(r, key) for r in rows) for key in keys}
    mib = [s / 2**20 for s in samples]
    summary = {
        **totals,
        "seconds": args.soak,
        "rounds": len(rows),
        "rss_first_mib": mib[0] if mib else None,
        "rss_last_mib": mib[-1] if mib else None,
        "rss_max_mib": max(mib) if mib else None,
        "rss_samples_mib": mib,
    }
    text = (
        f"Soak: {args.soak:.0f} s at {max(args.clients)} clients over {', '.join(methods)} ({len(rows)} rounds): "
        f"{totals['sent']} sent, {totals['completed']} done, {totals['errors']} errors, {totals['lost']} lost, "
        f"{totals['differing']} differing answers.\n\n"
        "| server RSS | MiB |\n|---|---:|\n"
        + "".join(
            f"| {name} | {value:.0f} |\n"
            for name, value in (
                ("first", summary["rss_first_mib"]),
                ("last", summary["rss_last_mib"]),
                ("max", summary["rss_max_mib"]),
            )
            if value is not None
        )  # fmt: skip
    )
    return text, summary


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in ("httpx", "httpx2"):  # the openai client's transport logs every request at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    args = parse_args(argv)
    from dyvte.demo import demo_checkpoint_dir, load_demo_dataset

    with contextlib.ExitStack() as stack:
        if args.shape:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dyvte-shape-")))
            logger.info("building the %s model in %s", args.shape, directory)
            model_dir, heads_dir = build_shape_model(args.shape, directory)
        else:
            model_dir = Path(args.model) if args.model else demo_checkpoint_dir("demo-mllm")
            heads_dir = (
                Path(args.heads) if args.heads else (None if args.model else demo_checkpoint_dir("demo-exit-heads"))
            )
        config = json.loads((model_dir / "config.json").read_text())
        num_layers = config["text_config"]["num_hidden_layers"]
        methods = resolve_methods(args.methods, num_layers, args.static_layer)
        dataset = load_demo_dataset("test")
        records = [dataset[i] for i in range(min(args.records, len(dataset)))]
        logger.info("offline greedy reference: %d records x %s", len(records), methods)
        reference = offline_reference(model_dir, heads_dir, records, methods, args.max_tokens)
        messages = [chat_messages(record) for record in records]

        pid = args.pid
        if args.url:
            url = args.url.rstrip("/")
        else:
            options = ["--model", str(model_dir)]
            if heads_dir is not None:
                options += ["--heads", str(heads_dir)]
            statics = [m.split(":")[1] for m in methods if m.startswith("static:")]
            if statics:
                options += ["--layer", statics[0]]
            if args.max_batch_size:
                options += ["--max_batch_size", str(args.max_batch_size)]
            server = stack.enter_context(start_server(options))
            url, pid = server.url, server.process.pid
        model_id = model_dir.name
        for method in methods:  # one unmeasured request each: the first call's one-time costs stay out of the figures
            warm, _, _ = run_clients(url, model_id, method, 1, 1, messages, args.max_tokens, 600, args.request_timeout)
            for outcome in warm:
                if outcome.error or not outcome.finished:
                    logger.warning("warm-up request (%s) failed: %s", method, outcome.error or "no final chunk")

        if args.soak:
            text, soak_summary = soak(url, model_id, args, methods, messages, reference, pid)
            payload: dict[str, Any] = {"soak": soak_summary}
        else:
            rows = []
            for clients in args.clients:
                for method in methods:
                    with RssSampler(pid) as sampler:
                        outcomes, wall, unsent = run_clients(
                            url, model_id, method, clients, args.requests, messages, args.max_tokens,
                            args.max_seconds, args.request_timeout,
                        )  # fmt: skip
                    row = summarize(
                        clients, method, outcomes, wall, unsent, clients * args.requests, reference, sampler.peak()
                    )
                    logger.info(
                        "clients %d %s: %d done, %d errors, %d lost, %d differing, %.2f req/s",
                        clients, method, row.completed, row.errors, row.lost, row.differing, row.requests_per_s,
                    )  # fmt: skip
                    rows.append(row)
            text = format_table(rows)
            payload = {"rows": [asdict(r) for r in rows]}
    header = (
        f"Load test: model {args.shape or model_dir.name}, {len(records)} demo test records, max_tokens "
        f"{args.max_tokens}, streamed greedy requests (openai client), {os.cpu_count()} CPUs.\n\n"
    )
    print(header + text)
    if args.output:
        Path(args.output).write_text(header + text + "\n")
        logger.info("wrote %s", args.output)
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
        logger.info("wrote %s", args.json)
    checked = payload.get("rows", []) + ([payload["soak"]] if "soak" in payload else [])
    clean = all(r["errors"] == r["lost"] == r["differing"] == r["exit_differing"] == 0 for r in checked)
    return 0 if clean else 1  # the goals: 0 errors, 0 lost, 0 answers (or exit layers) that differ from offline


if __name__ == "__main__":
    sys.exit(main())
