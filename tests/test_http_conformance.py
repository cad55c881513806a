"""The HTTP API's conformance suite: the same checks against every backend, the local server (`adapterlab
serve`) and the Ray Serve deployment (an ingress before a replica, on a local Ray cluster), each over its
copy of one store of a tiny random chat Llama: classification LoRA adapters, a generative LoRA and prefix
adapter. Both must answer alike: the status and body of every route, streams, OpenAI's error shape,
tokens, limits, and a client that leaves (its generation cancelled, measured in tokens, never in time)."""

import json
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import adapterlab
from adapterlab.engine import Engine, GenerationRequest, Request
from adapterlab.generation import Sampling
from adapterlab.server import Settings, create_app
from adapterlab.server.metrics import Metrics
from conftest import BATCH_TOLERANCE, assert_answer
from test_server import archive, folder_files, running

TEXTS = ["the soup was cold", "what a match last night", "loved every minute", "a dull and lifeless film"]
ZERO_SHOT = ("food", "sport", "money")
MR = "name[Alimentum], area[city centre]"  # a text the generative adapters' template "Describe: {text}" takes
CHAT = [{"role": "user", "content": MR}]
ADMIN, CLIENT = {"Authorization": "Bearer admin"}, {"Authorization": "Bearer client"}
SETTINGS = {"dtype": "float32", "admin_token": "admin", "client_token": "client", "max_inputs": 8,
            "max_chars": 4000, "max_new_tokens": 480, "max_upload_bytes": 200_000}
CLASSIFIERS = ["sentiment/lora", "sentiment/other"]
LEAVE_AT = 8  # tokens a leaving client waits for


@dataclass
class Served:
    url: str
    store: Path


@pytest.fixture(scope="module", params=["local", "ray"])
def served(request, chat_adapters, tiny_llama, tmp_path_factory):
    store = tmp_path_factory.mktemp(request.param) / "store"
    shutil.copytree(chat_adapters / "store", store)
    if request.param == "local":
        with running(create_app(store, tiny_llama, Settings(**SETTINGS))) as (url, _):
            yield Served(url, store)
    else:
        with ray_application(store, tiny_llama) as url:
            yield Served(url, store)


