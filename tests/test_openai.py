"""The OpenAI-compatible routes, driven by the official `openai` client against a loopback server on a
tiny random Llama (SmolLM2's tokenizer and chat template): a generative LoRA and prefix adapter, a
classification adapter and the bare backbone, each named as `model`."""

import json
import socket
import threading
import time
from contextlib import contextmanager

import httpx

import openai
import pytest

from adapterlab.engine import Engine, GenerationRequest
from adapterlab.generation import Sampling
from adapterlab.recipe import validate_recipe
from adapterlab.server import Settings, create_app
from adapterlab.train import train
from conftest import shared, tiny_recipe
from test_generation import llm  # noqa: F401 (the fixture: a tiny chat Llama and a store)
from test_server import running

E2E = {"path": None, "text_field": "mr", "target_field": "ref", "references_field": "refs", "k": 8, "test_limit": 2}
LEAVE_AT = 8  # tokens a leaving client waits for
CHAT = [{"role": "user", "content": "Describe: name[Alimentum], area[city centre]"}]


@pytest.fixture(scope="module")
def served_app(llm):  # noqa: F811
    """(base URL, app) over a store with generative and classification adapters of the tiny LLM."""
    folder, store = llm
    for name, method in (("lora", {"name": "lora", "r": 4}), ("prefix", {"name": "prefix_tuning", "num_virtual_tokens": 4})):
        train(validate_recipe(tiny_recipe(folder, store, method=method, task="e2e", output={"name": name},
                                          head={"type": "generate", "template": "Describe: {text}"},
                                          data={**E2E, "path": shared("e2e")},
                                          training={"max_steps": 3, "batch_size": 4, "lr": 0.05})), show_progress=False)
    app = create_app(store, folder, Settings(dtype="float32", max_new_tokens=480))
    with running(app) as (url, _):
        yield url, app


@pytest.fixture(scope="module")
def served(served_app, llm):  # noqa: F811
    """(OpenAI client, engine) on that server."""
    url, _ = served_app
    folder, store = llm
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0), Engine(folder, store, dtype="float32")


def greedy(engine, model, max_tokens, **prompt) -> str:
    adapter = None if model == engine.backbone.name else model
    return engine.generate([GenerationRequest(adapter, sampling=Sampling(max_tokens), **prompt)])[0].text


def test_models_lists_the_backbone_and_every_adapter(served):
    client, engine = served
    ids = {model.id for model in client.models.list()}
    assert ids == {engine.backbone.name, "e2e/lora", "e2e/prefix", "sentiment/lora", "sentiment/prefix"}


def test_completion_and_chat_equal_the_engine_with_usage(served):
    client, engine = served
    plain = client.completions.create(model=engine.backbone.name, prompt="Once upon a time", max_tokens=6,
                                      temperature=0)
    assert plain.choices[0].text == greedy(engine, engine.backbone.name, 6, prompt="Once upon a time")
    assert plain.usage.prompt_tokens == len(engine.backbone.tokenizer("Once upon a time").input_ids)
    assert plain.usage.completion_tokens == 6 and plain.choices[0].finish_reason == "length"
    for model in ("e2e/lora", "e2e/prefix"):
        chat = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0)
        assert chat.choices[0].message.content == greedy(engine, model, 8, messages=CHAT)
        assert chat.choices[0].message.role == "assistant"


def test_streaming_sends_the_same_text_in_pieces(served):
    client, engine = served
    stream = client.chat.completions.create(model="e2e/lora", messages=CHAT, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(bool(piece) for piece in pieces) >= 2  # streamed, not sent whole
    assert "".join(pieces) == greedy(engine, "e2e/lora", 8, messages=CHAT)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens > 0
    completion = "".join(c.choices[0].text for c in client.completions.create(
        model="e2e/prefix", prompt="Describe: name[Alimentum]", max_tokens=5, temperature=0, stream=True))
    assert completion == greedy(engine, "e2e/prefix", 5, prompt="Describe: name[Alimentum]")


def test_two_adapters_at_once_each_answer_their_own(served):
    client, engine = served
    expected = {model: greedy(engine, model, 8, messages=CHAT) for model in ("e2e/lora", "e2e/prefix")}
    assert len(set(expected.values())) == 2
    answers, threads = {}, []
    for model in expected:
        ask = lambda m=model: answers.__setitem__(m, client.chat.completions.create(  # noqa: E731
            model=m, messages=CHAT, max_tokens=8, temperature=0).choices[0].message.content)
        threads.append(threading.Thread(target=ask))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert answers == expected


def test_sampling_n_and_seed(served):
    client, _ = served
    first = client.completions.create(model="e2e/lora", prompt="Describe:", max_tokens=6, n=2, seed=3, temperature=1)
    again = client.completions.create(model="e2e/lora", prompt="Describe:", max_tokens=6, n=2, seed=3, temperature=1)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]


def test_a_classification_adapter_answers_with_its_label(served):
    client, engine = served
    answer = client.chat.completions.create(model="sentiment/lora", messages=[{"role": "user", "content": "great"}])
    assert answer.choices[0].message.content == engine.predict("sentiment/lora", ["great"])[0].label


def test_errors_in_openai_shape(served):
    client, engine = served
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope/nope", prompt="x")
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="e2e/lora", prompt="x", temperature=5)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="e2e/lora", prompt="x", extra_body={"best_of": 3})
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model="e2e/lora", prompt="word " * 600, max_tokens=4)
    assert long.value.body["code"] == "context_length_exceeded" and "512 tokens" in long.value.body["message"]


def test_a_client_that_leaves_stops_its_generation(served_app, monkeypatch):
    """A non-streamed completion whose client leaves after its first tokens is cancelled at once (its row
    leaves the decoder), not decoded to its 480 tokens for nobody. The decoder is held after the row's
    LEAVE_AT-th token until the server has seen the client go, so no part depends on the machine's speed."""
    url, app = served_app
    server = app.state.server
    body = {"model": "e2e/lora", "prompt": "Once upon a time", "max_tokens": 480, "temperature": 0}
    whole = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
    assert whole["usage"]["completion_tokens"] == 480  # left alone, the row runs to its end
    reached, resume = threading.Event(), threading.Event()
    step = server.decoder.step

    def step_then_hold() -> list:
        advanced = step()
        if not reached.is_set() and any(len(sequence.token_ids) >= LEAVE_AT for sequence in advanced):
            reached.set()
            resume.wait(60)
        return advanced

    monkeypatch.setattr(server.decoder, "step", step_then_hold)
    with leaving_client(url, "/v1/completions", body):
        assert reached.wait(60), "the generation did not start"
        [sequence] = server.decoder.active
    wait_until(lambda: sequence not in server.listeners)  # the server saw the client go, by an event
    resume.set()
    wait_until(lambda: not server.decoder.busy)
    assert sequence.finish_reason == "cancelled" and len(sequence.token_ids) <= LEAVE_AT + 1


@contextmanager
def leaving_client(url: str, path: str, body: dict):
    """A client that sends a request and, leaving the block, closes its connection without reading the answer."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    data = json.dumps(body).encode()
    with socket.create_connection((host, port)) as connection:
        connection.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        yield


def wait_until(condition, seconds: float = 60) -> None:
    """Wait for `condition()`; not holding within `seconds` (far beyond any step) is a failure."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.005)
