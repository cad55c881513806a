"""The local HTTP server on loopback, on a tiny random BERT (and a tiny random Llama for generation): a
concurrent load across 12+ adapters with adapters registered and removed meanwhile (no 5xx, every answer
equal to the engine's, from the adapter named), the admin switch, unexpected errors, a graceful
shutdown, full queues, the store's backbone, and generation equal to peft's. What every backend answers
alike (routes, refusals, tokens, metrics, OpenAI): test_http_conformance."""

import io
import json
import shutil
import stat
import tarfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from typer.testing import CliRunner

from adapterlab.backbones import load_backbone
from adapterlab.cli import app as cli_app
from adapterlab.engine import Engine, Request
from adapterlab.errors import AdapterlabError
from adapterlab.recipe import validate_recipe
from adapterlab.server import Settings, backbone_from_store, create_app
from adapterlab.training import train
from conftest import assert_answer, copy_adapter, tiny_recipe  # conftest also sets HF_HUB_OFFLINE=1

TEXTS = ["the soup was cold", "what a match last night", "please cancel my order", "loved every minute",
         "markets slid on rate fears"]
TRAINED = {  # task: (demo data, method); 2, 4 and 5 labels
    "sentiment": ("demo:sentiment", {"name": "lora", "r": 4}),
    "topic": ("demo:topic", {"name": "lora", "r": 8, "target_modules": ["query", "key", "value", "dense"]}),
    "intent": ("demo:intent", {"name": "prefix_tuning", "num_virtual_tokens": 4}),
}
SERVED = [f"{task}/a{i}" for task in TRAINED for i in range(4)]  # 12 adapters, each with its own weights
CHURN = [f"churn/{task}" for task in TRAINED]  # registered and removed while the load runs
ZERO_SHOT = ("food", "sport", "money")
ADMIN = {"Authorization": "Bearer admin-token"}
SETTINGS = Settings(max_inputs=64, max_chars=2000, max_upload_bytes=200_000, dtype="float32",
                    admin_token="admin-token")


def archive(files: dict[str, bytes], kind: str = "zip", links: tuple[str, ...] = ()) -> bytes:
    """A .zip or .tar of `files` (name: bytes), plus symbolic links named `links`."""
    buffer = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as packed:
            for name, data in files.items():
                packed.writestr(name, data)
            for name in links:
                info = zipfile.ZipInfo(name)
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                packed.writestr(info, "/etc/passwd")
    else:
        with tarfile.open(fileobj=buffer, mode="w") as packed:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                packed.addfile(info, io.BytesIO(data))
            for name in links:
                info = tarfile.TarInfo(name)
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                packed.addfile(info)
    return buffer.getvalue()


def folder_files(folder: Path, prefix: str = "adapter/") -> dict[str, bytes]:
    return {prefix + file.name: file.read_bytes() for file in folder.iterdir()}