@contextmanager
def ray_application(store: Path, backbone: str):
    """adapterlab's Ray Serve application (one replica) on a local 2-CPU cluster whose workers import this checkout."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from adapterlab.ray_serve import RayServeOptions, build_app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {
        "PYTHONPATH": str(Path(adapterlab.__file__).parents[1]), "HF_HUB_OFFLINE": "1"}})
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = RayServeOptions(store=str(store), backbone=backbone, replica_cpus=0.5, settings=SETTINGS)
        serve.run(build_app(options), name="conformance", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture
def client(served):
    """A client with the admin token (which the client routes take too)."""
    with httpx.Client(base_url=served.url, timeout=120, headers=ADMIN) as client:
        yield client


@pytest.fixture
def openai_client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="client", max_retries=0, timeout=120)



def greedy(engine: Engine, model: str, max_tokens: int, **prompt) -> str:
    adapter = None if model == engine.backbone.name else model
    return engine.generate([GenerationRequest(adapter, sampling=Sampling(max_tokens), **prompt)])[0].text


# --- the API's own routes ------------------------------------------------------------------------
def test_health_metrics_and_openapi(client, chat_engine):
    client.post("/v1/classify", json={"adapter": "sentiment/lora", "inputs": ["x"]})
    client.post("/v1/classify", json={"adapter": "sentiment/nope", "inputs": ["x"]})
    assert client.get("/health").json() == {"status": "ok", "backbone": chat_engine.backbone.name, "kind": "decoder",
                                            "batching": True}
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for line in ('adapterlab_requests_total{endpoint="/v1/classify",status="200"}',
                 'adapterlab_errors_total{endpoint="/v1/classify",status="404"}',
                 'adapterlab_request_seconds_bucket{endpoint="/v1/classify",le="+Inf"}',
                 "adapterlab_batch_rows_bucket{le=", "adapterlab_resident_adapters ", "adapterlab_cache_hits_total ",
                 "adapterlab_cache_misses_total ", "adapterlab_generations_running ",
                 'adapterlab_generations_total{finish_reason="cancelled"}'):
        assert line in metrics.text, line
    families = {family.name: family for family in text_string_to_metric_families(metrics.text)}  # well formed
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_info"} <= families.keys()
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths) >= {"/health", "/metrics", "/v1/adapters", "/v1/adapters/{name}", "/v1/classify",
                          "/v1/classify/batch", "/v1/generate", "/v1/models", "/v1/completions", "/v1/chat/completions"}
    assert set(paths["/v1/adapters"]["post"]["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert client.get("/docs").status_code == 200


def test_each_server_counts_in_its_own_registry_and_escapes_label_values():
    first, second = Metrics(), Metrics()
    endpoint = 'a "quoted" \\ path\nwith a newline'
    first.record(endpoint, 404, 0.2)
    [requests] = [f for f in text_string_to_metric_families(first.render()) if f.name == "adapterlab_requests"]
    assert [(s.labels, s.value) for s in requests.samples if s.name.endswith("_total")] == [
        ({"endpoint": endpoint, "status": "404"}, 1.0)]
    assert "adapterlab_requests_total{" not in second.render()


def test_classification_batches_and_zero_shot_answer_as_the_engine(client, chat_engine):
    for adapter in CLASSIFIERS:
        response = client.post("/v1/classify", json={"adapter": adapter, "inputs": TEXTS})
        assert response.status_code == 200 and response.json()["adapter"] == adapter, response.text
        for answer, expected in zip(response.json()["predictions"], chat_engine.predict(adapter, TEXTS)):
            assert_answer(answer, expected)
    pairs = [{"text": text, "text_pair": "a second text"} for text in TEXTS[:2]]
    response = client.post("/v1/classify", json={"adapter": "sentiment/other", "inputs": [TEXTS[0], *pairs], "top_k": 1})
    wanted = chat_engine.predict("sentiment/other", TEXTS[:1]) + chat_engine.predict("sentiment/other", TEXTS[:2],
                                                                           ["a second text"] * 2)
    for answer, prediction in zip(response.json()["predictions"], wanted):  # rows with and without a pair
        [best] = answer["scores"]
        assert abs(best["score"] - prediction.score) < BATCH_TOLERANCE and answer["label"] == best["label"] == prediction.label
    rows = [{"adapter": CLASSIFIERS[i % 2], "text": text} for i, text in enumerate(TEXTS)]
    rows.append({"adapter": None, "text": TEXTS[0], "labels": list(ZERO_SHOT)})
    expected = [chat_engine.predict(row["adapter"], [row["text"]])[0] for row in rows[:-1]]
    expected += chat_engine.predict_batch([Request(None, TEXTS[0], labels=ZERO_SHOT)])
    response = client.post("/v1/classify/batch", json={"rows": rows})
    for row, answer, prediction in zip(rows, response.json()["predictions"], expected):
        assert answer["adapter"] == row["adapter"]
        assert_answer(answer, prediction)
    zero_shot = client.post("/v1/classify", json={"adapter": None, "labels": list(ZERO_SHOT), "inputs": TEXTS[:2]})
    for answer, prediction in zip(zero_shot.json()["predictions"],
                                  chat_engine.predict_batch([Request(None, text, labels=ZERO_SHOT) for text in TEXTS[:2]])):
        assert_answer(answer, prediction)


def test_register_by_path_and_by_upload_then_delete(served, client, chat_engine, chat_adapters):
    store, spare = served.store, chat_adapters / "spare"

    def answers_as(reference: str) -> None:
        response = client.post("/v1/classify", json={"adapter": "new/first", "inputs": TEXTS})
        for answer, prediction in zip(response.json()["predictions"], chat_engine.predict(reference, TEXTS)):
            assert_answer(answer, prediction)

    shutil.copytree(spare / "new/first", store / "new" / ".incoming")
    (store / "new" / ".incoming").rename(store / "new/first")
    response = client.post("/v1/adapters", json={"path": "new/first"})
    assert response.status_code == 201 and response.json()["adapter"] == "new/first", response.text
    answers_as("new/first")
    listing = client.get("/v1/adapters").json()
    assert listing["backbone"] == chat_engine.backbone.name and "new/first" in listing["resident"]
    available = {item["adapter"]: item for item in listing["available"]}
    assert available.keys() == {*CLASSIFIERS, "e2e/lora", "e2e/prefix", "new/first"}
    assert available["new/first"]["resident"] and available["new/first"]["card"]["labels"] == ["negative", "positive"]
    for item in listing["available"]:  # the server's paths stay on the server
        recipe = item["card"]["recipe"]
        assert "path" not in recipe["data"] and "store" not in recipe["output"] and str(store) not in str(item)
    # The same name with other weights, uploaded, replaces it: answers change with it.
    files = folder_files(spare / "new/second")
    files["adapter/card.json"] = json.dumps({**json.loads(files["adapter/card.json"]), "name": "first"}).encode()
    for kind in ("tar", "zip"):
        response = client.post("/v1/adapters", files={"file": ("a", archive(files, kind))})
        assert response.status_code == 201 and response.json()["adapter"] == "new/first", response.text
    answers_as("new/second")
    assert client.delete("/v1/adapters/new/first").json() == {"deleted": "new/first"}
    response = client.post("/v1/classify", json={"adapter": "new/first", "inputs": TEXTS[:1]})
    assert response.status_code == 404 and response.json() == {"error": "no adapter 'new/first' in the store"}
    assert client.delete("/v1/adapters/new/first").status_code == 404
    assert "new/first" not in {item["adapter"] for item in client.get("/v1/adapters").json()["available"]}
    assert not (store / "new/first").exists() and not list(store.glob(".*")) and not list(store.glob("*/.*"))


def test_tokens_guard_the_routes(served):
    body = {"file": ("a.zip", b"x")}
    with httpx.Client(base_url=served.url, timeout=120) as client:
        missing = client.post("/v1/classify", json={"adapter": "sentiment/lora", "inputs": ["x"]})
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert missing.json() == {"error": "this endpoint needs 'Authorization: Bearer <token>'"}
        assert client.get("/v1/adapters", headers={"Authorization": "Bearer nope"}).status_code == 403
        assert client.post("/v1/adapters", files=body).status_code == 401
        assert client.post("/v1/adapters", files=body, headers=CLIENT).status_code == 403  # a client changes nothing
        assert client.delete("/v1/adapters/sentiment/lora").status_code == 401
        wrong = client.delete("/v1/adapters/sentiment/lora", headers={"Authorization": "Bearer guess"})
        assert wrong.status_code == 403 and (served.store / "sentiment/lora/card.json").is_file()
        for headers in (CLIENT, ADMIN):
            assert client.post("/v1/classify", json={"adapter": "sentiment/lora", "inputs": ["x"]},
                               headers=headers).status_code == 200
            assert client.get("/v1/adapters", headers=headers).status_code == 200
            assert client.get("/v1/models", headers=headers).status_code == 200
        unauthorized = client.post("/v1/completions", json={"model": "e2e/lora", "prompt": "x"})
        assert unauthorized.status_code == 401 and unauthorized.json()["error"]["type"] == "authentication_error"
        assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200


def test_refusals(served, client):
    store = served.store
    good = folder_files(store / "sentiment/lora")
    foreign = {**good, "adapter/card.json": json.dumps({**json.loads(good["adapter/card.json"]), "task": "other", "name": "a0",
                                                        "backbone": "elsewhere",
                                                        "backbone_fingerprint": "sha256:" + "0" * 64}).encode()}
    shutil.copytree(store / "sentiment/lora", store / "other" / "a0")
    (store / "other/a0/card.json").write_bytes(foreign["adapter/card.json"])

    def upload(files, kind="zip", links=()):
        return client.post("/v1/adapters", files={"file": ("adapter", archive(files, kind, links))})

    cases = [  # (response, status, part of the message)
        (client.post("/v1/classify", json={"adapter": "sentiment/nope", "inputs": ["x"]}), 404, "no adapter"),
        (client.post("/v1/classify", content=b'{"adapter": ', headers={"content-type": "application/json"}), 422,
         "not valid JSON"),
        (client.post("/v1/classify", json={"adapter": "sentiment/lora"}), 422, "inputs: Field required"),
        (client.post("/v1/classify", json={"adapter": "sentiment/lora", "inputs": ["x"], "topk": 1}), 422, "topk"),
        (client.post("/v1/classify", json={"adapter": None, "inputs": ["x"]}), 422, "needs its labels"),
        (client.post("/v1/classify", json={"adapter": "sentiment/lora", "inputs": ["x"] * 9}), 413, "9 inputs"),
        (client.post("/v1/classify", json={"adapter": "sentiment/lora", "inputs": ["x" * 4001]}), 413,
         "4,001 characters"),
        (client.post("/v1/classify/batch", json={"rows": [{"adapter": "sentiment/lora", "text": "x" * 4001}]}), 413,
         "characters"),
        (client.post("/v1/classify", json={"adapter": "other/a0", "inputs": ["x"]}), 409, "trained on backbone 'elsewhere'"),
        (client.post("/v1/adapters", json={"path": "other/a0"}), 409, "not on the loaded backbone"),
        (upload(foreign), 409, "trained on backbone 'elsewhere'"),
        (client.post("/v1/classify", json={"adapter": "../sentiment/lora", "inputs": ["x"]}), 400, "TASK/NAME"),
        (client.post("/v1/classify", json={"adapter": "sentiment/lora/x", "inputs": ["x"]}), 400, "TASK/NAME"),
        (client.post("/v1/classify", json={"adapter": "sentiment\\lora", "inputs": ["x"]}), 400, "TASK/NAME"),
        (client.post("/v1/adapters", json={"path": "../../etc"}), 400, "TASK/NAME"),
        (client.delete("/v1/adapters/sentiment/..%2F..%2Fstore"), 400, "TASK/NAME"),
        (client.delete("/v1/adapters/sentiment"), 400, "TASK/NAME"),
        (upload({**good, "adapter/adapter_model.bin": b"pickle"}), 415, "pickled"),
        (upload({**good, "adapter/head.pkl": b"pickle"}, "tar"), 415, "pickled"),
        (upload({**good, "adapter/adapter_model.safetensors": b"\x80\x04pickle"}), 422, "corrupt"),
        (upload({**good, "adapter/run.py": b"print()"}), 400, "holds only"),
        (upload({"../card.json": b"{}", **good}), 400, "outside its folder"),
        (upload({"/tmp/card.json": b"{}", **good}, "tar"), 400, "outside its folder"),
        (upload(good, "tar", links=("adapter/link",)), 400, "link"),
        (upload(good, "zip", links=("adapter/link",)), 400, "link"),
        (upload({name: data for name, data in good.items() if not name.endswith("card.json")}), 400, "missing card.json"),
        (client.post("/v1/adapters", files={"file": ("a.zip", b"not an archive")}), 400, "not a .zip or .tar"),
        (client.post("/v1/adapters", files={"file": ("a.zip", b"0" * 300_000)}), 413, "over 200,000 bytes"),
        (upload({**good, "adapter/README.md": b"0" * 300_000}), 413, "unpacks to more than"),
        (client.post("/v1/generate", json={"prompt": "hello", "max_new_tokens": 1000}), 413, "max_new_tokens"),
        (client.post("/v1/generate", json={"adapter": "sentiment/nope", "prompt": "x"}), 404, "no adapter"),
        (client.get("/v1/nothing"), 404, "Not Found"),
    ]
    for response, status, message in cases:
        assert response.status_code == status and message in response.json()["error"], (response.request.url,
                                                                                        response.text)
        assert "Traceback" not in response.text and str(store) not in response.text
    shutil.rmtree(store / "other")
    assert not list(store.glob(".*")) and not list(store.glob("*/.*"))  # no upload left half-written


def test_truncated_inputs_are_flagged_and_counted(client):
    long_text = "the food was cold and the service slow, " * 40  # far beyond the adapter's 128 tokens
    answers = client.post("/v1/classify", json={"adapter": "sentiment/lora", "inputs": [long_text, "fine"]}).json()
    assert [a["truncated"] for a in answers["predictions"]] == [True, False]
    count = lambda: float(next(line.split()[-1] for line in client.get("/metrics").text.splitlines()  # noqa: E731
                               if line.startswith("adapterlab_truncated_inputs_total ")))
    before = count()
    rows = [{"adapter": None, "text": long_text, "labels": ["a", "b"]}, {"adapter": "sentiment/other", "text": long_text}]
    assert client.post("/v1/classify/batch", json={"rows": rows}).status_code == 200
    assert count() == before + 2  # a Ray replica's count too, through the ingress


def test_generation_bare_and_under_an_adapter(client, chat_engine):
    for adapter in (None, "e2e/lora", "sentiment/lora", None):
        response = client.post("/v1/generate", json={"adapter": adapter, "prompt": "the movie was", "max_new_tokens": 6})
        wanted = greedy(chat_engine, adapter or chat_engine.backbone.name, 6, prompt="the movie was")
        assert response.status_code == 200 and response.json() == {"adapter": adapter, "text": wanted}, response.text


# --- the OpenAI-compatible routes ------------------------------------------------------------------
def test_models_list_the_backbone_and_every_adapter(openai_client, chat_engine):
    models = {model.id: model for model in openai_client.models.list()}
    assert models.keys() == {chat_engine.backbone.name, *CLASSIFIERS, "e2e/lora", "e2e/prefix"}
    assert models["e2e/lora"].owned_by == "adapterlab" and models["e2e/lora"].parent == chat_engine.backbone.name


def test_completion_and_chat_equal_the_engine_with_usage(openai_client, chat_engine):
    backbone = chat_engine.backbone.name
    plain = openai_client.completions.create(model=backbone, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert plain.choices[0].text == greedy(chat_engine, backbone, 6, prompt="Once upon a time")
    assert plain.usage.prompt_tokens == len(chat_engine.backbone.tokenizer("Once upon a time").input_ids)
    assert plain.usage.completion_tokens == 6 and plain.choices[0].finish_reason == "length"
    for model in ("e2e/lora", "e2e/prefix"):
        chat = openai_client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0)
        assert chat.choices[0].message.content == greedy(chat_engine, model, 8, text=MR)  # through the adapter's template
        assert chat.choices[0].message.role == "assistant" and chat.id.startswith("chatcmpl-")


def test_the_template_is_the_default_of_a_chat_and_an_option_of_a_completion(openai_client, chat_engine):
    """A chat to a generative adapter reaches it through its template (the last user message, after a system
    one, as `text`) unless it opts out; a completion's prompt is read as is unless it opts in."""
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}, *CHAT]
    answer = openai_client.chat.completions.create(model="e2e/lora", messages=chat, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content == greedy(chat_engine, "e2e/lora", 8, text=MR)
    assert answer.usage.prompt_tokens == len(chat_engine.prompt_ids(GenerationRequest("e2e/lora", text=MR),
                                                               chat_engine.servable("e2e/lora")))
    raw = openai_client.chat.completions.create(model="e2e/lora", messages=chat, max_tokens=8, temperature=0,
                                                extra_body={"adapterlab": {"template": False}})
    assert raw.choices[0].message.content == greedy(chat_engine, "e2e/lora", 8, messages=chat)
    for template, wanted in ((None, {"prompt": MR}), (True, {"text": MR})):
        completion = openai_client.completions.create(model="e2e/prefix", prompt=MR, max_tokens=6, temperature=0,
                                                      extra_body={"adapterlab": {"template": template}})
        assert completion.choices[0].text == greedy(chat_engine, "e2e/prefix", 6, **wanted)
    with pytest.raises(openai.BadRequestError, match="messages hold no user message"):
        openai_client.chat.completions.create(model="e2e/lora", messages=chat[:1], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="the backbone has no template"):
        openai_client.chat.completions.create(model=chat_engine.backbone.name, messages=CHAT, max_tokens=2,
                                              extra_body={"adapterlab": {"template": True}})


def test_streams_send_the_same_text_in_pieces(served, openai_client, chat_engine):
    stream = openai_client.chat.completions.create(model="e2e/lora", messages=CHAT, max_tokens=8, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"  # the role first
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(bool(piece) for piece in pieces) >= 2  # streamed, not sent whole
    assert "".join(pieces) == greedy(chat_engine, "e2e/lora", 8, text=MR)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens > 0  # the usage last, alone
    assert all(c.usage is None for c in chunks[:-1])
    completion = "".join(c.choices[0].text for c in openai_client.completions.create(
        model="e2e/prefix", prompt="Describe: name[Alimentum]", max_tokens=5, temperature=0, stream=True))
    assert completion == greedy(chat_engine, "e2e/prefix", 5, prompt="Describe: name[Alimentum]")
    body = {"model": "e2e/lora", "prompt": "Describe:", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body, headers=CLIENT, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(event.startswith("data: ") for event in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"


def test_a_classification_adapter_answers_with_its_label(openai_client, chat_engine):
    label = chat_engine.predict("sentiment/lora", ["great"])[0].label
    answer = openai_client.chat.completions.create(model="sentiment/lora", messages=[{"role": "user", "content": "great"}])
    assert answer.choices[0].message.content == label and answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens == len(chat_engine.backbone.tokenizer(label).input_ids)
    streamed = openai_client.completions.create(model="sentiment/lora", prompt="great", n=2, stream=True)
    assert sorted((c.choices[0].index, c.choices[0].text) for c in streamed if c.choices) == [(0, label), (1, label)]


def test_two_adapters_at_once_each_answer_their_own(openai_client, chat_engine):
    expected = {model: greedy(chat_engine, model, 8, text=MR) for model in ("e2e/lora", "e2e/prefix")}
    assert len(set(expected.values())) == 2
    answers, threads = {}, []
    for model in expected:
        ask = lambda m=model: answers.__setitem__(m, openai_client.chat.completions.create(  # noqa: E731
            model=m, messages=CHAT, max_tokens=8, temperature=0).choices[0].message.content)
        threads.append(threading.Thread(target=ask))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert answers == expected


def test_sampling_n_and_seed(openai_client):
    first = openai_client.completions.create(model="e2e/lora", prompt="Describe:", max_tokens=6, n=2, seed=3, temperature=1)
    again = openai_client.completions.create(model="e2e/lora", prompt="Describe:", max_tokens=6, n=2, seed=3, temperature=1)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]


def test_errors_in_openai_shape(openai_client, chat_engine):
    for model, stream in (("nope/nope", False), ("e2e/nope", True), ("nope", False)):
        with pytest.raises(openai.NotFoundError, match="does not exist") as missing:
            openai_client.chat.completions.create(model=model, messages=CHAT, max_tokens=4, stream=stream)
        assert missing.value.body["code"] == "model_not_found" and missing.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.UnprocessableEntityError):
        openai_client.completions.create(model="e2e/lora", prompt="x", temperature=5)
    with pytest.raises(openai.UnprocessableEntityError, match="top_k"):  # a field of no OpenAI schema
        openai_client.completions.create(model="e2e/lora", prompt="x", extra_body={"top_k": 3})
    with pytest.raises(openai.BadRequestError, match="best_of 3 is not supported"):
        openai_client.completions.create(model="e2e/lora", prompt="x", best_of=3)
    with pytest.raises(openai.BadRequestError, match="frequency_penalty 0.5 is not supported"):
        openai_client.chat.completions.create(model="e2e/lora", messages=CHAT, frequency_penalty=0.5)
    with pytest.raises(openai.BadRequestError, match="writes at most 480"):
        openai_client.completions.create(model="e2e/lora", prompt="x", max_tokens=481)
    with pytest.raises(openai.BadRequestError) as long:
        openai_client.completions.create(model="e2e/lora", prompt="word " * 600, max_tokens=4)
    assert long.value.body["code"] == "context_length_exceeded" and "512 tokens" in long.value.body["message"]


# --- a client that leaves --------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_client_that_leaves_cancels_its_generation(served, client, stream):
    """A client asks for 480 tokens and leaves once LEAVE_AT are written (seen in its stream, or in the
    backend's figures): its row is cancelled, far short of 480, and the decoder falls idle."""
    before = generation_figures(client)
    body = {"model": "e2e/lora", "prompt": "Once upon a time", "max_tokens": 480, "temperature": 0, "stream": stream}
    with leaving_client(served.url, "/v1/completions", body, CLIENT) as connection:
        if stream:
            received = b""
            while received.count(b'"text": "') - received.count(b'"text": ""') < LEAVE_AT:
                received += connection.recv(65536)
        else:
            wait_until(lambda: generation_figures(client)["tokens"] >= before["tokens"] + LEAVE_AT)
    wait_until(lambda: generation_figures(client)["running"] == 0)
    after = generation_figures(client)
    assert after["cancelled"] == before["cancelled"] + 1 and after["length"] == before["length"]
    assert after["tokens"] - before["tokens"] < 480 // 4


def generation_figures(client: httpx.Client) -> dict[str, float]:
    """The backend's generation figures from /metrics (after /health: a Ray replica's answer brings its figures)."""
    client.get("/health")
    lines = client.get("/metrics").text.splitlines()
    value = lambda prefix: float(next(line.split()[-1] for line in lines if line.startswith(prefix)))  # noqa: E731
    return {"running": value("adapterlab_generations_running "), "tokens": value("adapterlab_generated_tokens_total "),
            **{reason: value(f'adapterlab_generations_total{{finish_reason="{reason}"}}')
               for reason in ("cancelled", "length")}}


@contextmanager
def leaving_client(url: str, path: str, body: dict, headers: dict[str, str]):
    """A client that sends a request, then (leaving the block) closes its connection without waiting for the answer;
    yields the socket."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    data = json.dumps(body).encode()
    head = "".join(f"{key}: {value}\r\n" for key, value in headers.items())
    with socket.create_connection((host, port)) as connection:
        connection.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{head}"
                           f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        yield connection


def wait_until(condition, seconds: float = 120) -> None:
    """Wait for `condition()`; not holding within `seconds` (far beyond any step) is a failure."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.005)
