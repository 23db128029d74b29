"""The server as a user runs it (``python train/serve.py`` in a subprocess on 127.0.0.1) and as clients call it: the
official ``openai`` package (streaming and not) and ``curl``, with a demo test image as a data URL. Answers and exit
layers equal the offline greedy result of the same record; concurrent requests batch and still equal it; every bad
request of docs/robustness.md ("Serving") gets a 4xx with OpenAI's error JSON and a message that says what to fix,
and the server answers good requests afterwards."""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from ..tools import require_module, require_program
from .server import Offline, data_url, demo_records, get, messages, post, running_server

openai = require_module("openai", tool="serve", install="pip install -e '.[dev]'")
require_module("fastapi", tool="serve", install="pip install -e '.[serve]'")

MODEL = "demo-mllm"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with running_server("--batch_timeout", "0.3", "--max_batch_size", "8", log=log) as (url, _process):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline():
    return Offline()


@pytest.fixture(scope="module")
def records():
    return demo_records(8)


def metric(url: str, name: str) -> float:
    """The sum of a metric's samples in ``/metrics`` (0 when absent)."""
    text = get(url, "/metrics")
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE))


@pytest.mark.parametrize("method", [None, "full", "heads:0.6"])
def test_openai_client_answers_as_offline(client, offline, records, method):
    extra = {} if method is None else {"extra_body": {"dyvte": {"method": method}}}
    answer = client.chat.completions.create(model=MODEL, messages=messages(records[0]), **extra)
    text, exit_layer = offline.answer(records[0], method or "heads")
    block = answer.model_extra["dyvte"]
    assert answer.choices[0].message.content == text and block["exit_layer"] == exit_layer
    assert block["method"] == (method or "heads") and block["num_layers"] == 8
    assert answer.choices[0].finish_reason == "stop" and answer.model == MODEL
    assert answer.usage.completion_tokens >= 1 and answer.usage.total_tokens > answer.usage.prompt_tokens
    assert block["kv_bytes"] <= block["kv_bytes_full"] and 0 < block["relative_prefill_flops"] <= 1
    withdrawn = block["exit_layer"] < block["num_layers"]
    assert block["visual_tokens_withdrawn"] == (block["visual_tokens"] if withdrawn else 0)
    assert (block["exit_probabilities"] is None) == (method == "full")


def test_openai_client_streams_as_offline(client, offline, records):
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages(records[1]), stream=True))
    text, exit_layer = offline.answer(records[1])
    first, last = chunks[0], chunks[-1]
    assert first.choices[0].delta.role == "assistant" and last.choices[0].finish_reason == "stop"
    assert first.model_extra["dyvte"] == last.model_extra["dyvte"] and last.usage.completion_tokens >= 1
    assert last.model_extra["dyvte"]["exit_layer"] == exit_layer
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert all("dyvte" not in c.model_extra for c in chunks[1:-1])