@contextmanager
def running(app):
    """The app under uvicorn on a free loopback port, in a thread; yields (base URL, uvicorn server)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(60)


@pytest.fixture(scope="module")
def adapters(tiny_bert, tmp_path_factory):
    """(store with the SERVED adapters, spare folder with the CHURN adapters, expected answers)."""
    root = tmp_path_factory.mktemp("server")
    for task, (data, method) in TRAINED.items():
        raw = tiny_recipe(tiny_bert, root / "trained", task=task, method=method, data={"path": data},
                          training={"max_steps": 2}, output={"name": "t"})
        train(validate_recipe(raw), show_progress=False)
    for seed, reference in enumerate(SERVED):
        copy_adapter(root / "trained" / reference.split("/")[0] / "t", root / "store", reference, seed)
    for seed, reference in enumerate(CHURN, start=100):
        copy_adapter(root / "trained" / reference.split("/")[1] / "t", root / "spare", reference, seed)
    served = Engine(tiny_bert, root / "store", dtype="float32")
    spare = Engine(tiny_bert, root / "spare", dtype="float32")
    expected = {reference: dict(zip(TEXTS, served.predict(reference, TEXTS))) for reference in SERVED}
    expected |= {reference: dict(zip(TEXTS, spare.predict(reference, TEXTS))) for reference in CHURN}
    zero_shot = served.predict_batch([Request(None, text, labels=ZERO_SHOT) for text in TEXTS])
    return root / "store", root / "spare", {**expected, None: dict(zip(TEXTS, zero_shot))}


@pytest.fixture(scope="module")
def url(adapters):
    with running(create_app(adapters[0], settings=SETTINGS)) as (base_url, _):  # the backbone: the store's
        yield base_url



def test_concurrent_load_while_adapters_come_and_go(url, adapters):
    """32 clients x 50 requests across 15 adapters (2, 4, 5 labels, zero-shot rows too) while
    another client registers (from a path, by upload) and deletes adapters."""
    store, spare, expected = adapters
    names = SERVED + CHURN
    stop, changes = threading.Event(), []

    def change_adapters():
        with httpx.Client(base_url=url, timeout=60, headers=ADMIN) as client:
            for step in range(300):
                if stop.is_set():
                    break
                reference = CHURN[step % len(CHURN)]
                if (step // len(CHURN)) % 2 == 1:
                    changes.append(client.delete(f"/v1/adapters/{reference}").status_code)
                elif step % 2:
                    data = archive(folder_files(spare / reference), "zip" if step % 4 == 1 else "tar")
                    changes.append(client.post("/v1/adapters", files={"file": ("a", data)}).status_code)
                else:
                    shutil.copytree(spare / reference, store / "churn" / ".incoming")
                    (store / "churn" / ".incoming").rename(store / reference)
                    changes.append(client.post("/v1/adapters", json={"path": reference}).status_code)
                time.sleep(0.02)

    def load(worker: int) -> list:
        outcomes = []
        with httpx.Client(base_url=url, timeout=60) as client:
            for step in range(50):
                pick = [names[(worker * 7 + step * 3 + k) % len(names)] for k in range(3)]
                texts = [TEXTS[(worker + step + k) % len(TEXTS)] for k in range(3)]
                if step % 4 == 3:  # rows of several adapters, one of them zero-shot
                    rows = [{"adapter": a, "text": t} for a, t in zip(pick[:2], texts)]
                    rows.append({"adapter": None, "text": texts[2], "labels": list(ZERO_SHOT)})
                    response = client.post("/v1/classify/batch", json={"rows": rows})
                    outcomes.append(([row["adapter"] for row in rows], texts, response))
                else:
                    count = 1 + step % 3
                    response = client.post("/v1/classify", json={"adapter": pick[0], "inputs": texts[:count]})
                    outcomes.append(([pick[0]] * count, texts[:count], response))
        return outcomes

    changer = threading.Thread(target=change_adapters)
    changer.start()
    try:
        with ThreadPoolExecutor(32) as pool:
            outcomes = [outcome for result in pool.map(load, range(32)) for outcome in result]
    finally:
        stop.set()
        changer.join(60)
    assert len(outcomes) == 1600 and all(response.status_code < 500 for _, _, response in outcomes)
    answered = 0
    for references, texts, response in outcomes:
        if response.status_code == 404:  # only an adapter that was away at the time
            assert any(reference in CHURN and repr(reference) in response.json()["error"] for reference in references)
            continue
        assert response.status_code == 200, response.text
        for reference, text, answer in zip(references, texts, response.json()["predictions"]):
            assert_answer(answer, expected[reference][text])
            answered += 1
    assert answered > 2000
    assert len(changes) > 10 and set(changes) <= {200, 201}, changes
    with httpx.Client(base_url=url) as client:
        metrics = client.get("/metrics").text
    batches = float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("adapterlab_batch_rows_count")))
    assert batches < 1600  # concurrent requests shared batches


def test_admin_endpoints_are_off_without_an_admin_token_unless_allowed(adapters, tiny_bert):
    """Without an admin token the admin surface is off, unless allowed for local use (the tokens
    themselves: test_http_conformance)."""
    store, spare, _ = adapters
    body = {"file": ("a.zip", archive(folder_files(spare / "churn/intent")))}
    off = Settings(dtype="float32")
    with running(create_app(store, tiny_bert, off)) as (url, _), httpx.Client(base_url=url, headers=ADMIN) as client:
        refused = client.post("/v1/adapters", files=body)
        assert refused.status_code == 403 and "--admin-token" in refused.json()["error"]
        assert client.delete("/v1/adapters/sentiment/a0").status_code == 403 and (store / "sentiment/a0").is_dir()
    local = Settings(dtype="float32", allow_admin_without_token=True)
    with running(create_app(store, tiny_bert, local)) as (url, _), httpx.Client(base_url=url) as client:
        assert client.post("/v1/adapters", files=body).status_code == 201
        assert client.post("/v1/classify", json={"adapter": "churn/intent", "inputs": ["x"]}).status_code == 200
        assert client.delete("/v1/adapters/churn/intent").status_code == 200
        refused = client.post("/v1/generate", json={"prompt": "hello"})
        assert refused.status_code == 400 and "needs an LLM backbone" in refused.json()["error"]


def test_unexpected_errors_are_a_generic_500_and_the_connection_lives(tiny_bert, adapters):
    app = create_app(adapters[0], tiny_bert, settings=Settings(dtype="float32"))

    def broken(requests):
        raise RuntimeError("secret detail")

    app.state.backend.server.engine.predict_batch = broken
    with running(app) as (base_url, _), httpx.Client(base_url=base_url) as client:
        response = client.post("/v1/classify", json={"adapter": "sentiment/a0", "inputs": ["x"]})
        assert response.status_code == 500 and "secret" not in response.text
        assert response.json() == {"error": "internal server error (logged on the server)"}
        assert client.get("/health").status_code == 200


def test_shutdown_lets_requests_in_flight_finish(tiny_bert, adapters):
    app = create_app(adapters[0], tiny_bert, settings=Settings(dtype="float32"))
    engine = app.state.backend.server.engine
    predict_batch = engine.predict_batch
    engine.predict_batch = lambda requests: (time.sleep(0.3), predict_batch(requests))[1]  # a slow engine
    with running(app) as (base_url, server):
        def ask(text):
            return httpx.post(f"{base_url}/v1/classify", json={"adapter": "intent/a1", "inputs": [text]}, timeout=60)

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(ask, text) for text in TEXTS]
            deadline = time.monotonic() + 30
            while server.server_state.total_requests < len(TEXTS) and time.monotonic() < deadline:
                time.sleep(0.01)
            server.should_exit = True
            assert [future.result().status_code for future in futures] == [200] * len(TEXTS)


def test_a_full_queue_answers_503_and_the_queued_requests_finish(tiny_bert, adapters):
    app = create_app(adapters[0], tiny_bert, settings=Settings(max_queued_rows=4, max_wait_ms=0, dtype="float32"))
    server = app.state.backend.server
    busy, release = threading.Event(), threading.Event()
    predict_batch = server.engine.predict_batch
    server.engine.predict_batch = lambda requests: (busy.set(), release.wait(30), predict_batch(requests))[2]
    with running(app) as (base_url, _), ThreadPoolExecutor(2) as pool:
        def ask(rows):
            return httpx.post(f"{base_url}/v1/classify", json={"adapter": "intent/a1", "inputs": TEXTS[:rows]},
                              timeout=60)

        running_batch = pool.submit(ask, 3)
        assert busy.wait(30)  # the engine holds the first batch
        queued = pool.submit(ask, 3)
        deadline = time.monotonic() + 30
        while server.queued_rows < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = ask(2)  # 3 + 2 rows would pass the limit of 4
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "busy" in refused.json()["error"] and "limit 4" in refused.json()["error"]
        release.set()
        assert running_batch.result().status_code == queued.result().status_code == 200
        assert ask(3).status_code == 200 and server.queued_rows == 0  # drained: admitted again


def test_generation_has_its_own_bounded_queue(tiny_llama, tmp_path):
    app = create_app(tmp_path, tiny_llama, Settings(max_queued_generations=1, dtype="float32"))
    server = app.state.backend.server
    busy, release = threading.Event(), threading.Event()
    step = server.decoder.step
    server.decoder.step = lambda: (busy.set(), release.wait(30), step())[2]  # a generation that takes its time
    with running(app) as (base_url, _), ThreadPoolExecutor(1) as pool:
        ask = lambda: httpx.post(f"{base_url}/v1/generate", json={"prompt": "hi", "max_new_tokens": 2},  # noqa: E731
                                 timeout=60)
        first = pool.submit(ask)
        assert busy.wait(30)
        refused = ask()
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1" and "limit 1" in refused.text
        release.set()
        assert first.result().status_code == 200 and ask().status_code == 200


def test_backbone_comes_from_the_store(adapters, tmp_path, tiny_bert):
    store = adapters[0]
    assert backbone_from_store(store) == tiny_bert
    with pytest.raises(AdapterlabError, match="holds no adapters"):
        backbone_from_store(tmp_path)
    shutil.copytree(store / "sentiment/a0", tmp_path / "sentiment/a0")
    shutil.copytree(store / "topic/a0", tmp_path / "topic/a0")
    card = json.loads((tmp_path / "topic/a0/card.json").read_text())
    (tmp_path / "topic/a0/card.json").write_text(json.dumps({**card, "backbone": "other",
                                                             "backbone_fingerprint": "sha256:1"}))
    with pytest.raises(AdapterlabError, match=r"several backbones \(.*other"):
        backbone_from_store(tmp_path)
    result = CliRunner().invoke(cli_app, ["serve", "--store", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "holds no adapters" in result.output


def test_generation_bare_and_under_lora_and_prefix_adapters(tiny_llama, tmp_path):
    for name, method in (("lora", {"name": "lora", "r": 4}), ("prefix", {"name": "prefix_tuning", "num_virtual_tokens": 3})):
        raw = tiny_recipe(tiny_llama, tmp_path, method=method, training={"max_steps": 2, "lr": 0.05},
                          output={"name": name})
        train(validate_recipe(raw), show_progress=False)
    backbone = load_backbone(tiny_llama)
    encoded = backbone.tokenizer("the movie was", return_tensors="pt")

    def expected(model) -> str:
        out = model.generate(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                             max_new_tokens=6, do_sample=False, pad_token_id=backbone.tokenizer.pad_token_id)
        return backbone.tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)

    from peft import PeftModel

    wanted = {None: expected(backbone.model)}
    for name in ("lora", "prefix"):
        wanted[f"sentiment/{name}"] = expected(PeftModel.from_pretrained(load_backbone(tiny_llama).model,
                                                                         str(tmp_path / "sentiment" / name)))
    assert len(set(wanted.values())) == 3
    app = create_app(tmp_path, settings=Settings(dtype="float32"))
    with running(app) as (base_url, _), httpx.Client(base_url=base_url, timeout=60) as client:
        for adapter in [None, "sentiment/lora", "sentiment/prefix", None, "sentiment/lora"]:  # adapters leave no trace
            response = client.post("/v1/generate", json={"adapter": adapter, "prompt": "the movie was", "max_new_tokens": 6})
            assert response.status_code == 200 and response.json()["text"] == wanted[adapter], response.text
        response = client.post("/v1/classify", json={"adapter": "sentiment/prefix", "inputs": TEXTS[:2]})
        for answer, prediction in zip(response.json()["predictions"],
                                      Engine(tiny_llama, tmp_path, dtype="float32").predict("sentiment/prefix", TEXTS[:2])):
            assert_answer(answer, prediction)
        assert client.post("/v1/generate", json={"adapter": "sentiment/nope", "prompt": "x"}).status_code == 404


@pytest.mark.slow
def test_real_backbone_over_http_equals_the_engine(tmp_path):
    """MiniLM adapters trained on ../shared/data, served over HTTP, answer as the engine does."""
    from adapterlab.recipe import load_recipe
    from conftest import ROOT, shared

    for task, data in (("sst2", "sst2"), ("emotion", "emotion")):
        train(load_recipe(ROOT / "recipes/sst2-lora-minilm.yaml", [
            f"task={task}", f"data.path={shared(data)}", "data.k=4", "data.test_limit=8",
            "training.max_steps=3", f"output.store={tmp_path}", "output.name=a"]), show_progress=False)
    texts = ["a gorgeous, moving film", "I am so angry about the delay", "what a dull evening"]
    expected = Engine("minilm", tmp_path, dtype="float32")
    with running(create_app(tmp_path, settings=Settings(dtype="float32"))) as (url, _):
        with httpx.Client(base_url=url, timeout=60) as client:
            for adapter in ("sst2/a", "emotion/a"):
                answer = client.post("/v1/classify", json={"adapter": adapter, "inputs": texts})
                assert answer.status_code == 200, answer.text
                for got, want in zip(answer.json()["predictions"], expected.predict(adapter, texts)):
                    assert got["label"] == want.label
