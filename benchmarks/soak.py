"""A soak of the HTTP server (JSON on stdout): N classification requests (default 100,000) from 64 clients over
1,000 adapters on MiniLM, while a churn client registers spare adapters (by upload and by path) and deletes
them. The adapters are random copies of two trained in a step (random_copies, benchmarks/_common.py): LoRA
copies of a sentiment adapter and prefix-tuning copies of a topic adapter, so that an answer from an adapter
of the other family shows by its labels. Reports requests/s, p50/p95/p99 latency, 5xx, wrong-adapter
answers (every answer's labels checked), wrong answers (a sample compared with an in-process engine on the
same files: label and scores), and the server's RSS at 10 % and 100 % of the run, after a warm-up that
loads every adapter once (the engine keeps up to 1,024 resident, so the run starts in its steady state).
Targets: no 5xx, no wrong answer, RSS growth under 10 % between those two points. Float32 on both sides.

    .venv/bin/python benchmarks/soak.py [--requests 100000] [--clients 64] [--adapters 1000]
"""

import argparse
import asyncio
import io
import itertools
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from _common import SERVE_TEXTS, provenance, random_copies, start_server

TOKEN = "soak-admin"
SPARE = 16  # adapters of each family that the churn client registers and deletes
ANSWER_TOLERANCE = 1e-4  # scores against the in-process engine (float32; batches of other composition)