def test_curl(server, offline, records, tmp_path):
    curl = require_program("curl", tool="curl", install="apt-get install curl")
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"model": MODEL, "messages": messages(records[2]), "dyvte": {"method": "full"}}))
    run = [curl, "-sS", "--max-time", "60", "-H", "Content-Type: application/json", "-d", f"@{body}"]
    done = subprocess.run([*run, f"{server}/v1/chat/completions"], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert (answer["choices"][0]["message"]["content"], answer["dyvte"]["exit_layer"]) == offline.answer(
        records[2], "full"
    )
    models = subprocess.run([curl, "-sS", f"{server}/v1/models"], capture_output=True, text=True, timeout=60)
    assert json.loads(models.stdout)["data"][0]["id"] == MODEL


def test_concurrent_requests_batch_and_each_equals_its_request_alone(server, client, offline, records):
    methods = ["heads", "heads", "full", "heads:0.6", "heads", "full", "heads", "heads"]
    batches, rows = metric(server, "dyvte_batches_total"), metric(server, "dyvte_batch_rows_total")

    def ask(index: int):
        extra = {"dyvte": {"method": methods[index]}}
        return client.chat.completions.create(model=MODEL, messages=messages(records[index]), extra_body=extra)

    with ThreadPoolExecutor(len(records)) as pool:
        answers = list(pool.map(ask, range(len(records))))
    for record, method, answer in zip(records, methods, answers, strict=True):
        text, exit_layer = offline.answer(record, method)
        assert (answer.choices[0].message.content, answer.model_extra["dyvte"]["exit_layer"]) == (text, exit_layer)
    calls = metric(server, "dyvte_batches_total") - batches
    assert metric(server, "dyvte_batch_rows_total") - rows == len(records)
    assert calls < len(records)  # some requests shared a model call (one per method and gathering window)


def test_max_tokens_stop_and_seed(client, offline, records):
    """A row ends at its own max_tokens ("length") or at a stop string (cut out, "stop"); a seeded sampled request
    answers the same twice."""
    text, _ = offline.answer(records[0], max_tokens=1)
    short = client.chat.completions.create(model=MODEL, messages=messages(records[0]), max_tokens=1)
    assert (short.choices[0].message.content, short.choices[0].finish_reason) == (text, "length")
    answers = {i: offline.answer(record)[0] for i, record in enumerate(records)}
    index = next(i for i, answer in answers.items() if len(answer.strip()) >= 2)  # a multi-character answer
    stop = answers[index].strip()[1]
    cut = client.chat.completions.create(model=MODEL, messages=messages(records[index]), stop=[stop])
    assert cut.choices[0].message.content == answers[index][: answers[index].find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    never = client.chat.completions.create(model=MODEL, messages=messages(records[index]), stop=["\u00a7\u00a7"])
    assert (never.choices[0].message.content, never.choices[0].finish_reason) == (answers[index], "stop")
    sampled = [
        client.chat.completions.create(model=MODEL, messages=messages(records[1]), temperature=1.0, seed=7)
        for _ in range(2)
    ]
    assert sampled[0].choices[0].message.content == sampled[1].choices[0].message.content


def bomb() -> str:
    """A 5000 x 5000 PNG of a few KB: 25 M pixels, above the server's 4096 x 4096 cap."""
    buffer = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def with_url(record: dict, url: str) -> dict:
    return {"model": MODEL, "messages": messages(record, url)}


def bad_requests(record: dict) -> dict[str, tuple[object, str]]:
    """name -> (body, or raw bytes; a fragment of the message that says what to fix)."""
    good = data_url(record["image"])
    prefix, _, payload = good.partition(",")
    half = f"{prefix},{payload[: len(payload) // 2 // 4 * 4]}"  # valid base64 of half the file
    two = messages(record)
    two[0]["content"].append({"type": "image_url", "image_url": {"url": good}})
    text_only = [{"role": "user", "content": record["question"]}]
    return {
        "malformed JSON": (b'{"messages": [', "not valid JSON"),
        "not an object": ([1, 2], "must be a JSON object"),
        "missing messages": ({"model": MODEL}, "'messages' is required"),
        "unknown role": ({"messages": [{"role": "robot", "content": "hi"}]}, "role 'robot' is not supported"),
        "system role": ({"messages": [{"role": "system", "content": "be brief"}, *two[:1]]}, "not supported"),
        "unknown content type": (
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
            "content type 'input_audio' is not supported",
        ),
        "data URL not an image": (
            with_url(record, "data:image/png;base64," + base64.b64encode(b"hi" * 30).decode()),
            "not an image",
        ),
        "truncated base64": (with_url(record, good[:-3]), "base64 is invalid or truncated"),
        "truncated image": (with_url(record, half), "truncated or corrupt"),
        "decompression bomb": (with_url(record, bomb()), "more than this server takes"),
        "too many images": ({"messages": two}, "exactly one image"),
        "too few images": ({"messages": text_only}, "exactly one image"),
        "max_tokens 0": ({**with_url(record, good), "max_tokens": 0}, "max_tokens must be an integer in [1,"),
        "max_tokens negative": ({**with_url(record, good), "max_tokens": -5}, "max_tokens must be an integer in [1,"),
        "max_tokens above the model": ({**with_url(record, good), "max_tokens": 10_000}, "context length"),
        "prompt + max_tokens above the model": ({**with_url(record, good), "max_tokens": 120}, "lower max_tokens"),
        "method not started": ({**with_url(record, good), "dyvte": {"method": "static:3"}}, "not served"),
        "unknown method": ({**with_url(record, good), "dyvte": {"method": "fastv"}}, "not served"),
        "threshold 0": ({**with_url(record, good), "dyvte": {"method": "heads:0"}}, "(0, 1]"),
        "threshold above 1": ({**with_url(record, good), "dyvte": {"method": "heads:1.5"}}, "(0, 1]"),
        "threshold not a number": ({**with_url(record, good), "dyvte": {"method": "heads:abc"}}, "(0, 1]"),
        "remote URL": (with_url(record, "https://example.com/cat.png"), "remote image URLs are not fetched"),
        "local path without the flag": (with_url(record, "/etc/hostname"), "--allow_local_files"),
        "file URL without the flag": (with_url(record, "file:///etc/hostname"), "--allow_local_files"),
        "n above 1": ({**with_url(record, good), "n": 2}, "n must be 1"),
        "temperature out of range": ({**with_url(record, good), "temperature": 5}, "temperature must be"),
    }


BAD = list(bad_requests({"image": Image.new("RGB", (8, 8)), "question": "q"}))


@pytest.mark.parametrize("name", BAD)
def test_a_bad_request_gets_a_4xx_openai_error_that_says_what_to_fix(server, records, name):
    body, fragment = bad_requests(records[0])[name]
    status, answer = post(server, None, raw=body) if isinstance(body, bytes) else post(server, body)
    assert 400 <= status < 500, (status, answer)
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert fragment in error["message"], error["message"]


def test_the_server_answers_after_every_bad_request(server, client, offline, records):
    assert metric(server, "dyvte_request_errors_total") >= len(BAD)
    answer = client.chat.completions.create(model=MODEL, messages=messages(records[3]))
    assert (answer.choices[0].message.content, answer.model_extra["dyvte"]["exit_layer"]) == offline.answer(records[3])
    with pytest.raises(openai.BadRequestError) as refused:  # the openai client sees a 400 as its own error type
        client.chat.completions.create(
            model=MODEL, messages=messages(records[3]), extra_body={"dyvte": {"method": "x"}}
        )
    assert "not served" in str(refused.value)


def test_a_client_leaving_its_stream_loses_nothing_for_the_others(server, offline, records):
    """A streamed request whose client closes the connection (while its batch gathers): its row is dropped, counted
    in ``dyvte_requests_cancelled_total``; the request batched with it is answered as offline."""
    cancelled = metric(server, "dyvte_requests_cancelled_total")
    host, port = server.removeprefix("http://").split(":")
    leaving = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"model": MODEL, "messages": messages(records[4]), "stream": True})
    leaving.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    result = {}
    staying = threading.Thread(
        target=lambda: result.update(answer=post(server, with_url(records[5], data_url(records[5]["image"]))))
    )
    staying.start()
    response = leaving.getresponse()  # the stream started (headers), its batch still gathering
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    leaving.sock.close()  # the client goes away mid-stream
    leaving.close()
    staying.join(60)
    status, answer = result["answer"]
    assert status == 200
    assert (answer["choices"][0]["message"]["content"], answer["dyvte"]["exit_layer"]) == offline.answer(records[5])
    deadline = time.monotonic() + 30
    while metric(server, "dyvte_requests_cancelled_total") < cancelled + 1:
        assert time.monotonic() < deadline, "the leaving client's row was never dropped"
        time.sleep(0.2)


def test_metrics_are_prometheus_text_with_exits_flops_and_the_heads_shift_check(server):
    text = get(server, "/metrics")
    sample = re.compile(r"^[a-z_]+(\{[a-z_]+=\"[^\"]*\"(,[a-z_]+=\"[^\"]*\")*\})? -?[0-9.e+-]+$")
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    for name in ("requests_total", "exits_total", "prefill_flops_saved_total", "completion_tokens_total"):
        assert metric(server, f"dyvte_{name}") > 0, name
    assert 'dyvte_request_errors_total{type="invalid_json"} 1' in text
    assert metric(server, "dyvte_exit_head_shift_rows") > 0 and "dyvte_exit_heads_shifted" in text


def test_static_files_stay_inside_the_page_folder(server):
    """``/static/<file>`` serves the chat page's folder only: a path out of it is a 404 with OpenAI's error JSON."""
    for path in ("/static/..%2Fapp.py", "/static/..%2F..%2Fserve%2Fapp.py", "/static/no-such-file.js"):
        try:
            urllib.request.urlopen(f"{server}{path}", timeout=30)
            raise AssertionError(f"{path} was served")
        except urllib.error.HTTPError as error:
            assert error.code == 404 and "error" in json.loads(error.read())
