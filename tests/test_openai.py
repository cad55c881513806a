"""The OpenAI-compatible routes, driven by the official `openai` client against a loopback server on a
tiny random Llama (SmolLM2's tokenizer and chat template): a generative LoRA and prefix adapter, a
classification adapter and the bare backbone, each named as `model`."""

import threading
import time

import httpx

import openai
import pytest

from adapterlab.engine import Engine, GenerationRequest
from adapterlab.generation import Sampling
from adapterlab.recipe import validate_recipe
from adapterlab.server import Settings, create_app
from adapterlab.training import train
from conftest import shared, tiny_recipe
from test_generation import llm  # noqa: F401 (the fixture: a tiny chat Llama and a store)
from test_server import running

E2E = {"path": None, "text_field": "mr", "target_field": "ref", "references_field": "refs", "k": 8, "test_limit": 2}
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


def test_a_client_that_leaves_stops_its_generation(served_app):
    """A non-streamed completion whose client gives up is cancelled (its rows leave the decoder), not
    decoded to the end for nobody."""
    url, app = served_app
    server = app.state.server
    body = {"model": "e2e/lora", "prompt": "Once upon a time", "max_tokens": 480, "temperature": 0}
    started = time.monotonic()
    whole = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    seconds = time.monotonic() - started
    assert whole["usage"]["completion_tokens"] == 480 and seconds > 1.0  # long enough to leave in the middle
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=0.2)
    while server.decoder.busy and time.monotonic() - started < seconds:
        time.sleep(0.02)
    assert time.monotonic() - started < 0.2 + 0.5 * seconds and not server.decoder.busy