def soak_store(root: Path, adapters: int) -> dict[str, list[str]]:
    """STORE (root/store) with `adapters` random copies, half of each family, and root/spare with the churn
    client's; every reference by its family ("sentiment": LoRA, "topic": prefix-tuning, "churn": the spares)."""
    from adapterlab.recipe import validate_recipe
    from adapterlab.training import train

    templates = {}
    for task, method in (("sentiment", {"name": "lora", "r": 8}), ("topic", {"name": "prefix_tuning",
                                                                          "num_virtual_tokens": 8})):
        recipe = validate_recipe({"task": task, "backbone": "minilm", "method": method,
                                  "data": {"path": f"demo:{task}", "k": 2}, "training": {"max_steps": 1},
                                  "output": {"store": str(root / "templates"), "name": "t"}})
        templates[task] = train(recipe, show_progress=False).adapter_path
    return {"sentiment": random_copies(templates["sentiment"], root / "store" / "sentiment", adapters // 2),
            "topic": random_copies(templates["topic"], root / "store" / "topic", adapters - adapters // 2),
            "churn": random_copies(templates["sentiment"], root / "spare" / "churn-sentiment", SPARE)
            + random_copies(templates["topic"], root / "spare" / "churn-topic", SPARE)}


@dataclass
class Tally:
    """What the clients saw."""

    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    wrong_adapter: int = 0
    unexpected: list[str] = field(default_factory=list)  # statuses other than 200 (and 404 for a churn adapter)
    sample: list[tuple[str, str, dict]] = field(default_factory=list)  # (adapter, text, answer)
    rss: dict[str, int] = field(default_factory=dict)
    churn: dict[str, int] = field(default_factory=dict)

    def count(self, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1


def request_of(index: int, refs: dict[str, list[str]]) -> list[tuple[str, str]]:
    """Request `index`'s rows (adapter, text), drawn from a generator seeded by `index`: one adapter and 1-3
    texts, or (one in ten) a batch of 4 rows of different adapters; one row in twenty names a churn one."""
    draw = random.Random(index)
    pick = lambda: draw.choice(refs["churn"] if draw.random() < 0.05 else refs[draw.choice(["sentiment", "topic"])])  # noqa: E731
    if draw.random() < 0.1:
        return [(pick(), draw.choice(SERVE_TEXTS)) for _ in range(4)]
    adapter = pick()
    return [(adapter, text) for text in draw.sample(SERVE_TEXTS, draw.randint(1, 3))]


async def client(http: httpx.AsyncClient, indices, args, refs, families: dict[str, set], tally: Tally,
                 server: psutil.Process) -> None:
    for index in indices:
        rows = request_of(index, refs)
        if len({adapter for adapter, _ in rows}) == 1 and index % 10:
            path, body = "/v1/classify", {"adapter": rows[0][0], "inputs": [text for _, text in rows]}
        else:
            path, body = "/v1/classify/batch", {"rows": [{"adapter": a, "text": t} for a, t in rows]}
        started = time.perf_counter()
        try:
            response = await http.post(path, json=body)
        except httpx.TransportError as error:
            tally.count(599)
            tally.unexpected.append(f"{path}: {type(error).__name__}")
            continue
        tally.latencies.append(time.perf_counter() - started)
        tally.count(response.status_code)
        note(response, rows, index, args, families, tally)
        tenth, done = max(1, args.requests // 10), len(tally.latencies)
        if done % tenth == 0 and done < args.requests:  # a leak shows as growth from tenth to tenth
            tally.rss[f"at_{100 * done // args.requests}_percent"] = server.memory_info().rss


def note(response: httpx.Response, rows: list[tuple[str, str]], index: int, args, families, tally: Tally) -> None:
    """Checks an answer: its status (404 only for a churn adapter, which may be away), each row's labels
    against its adapter's family; every `sample_every`-th request's rows kept for the comparison."""
    if response.status_code != 200:
        if not (response.status_code == 404 and any(adapter.startswith("churn-") for adapter, _ in rows)):
            tally.unexpected.append(f"{response.status_code}: {response.text[:200]}")
        return
    answers = response.json()["predictions"]
    for (adapter, text), answer in zip(rows, answers):
        if {score["label"] for score in answer["scores"]} != families[adapter.split("/")[0]]:
            tally.wrong_adapter += 1
        if index % args.sample_every == 0:
            tally.sample.append((adapter, text, answer))


async def churn(http: httpx.AsyncClient, store: Path, spare: Path, names: list[str], stop: asyncio.Event,
                tally: Tally) -> None:
    """Registers (by upload and by path) and deletes the spare adapters in turn until `stop`."""
    present, draw = set(), random.Random(0)
    for step in itertools.count():
        if stop.is_set():
            return
        name = draw.choice(names)
        if name in present:
            response, kind, expected = await http.delete(f"/v1/adapters/{name}"), "deleted", 200
            present.discard(name)
        elif step % 2:
            data = await asyncio.to_thread(zipped, spare / name)
            response = await http.post("/v1/adapters", files={"file": ("adapter.zip", data)})
            kind, expected = "uploaded", 201
        else:
            await asyncio.to_thread(copy_in, spare / name, store / name)
            response, kind, expected = await http.post("/v1/adapters", json={"path": name}), "registered", 201
        if response.status_code == 201:
            present.add(name)
        tally.churn[kind] = tally.churn.get(kind, 0) + 1
        if response.status_code != expected:
            tally.unexpected.append(f"churn {kind} {name}: {response.status_code} {response.text[:200]}")
        await asyncio.sleep(0.05)


def zipped(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for file in folder.iterdir():
            archive.write(file, f"adapter/{file.name}")
    return buffer.getvalue()


def copy_in(source: Path, target: Path) -> None:
    """A folder put into the live store under a hidden name, then renamed into place."""
    incoming = target.with_name(f".{target.name}.incoming")
    shutil.copytree(source, incoming)
    incoming.rename(target)


async def soak(url: str, root: Path, refs: dict[str, list[str]], families: dict[str, set], args,
               server: psutil.Process) -> tuple[Tally, float]:
    tally = Tally()
    limits = httpx.Limits(max_connections=args.clients + 1, max_keepalive_connections=args.clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        everything = refs["sentiment"] + refs["topic"]
        for start in range(0, len(everything), 64):  # warm-up: every adapter loaded once
            rows = [{"adapter": adapter, "text": SERVE_TEXTS[0]} for adapter in everything[start:start + 64]]
            (await http.post("/v1/classify/batch", json={"rows": rows})).raise_for_status()
        tally.rss["after_warm_up"] = server.memory_info().rss
        stop, indices = asyncio.Event(), iter(range(args.requests))  # shared: each index is taken once
        churner = asyncio.create_task(churn(http, root / "store", root / "spare", refs["churn"], stop, tally))
        started = time.perf_counter()
        await asyncio.gather(*(client(http, indices, args, refs, families, tally, server)
                               for _ in range(args.clients)))
        elapsed = time.perf_counter() - started
        tally.rss["at_100_percent"] = server.memory_info().rss
        stop.set()
        await churner
    return tally, elapsed


def wrong_answers(root: Path, sample: list[tuple[str, str, dict]]) -> int:
    """Sampled answers that differ from an in-process engine's on the same adapter files."""
    from adapterlab.engine import Engine

    engines = {"store": Engine("minilm", root / "store", dtype="float32"),
               "spare": Engine("minilm", root / "spare", dtype="float32")}
    by_adapter: dict[str, list[tuple[str, dict]]] = {}
    for adapter, text, answer in sample:
        by_adapter.setdefault(adapter, []).append((text, answer))
    wrong = 0
    for adapter, rows in by_adapter.items():
        engine = engines["spare" if adapter.startswith("churn-") else "store"]
        for (_, answer), expected in zip(rows, engine.predict(adapter, [text for text, _ in rows])):
            scores = {item["label"]: item["score"] for item in answer["scores"]}
            wrong += answer["label"] != expected.label or scores.keys() != expected.scores.keys() or \
                max(abs(scores[label] - expected.scores[label]) for label in scores) > ANSWER_TOLERANCE
    return wrong


def milliseconds(latencies: list[float]) -> dict:
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"p50_ms": round(1e3 * statistics.median(latencies), 2), "p95_ms": round(1e3 * cuts[94], 2),
            "p99_ms": round(1e3 * cuts[98], 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--sample-every", type=int, default=50, help="Every n-th request is compared with the engine.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="adapterlab-soak-", ignore_cleanup_errors=True) as temporary:
        root = Path(temporary)
        refs = soak_store(root, args.adapters)
        families = {task: set(json.loads((root / "templates" / task / "t" / "card.json").read_text())["labels"])
                    for task in ("sentiment", "topic")}
        families |= {f"churn-{task}": labels for task, labels in families.items()}
        process, url = start_server(root / "store", True, root / "server.log", "--dtype", "float32",
                                    "--admin-token", TOKEN)
        load_before = os.getloadavg()[0]
        try:
            tally, elapsed = asyncio.run(soak(url, root, refs, families, args, psutil.Process(process.pid)))
        finally:
            process.terminate()
            exit_code = process.wait(60)
        rss = tally.rss
        growth = rss["at_100_percent"] / rss["at_10_percent"] - 1
        wrong = wrong_answers(root, tally.sample)
        server_errors = sum(count for status, count in tally.statuses.items() if status >= 500)
        print(json.dumps({
            "benchmark": "soak", **provenance(), "backbone": "minilm", "requests": args.requests, "clients": args.clients,
            "adapters": args.adapters, "churn_adapters": len(refs["churn"]),
            "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "seconds": round(elapsed, 1), "requests_per_s": round(len(tally.latencies) / elapsed, 1),
            **milliseconds(tally.latencies), "statuses": dict(sorted(tally.statuses.items())),
            "server_errors": server_errors, "wrong_adapter": tally.wrong_adapter,
            "answers_compared": len(tally.sample), "wrong_answers": wrong, "churn": tally.churn,
            "unexpected": tally.unexpected[:20], "rss_mb": {k: round(v / 2**20, 1) for k, v in rss.items()},
            "rss_growth_10_to_100_percent": round(growth, 4), "server_exit_code": exit_code,
            "targets": {"server_errors": 0, "wrong_answers": 0, "wrong_adapter": 0, "rss_growth_max": 0.10},
            "targets_met": server_errors == 0 and wrong == 0 and tally.wrong_adapter == 0 and growth < 0.10
            and not tally.unexpected}, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
