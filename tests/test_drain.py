"""A deploy's SIGTERM (or a Ctrl-C) while requests are in flight: `adapterlab serve` on a tiny random chat Llama,
its engine slowed down (a classification batch takes 1.5 s, a decode step 0.1 s) so that the work is still
running when the signal comes. Every request in flight gets its whole answer (a stream its last events and
[DONE]); a request arriving during the drain gets 503 with Retry-After (the server still listens: a load
balancer or a client learns at once to go elsewhere, where a refused connection would look like a crash);
the process exits 0. Past --drain-seconds, what is left is cancelled, and the exit is still 0, in time."""

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from adapterlab.engine import Engine, GenerationRequest, Request
from adapterlab.generation import Sampling
from server_processes import ServerProcess

TEXTS = ["the soup was cold", "what a match last night", "loved every minute"]
LABELS = ["food", "sport", "money"]
PROMPT = "Describe: name[Alimentum], area[city centre]"


@pytest.fixture(scope="module")
def engine(tiny_llama, tmp_path_factory) -> Engine:
    return Engine(tiny_llama, tmp_path_factory.mktemp("empty-store"), dtype="float32")


def start(tiny_llama: str, folder: Path, drain_seconds: float) -> ServerProcess:
    (folder / "store").mkdir()
    arguments = ["--store", str(folder / "store"), "--backbone", tiny_llama, "--dtype", "float32",
                 "--drain-seconds", str(drain_seconds), "--max-new-tokens", "400"]
    return ServerProcess(arguments, folder / "server.log", delays={"predict": 1.5, "step": 0.1}).start()


def stream(url: str, model: str, max_tokens: int, first: threading.Event) -> list[str]:
    """A streamed completion's events (until the server ends it or goes away); `first` set at the first."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    events = []
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if line:
                    events.append(line.removeprefix("data: "))
                    first.set()
    except httpx.TransportError:  # the connection closed mid-stream
        pass
    first.set()
    return events


def rows_in_engine(marker: Path) -> int:
    """Rows whose classification batch has reached the (slowed) engine."""
    return sum(int(line) for line in marker.read_text().split()) if marker.exists() else 0


def classify(url: str, text: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/classify", json={"inputs": [text], "labels": LABELS}, timeout=120)


def test_sigterm_lets_requests_in_flight_finish_and_refuses_new_ones(tiny_llama, engine, tmp_path):
    server = start(tiny_llama, tmp_path, drain_seconds=60)
    try:
        model = engine.backbone.name
        first_event, marker = threading.Event(), Path(f"{server.log}.predicting")
        with ThreadPoolExecutor(4) as pool:
            streamed = pool.submit(stream, server.url, model, 24, first_event)
            assert first_event.wait(60)  # the stream is under way
            answers = [pool.submit(classify, server.url, text) for text in TEXTS]
            deadline = time.monotonic() + 60
            while rows_in_engine(marker) < len(TEXTS) and time.monotonic() < deadline:  # the last one's batch
                time.sleep(0.01)  # is in the engine now (and earlier ones may be)
            server.signal(signal.SIGTERM)
            time.sleep(0.3)  # the signal handled
            late = classify(server.url, "too late")
            health = httpx.get(f"{server.url}/health", timeout=30)
            for response in (late, health):
                assert response.status_code == 503 and response.headers["retry-after"] == "1", response.text
                assert "shutting down" in response.json()["error"]
            answers = [answer.result() for answer in answers]
            events = streamed.result()
        assert server.wait(60) == 0
    finally:
        server.kill()
    expected = engine.predict_batch([Request(None, text, labels=tuple(LABELS)) for text in TEXTS])
    for response, prediction in zip(answers, expected):
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["label"] == prediction.label
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    text = "".join(chunk["choices"][0]["text"] for chunk in chunks)
    assert text == engine.generate([GenerationRequest(None, PROMPT, sampling=Sampling(24))])[0].text
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log and "SIGTERM: new requests get 503" in log


def test_past_the_deadline_the_rest_is_cancelled_and_the_exit_is_clean(tiny_llama, engine, tmp_path):
    """SIGINT (Ctrl-C) with a stream that would take 40 s more: cut at the 1 s deadline, exit 0."""
    server = start(tiny_llama, tmp_path, drain_seconds=1)
    try:
        first_event = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            streamed = pool.submit(stream, server.url, engine.backbone.name, 400, first_event)
            assert first_event.wait(60)
            signalled = time.monotonic()
            server.signal(signal.SIGINT)
            assert server.wait(30) == 0
            stopped = time.monotonic() - signalled
            events = streamed.result()
    finally:
        server.kill()
    assert stopped < 10, stopped  # the deadline, uvicorn's shutdown and the worker's last step
    assert "[DONE]" not in events and len(events) < 300  # cut short
    log = (tmp_path / "server.log").read_text()
    assert "SIGINT: new requests get 503" in log and "Traceback" not in log
