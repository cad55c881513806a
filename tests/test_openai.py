"""A client of the OpenAI-compatible routes that leaves: its generation on the local server, held at a token
count by the test, is cancelled within a step. The routes themselves, on every backend:
test_http_conformance."""

import threading

import httpx
import pytest

from adapterlab.server import Settings, create_app
from test_http_conformance import LEAVE_AT, leaving_client, wait_until
from test_server import running


@pytest.fixture(scope="module")
def served_app(tiny_llama, tmp_path_factory):
    """(base URL, app) of a server of the bare tiny LLM (an empty store)."""
    app = create_app(tmp_path_factory.mktemp("empty-store"), tiny_llama, Settings(dtype="float32"))
    with running(app) as (url, _):
        yield url, app


def test_a_client_that_leaves_stops_its_generation(served_app, monkeypatch):
    """A non-streamed completion whose client leaves after its first tokens is cancelled at once (its row
    leaves the decoder), not decoded to its 64 tokens for nobody. The decoder is held after the row's
    LEAVE_AT-th token until the server has seen the client go, so no part depends on the machine's speed."""
    url, app = served_app
    server = app.state.backend.server
    body = {"model": server.engine.backbone.name, "prompt": "Once upon a time", "max_tokens": 64, "temperature": 0}
    whole = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
    assert whole["usage"]["completion_tokens"] == 64  # left alone, the row runs to its end
    reached, resume = threading.Event(), threading.Event()
    step = server.decoder.step

    def step_then_hold() -> list:
        advanced = step()
        if not reached.is_set() and any(len(sequence.token_ids) >= LEAVE_AT for sequence in advanced):
            reached.set()
            resume.wait(60)
        return advanced

    monkeypatch.setattr(server.decoder, "step", step_then_hold)
    with leaving_client(url, "/v1/completions", body, {}):
        assert reached.wait(60), "the generation did not start"
        [sequence] = server.decoder.active
    wait_until(lambda: sequence not in server.listeners)  # the server saw the client go, by an event
    resume.set()
    wait_until(lambda: not server.decoder.busy)
    assert sequence.finish_reason == "cancelled" and len(sequence.token_ids) <= LEAVE_AT + 1
