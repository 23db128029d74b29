"""A server started with --allow_local_files reads a local image; on SIGTERM it stops listening, finishes the request
in flight (drained, up to --drain_timeout) and exits."""

from __future__ import annotations

import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from ..tools import require_module
from .server import Offline, demo_records, get, messages, post, running_server

require_module("fastapi", tool="serve", install="pip install -e '.[serve]'")

GATHER_S = 3.0  # --batch_timeout: the request is still in flight (gathering its batch) when SIGTERM comes


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("drain") / "server.log"
    options = ("--allow_local_files", "--batch_timeout", str(GATHER_S), "--drain_timeout", "20")
    with running_server(*options, log=log) as (url, process):
        yield url, process, log


@pytest.fixture(scope="module")
def offline():
    return Offline()


def test_a_local_image_path_is_read_with_the_flag(server, offline, tmp_path):
    url, _, _ = server
    record = demo_records(1)[0]
    path = tmp_path / "digits.png"
    record["image"].save(path)
    references = (str(path), f"file://{path}")
    with ThreadPoolExecutor(len(references)) as pool:  # one gathering window for both
        answers = list(pool.map(lambda reference: post(url, {"messages": messages(record, reference)}), references))
    for status, answer in answers:
        assert status == 200, answer
        assert (answer["choices"][0]["message"]["content"], answer["dyvte"]["exit_layer"]) == offline.answer(record)


def test_sigterm_drains_the_request_in_flight(server, offline):
    url, process, log = server
    record = demo_records(2)[1]
    result = {}
    asking = threading.Thread(target=lambda: result.update(answer=post(url, {"messages": messages(record)})))
    asking.start()
    deadline = time.monotonic() + 30
    while "dyvte_requests_in_flight 1" not in get(url, "/metrics"):  # queued, in its batch's gathering window
        assert time.monotonic() < deadline and asking.is_alive(), "the request never got in flight"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    asking.join(60)
    status, answer = result["answer"]
    assert status == 200, answer
    assert (answer["choices"][0]["message"]["content"], answer["dyvte"]["exit_layer"]) == offline.answer(record)
    process.wait(timeout=30)
    assert process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful shutdown
    assert "stopped: in-flight requests drained" in log.read_text()
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # nothing listens any more
        urllib.request.urlopen(f"{url}/health", timeout=5)
