"""Helpers of the server tests: a server started the way a user starts it, requests, and offline references."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dyvte
from dyvte.data.records import build_inputs
from dyvte.demo import demo_checkpoint_dir, load_demo_dataset, load_demo_model, load_demo_processor

from ..scripts import REPO_ROOT

STARTUP_S = 90  # the most a server may take to answer /health (import torch, load the demo)
NEW_TOKENS = 16  # the contract's max_tokens default


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_server(*options: str, log: Path):
    """``python train/serve.py --port <free> OPTIONS`` in a subprocess; yields ``(url, process)`` once ``/health``
    says ok (bounded); stopped (SIGTERM, then SIGKILL) on exit. Its output goes to ``log``."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "train" / "serve.py"), "--port", str(port), *options],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO_ROOT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert process.poll() is None, f"the server exited ({process.returncode}):\n{log.read_text()}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if json.loads(answer.read()) == {"status": "ok"}:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"no /health after {STARTUP_S} s:\n{log.read_text()}"
            time.sleep(0.2)
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def post(url: str, body: Any, raw: bytes | None = None, timeout: float = 60) -> tuple[int, Any]:
    """POST to ``/v1/chat/completions``: ``(status, decoded JSON)``."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(url: str, path: str) -> str:
    with urllib.request.urlopen(f"{url}{path}", timeout=30) as answer:
        return answer.read().decode()


def data_url(image) -> str:
    """The image as a PNG data URL (lossless: the server decodes the same pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def messages(record: dict, url: str | None = None) -> list[dict]:
    """One user turn: the record's image (as a data URL unless ``url``) and its question."""
    image = {"type": "image_url", "image_url": {"url": url or data_url(record["image"])}}
    return [{"role": "user", "content": [image, {"type": "text", "text": record["question"]}]}]


def demo_records(count: int) -> list[dict]:
    data = load_demo_dataset("test")
    return [data[i] for i in range(count)]


class Offline:
    """The offline greedy answers of the demo model, each record run alone (as the contract defines them)."""

    def __init__(self) -> None:
        self.model = load_demo_model()
        self.processor = load_demo_processor()
        self.heads = dyvte.ExitHeads.from_pretrained(demo_checkpoint_dir("demo-exit-heads"))

    def answer(self, record: dict, method: str = "heads", max_tokens: int = NEW_TOKENS) -> tuple[str, int]:
        """``(answer text, exit layer)`` of ``record`` under ``method`` (full, static:K, heads, heads:P)."""
        inputs = build_inputs(self.processor, [record])
        num_layers = self.model.config.text_config.num_hidden_layers
        if method == "full":
            handle = None
        elif method.startswith("static:"):
            handle = dyvte.withdraw(self.model, layer=int(method.partition(":")[2]))
        else:
            threshold = float(method.partition(":")[2]) if ":" in method else None
            handle = dyvte.withdraw(self.model, heads=self.heads, threshold=threshold)
        try:
            out = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
            exits = handle.exit_layers if handle is not None else None
        finally:
            if handle is not None:
                handle.remove()
        text = self.processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return text, num_layers if exits is None else int(exits[0])


__all__ = ["Offline", "data_url", "demo_records", "free_port", "get", "messages", "post", "running_server"]
