"""What the server answered about the store survives its death: `adapterlab serve` (a tiny random BERT, on
loopback) SIGKILLed at random moments, often in the middle of a registration or deletion, while a client
registers adapters (from a path in the store and by upload), deletes them and asks them for labels; restarted
on the same store each time. Served afterwards: every adapter the client was told was registered (201) and
not since told deleted (200), and no other; an operation whose answer never came may have happened or not.
Each served adapter answers as the engine does in-process. And the answers wait for the disk: files and
folder entries are fsync'd before a 201 or a 200."""

import os
import random
import shutil
import signal
import threading
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from adapterlab.engine import Engine
from adapterlab.recipe import validate_recipe
from adapterlab.server import Settings, create_app
from adapterlab.store import adapter_folders
from adapterlab.training import train
from conftest import tiny_recipe
from server_processes import ServerProcess
from test_server import archive, assert_answer, copy_adapter, folder_files

NAMES = [f"crash/a{i}" for i in range(6)]  # each with weights of its own: a mix-up changes the answers
TEXTS = ["the soup was cold", "loved every minute", "please cancel my order"]
KILLS = 20
CHANGES = {"upload": 4, "path": 2, "delete": 3, "classify": 3}  # how often the client does each


@pytest.fixture(scope="module")
def spare(tiny_bert, tmp_path_factory) -> tuple[Path, dict]:
    """(a folder of adapters named NAMES, not served; each one's predictions for TEXTS by the engine)."""
    root = tmp_path_factory.mktemp("durability")
    train(validate_recipe(tiny_recipe(tiny_bert, root / "trained", output={"name": "t"}, training={"max_steps": 2})),
          show_progress=False)
    for seed, name in enumerate(NAMES):
        copy_adapter(root / "trained/sentiment/t", root / "spare", name, seed)
    engine = Engine(tiny_bert, root / "spare", dtype="float32")
    return root / "spare", {name: engine.predict(name, TEXTS) for name in NAMES}


class Ledger:
    """For each name, the states the store may be in by what the client was told: {True} (registered),
    {False} (deleted, or never registered), or both (the answer to the last change was lost)."""

    def __init__(self):
        self.states = {name: {False} for name in NAMES}
        self.lost: list[str] = []  # the kinds of operation a kill interrupted
        self.changed: set[str] = set()  # the names changed since the last restart

    def told(self, name: str, present: bool) -> None:
        self.states[name] = {present}
        self.changed.add(name)

    def unanswered(self, name: str, kind: str) -> None:
        self.lost.append(kind)
        if kind != "classify":
            self.states[name] = self.states[name] | {kind != "delete"}
            self.changed.add(name)


class Client:
    """Random changes and questions against one server until it dies; problems noted, not raised (a thread)."""

    def __init__(self, url: str, store: Path, spare: Path, expected: dict, ledger: Ledger, rng: random.Random):
        self.url, self.store, self.spare, self.expected, self.ledger, self.rng = url, store, spare, expected, ledger, rng
        self.changing, self.answered, self.problems = threading.Event(), threading.Semaphore(0), []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while True:
                name = self.rng.choice(NAMES)
                kind = self.rng.choices(list(CHANGES), list(CHANGES.values()))[0]
                if kind == "path" and self.ledger.states[name] != {False}:
                    kind = "upload"  # a folder is copied in by path only where none is
                try:
                    self.ask(http, kind, name)
                except httpx.TransportError:  # the server died meanwhile
                    self.ledger.unanswered(name, kind)
                    return
                self.answered.release()

    def ask(self, http: httpx.Client, kind: str, name: str) -> None:
        if kind != "classify":
            self.changing.set()
        if kind == "classify":
            response = http.post("/v1/classify", json={"adapter": name, "inputs": TEXTS})
            present = self.ledger.states[name] == {True}
            self.check(response.status_code == 404 if not present else
                       response.status_code == 200 and answers_as(response, self.expected[name]), name, response)
            return
        if kind == "delete":
            response = http.delete(f"/v1/adapters/{name}")
            self.check(response.status_code in (200, 404), name, response)
            self.ledger.told(name, False)
            return
        if kind == "path":
            task, leaf = name.split("/")
            incoming = self.store / task / f".{leaf}.incoming"
            shutil.copytree(self.spare / name, incoming)
            incoming.rename(self.store / name)
            response = http.post("/v1/adapters", json={"path": name})
        else:
            data = archive(folder_files(self.spare / name), self.rng.choice(["zip", "tar"]))
            response = http.post("/v1/adapters", files={"file": ("adapter", data)})
        self.check(response.status_code == 201, name, response)
        self.ledger.told(name, True)

    def check(self, good: bool, name: str, response: httpx.Response) -> None:
        if not good:
            self.problems.append((name, self.ledger.states[name], response.status_code, response.text))


def answers_as(response: httpx.Response, predictions: list) -> bool:
    try:
        for answer, prediction in zip(response.json()["predictions"], predictions, strict=True):
            assert_answer(answer, prediction)
    except AssertionError:
        return False
    return True


def served_as_told(url: str, store: Path, expected: dict, ledger: Ledger, every: bool) -> set[str]:
    """After a restart: the served adapters are those the ledger allows, and those changed since the last
    restart (`every`: all of them) answer as before."""
    listed = {entry["adapter"] for entry in httpx.get(f"{url}/v1/adapters", timeout=30).json()["available"]}
    assert listed == {f"{folder.parent.name}/{folder.name}" for folder in adapter_folders(store)}  # no broken one
    assert listed <= set(NAMES)
    for name in NAMES:
        assert (name in listed) in ledger.states[name], (name, ledger.states[name], listed)
        ledger.states[name] = {name in listed}  # what was unknown is known now
    asked = sorted(name for name in listed if every or name in ledger.changed)
    if asked:  # one request: each adapter loads once (the cost of a check), the texts share its batch
        rows = [{"adapter": name, "text": text} for name in asked for text in TEXTS]
        response = httpx.post(f"{url}/v1/classify/batch", json={"rows": rows}, timeout=60)
        assert response.status_code == 200, response.text
        answers = iter(response.json()["predictions"])
        for name in asked:
            for prediction in expected[name]:
                assert_answer(next(answers), prediction)
    ledger.changed.clear()
    return listed


def test_what_was_answered_survives_kill_9(spare, tiny_bert, tmp_path):
    spare_folder, expected = spare
    store, ledger, rng = tmp_path / "store", Ledger(), random.Random(1234)
    store.mkdir()
    arguments = ["--store", str(store), "--backbone", tiny_bert, "--dtype", "float32", "--allow-admin-without-token"]
    served, problems = [], []
    for kill in range(KILLS + 1):
        server = ServerProcess(arguments, tmp_path / f"server-{kill}.log").start()
        try:
            served.append(served_as_told(server.url, store, expected, ledger, every=kill in (0, KILLS)))
            if kill == KILLS:
                break
            client = Client(server.url, store, spare_folder, expected, ledger, random.Random(rng.random()))
            thread = threading.Thread(target=client.run)
            thread.start()
            if rng.random() < 0.5:  # in the middle of a change, most likely
                assert client.changing.wait(30)
                threading.Event().wait(rng.uniform(0, 0.03))
            else:  # after a few answers: paced by the client, not by the clock
                for _ in range(rng.randint(1, 4)):
                    assert client.answered.acquire(timeout=30)
            server.signal(signal.SIGKILL)
            thread.join(60)
            assert not thread.is_alive()
            problems += client.problems
        finally:
            server.kill()
        assert server.process.exitcode == -signal.SIGKILL
    assert not problems, problems
    assert sum(kind != "classify" for kind in ledger.lost) >= 4, ledger.lost  # kills that cut a change short
    assert len({frozenset(names) for names in served}) >= 4  # the store changed between restarts


@pytest.fixture
def fsynced(monkeypatch) -> list[str]:
    """The paths fsync'd from now on (files and folders), in order."""
    paths, fsync = [], os.fsync

    def noting(descriptor: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", noting)
    return paths


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names open files through /proc")
def test_answers_wait_for_the_disk(spare, tiny_bert, tmp_path, fsynced):
    """Before a 201: the adapter's files, its folder, its task folder (the rename into it) and the store
    (the staging folder's rename out of it, a new task folder); before a deletion's 200, the task folder."""
    spare_folder, _ = spare
    store = tmp_path / "store"
    store.mkdir()
    files = sorted(path.name for path in (spare_folder / NAMES[0]).iterdir())
    app = create_app(store, tiny_bert, Settings(dtype="float32", allow_admin_without_token=True))
    with TestClient(app) as client:
        upload = archive(folder_files(spare_folder / NAMES[0]), "zip")
        assert client.post("/v1/adapters", files={"file": ("adapter", upload)}).status_code == 201
        staged = [Path(path) for path in fsynced if Path(path).parent.name.startswith(".upload-")]
        assert sorted(path.name for path in staged) == files
        assert fsynced[-2:] == [str(store / "crash"), str(store)]
        fsynced.clear()

        task, leaf = NAMES[1].split("/")
        shutil.copytree(spare_folder / NAMES[1], store / task / f".{leaf}.incoming")
        (store / task / f".{leaf}.incoming").rename(store / NAMES[1])
        assert client.post("/v1/adapters", json={"path": NAMES[1]}).status_code == 201
        assert set(fsynced) == {str(store / NAMES[1] / name) for name in files} | {str(store / NAMES[1]),
                                                                                   str(store / "crash"), str(store)}
        assert fsynced[-2:] == [str(store / "crash"), str(store)]
        fsynced.clear()

        assert client.delete(f"/v1/adapters/{NAMES[0]}").status_code == 200
        assert fsynced == [str(store / "crash")]
