"""adapterlab on Ray Serve: replicas that each hold one backbone and an engine, behind an ingress that
routes every request by the adapter it names.

    serve run adapterlab.ray_serve:build_app store=/shared/adapters replicas=2   # or: serve run deploy/ray-serve.yaml
    adapterlab serve --ray --replicas 2 --store /shared/adapters

- `AdapterReplica`: the single-process server's `LocalBackend` (engine, worker thread, mixed-batch
  batcher, decoder) in each replica. Adapters load through `@serve.multiplexed`, so Ray knows which
  replica holds which adapter and sends requests for it there; when Ray's LRU unloads one, the engine
  drops it too.
- `Ingress`: a `Backend` under the very application `adapterlab serve` runs (`api_app`: the same
  routes, bodies, tokens and error answers). It holds no backbone: it splits a request's rows by
  adapter and sends each group to the replicas with the adapter as the multiplexed model id; a
  stream's updates come back through Ray's streaming handle, and a client that leaves cancels its
  request on the replica.

The store is a folder every replica sees (a shared filesystem). Registering or deleting goes to one
replica; the others notice through the store: a request for a replaced adapter reloads it, a deleted
one gets 404, and every `store_check_seconds` each replica drops resident adapters deleted since.
"""

import asyncio
import io
import os
from contextlib import aclosing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import AsyncGenerator, BinaryIO

import ray
from fastapi import FastAPI
from prometheus_client.core import CounterMetricFamily
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from adapterlab.engine import GenerationRequest, Prediction
from adapterlab.server.app import api_app
from adapterlab.server.backend import Update
from adapterlab.server.bodies import BatchRow
from adapterlab.server.errors import ApiError
from adapterlab.server.local import LocalBackend
from adapterlab.server.metrics import Metrics
from adapterlab.server.settings import Settings
from adapterlab.server.worker import Server
from adapterlab.store import AdapterCard

ATTEMPTS = 3  # a request whose replica died is sent again, when answering it is idempotent
CHANGES = {"register", "remove"}  # not idempotent (the rest is: greedy generation writes the same text again)


class RayServeOptions(BaseModel):
    """The application's arguments (`serve run adapterlab.ray_serve:build_app KEY=VALUE`, a config
    file's `args`, or `adapterlab serve --ray`)."""

    model_config = ConfigDict(extra="forbid")
    store: str = Field(description="Adapter store folder; every replica must see it (a shared filesystem).")
    backbone: str | None = Field(None, description="Default: the backbone of the store's adapters.")
    replicas: int = Field(1, ge=1, description="Replicas, each with one backbone and engine (the minimum "
                          "when max_replicas is set).")
    max_replicas: int | None = Field(None, ge=1, description="Autoscale between replicas and this.")
    target_ongoing_requests: float = Field(16, gt=0, description="Requests per replica autoscaling aims at.")
    adapters_per_replica: int = Field(64, ge=1, description="Adapters each replica keeps loaded (Ray's "
                                      "max_num_models_per_replica and the engine's cache).")
    replica_cpus: float = Field(1, ge=0, description="CPUs reserved per replica.")
    replica_gpus: float = Field(0, ge=0, description="GPUs per replica (1: the backbone on its own GPU).")
    route_by_adapter: bool = Field(True, description="Off: any replica for any adapter (a baseline to measure "
                                   "multiplexed routing against).")
    store_check_seconds: float = Field(2.0, gt=0, description="How often replicas drop adapters deleted "
                                       "from the store.")
    settings: dict = Field({}, description="`Settings` of the server (batching, limits, tokens, device, dtype).")

    @field_validator("settings")
    @classmethod
    def _known_settings(cls, value: dict) -> dict:
        unknown = sorted(set(value) - {field.name for field in fields(Settings)})
        if unknown:
            raise ValueError(f"unknown server settings: {', '.join(unknown)}")
        return value


@dataclass
class Reply:
    """A replica's answer, with its engine figures for the ingress's /metrics."""

    value: object
    figures: dict


@dataclass
class AdapterSlot:
    """What Ray's multiplexer keeps per adapter; Ray calls `__del__` when its LRU unloads the adapter."""

    server: Server
    folder: Path
    dropped: bool = False

    def __del__(self):  # Ray runs this on a thread of its own: the engine is left to its worker thread
        if not self.dropped:
            self.dropped = True
            self.server.worker.submit(self.server.engine.unload, str(self.folder)).result()


@serve.deployment(max_ongoing_requests=256)
class AdapterReplica:
    """One backbone and its engine: the local backend (the single-process server's batcher: rows of any
    adapters in one forward; its decoder: generations of any adapters in one batch)."""

    async def __init__(self, options: RayServeOptions):
        self.backend = LocalBackend.open(options.store, options.backbone, Settings(**options.settings))
        self.server = self.backend.server
        self.server.engine.max_adapters = options.adapters_per_replica
        await self.server.start()
        self.versions: dict[Path, tuple[int, int] | None] = {}  # card.json as each adapter was loaded

        async def load(name: str) -> AdapterSlot:
            folder = self.server.adapter_folder(name)
            await self.server.on_worker(self._load, folder)
            return AdapterSlot(self.server, folder)

        self.adapter = serve.multiplexed(max_num_models_per_replica=options.adapters_per_replica)(load)
        self.store_check = asyncio.create_task(self._drop_deleted(options.store_check_seconds))

    def _load(self, folder: Path) -> None:
        """On the worker: check (404, 409, 422) and load the adapter as the store holds it now (the engine may
        hold an older copy: one this replica registered before another replaced it)."""
        self.server.checked_card(folder)
        self.versions[folder] = _version(folder)
        self.server.engine.unload(str(folder))
        self.server.load(folder)

    async def _current(self, name: str) -> None:
        """The request's adapter loaded, as the store now holds it (reloaded if it was replaced)."""
        slot = await self.adapter(name)
        if _version(slot.folder) != self.versions.get(slot.folder):
            await self.server.on_worker(self._reload, slot.folder)

    def _reload(self, folder: Path) -> None:
        if (folder / "card.json").is_file():
            self._load(folder)
        else:
            self.server.engine.unload(str(folder))

    async def _drop_deleted(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            await self.server.on_worker(self._unload_deleted)

    def _unload_deleted(self) -> None:
        for name in self.server.engine.resident():
            if not (self.server.store / name / "card.json").is_file():
                self.server.engine.unload(name)

    def _figures(self) -> dict:
        """On the worker (the engine is the worker's alone): this replica's figures for the ingress's /metrics
        and adapter list."""
        engine = self.server.engine
        return {**self.server.metrics.figures(), "resident": len(engine.resident()), **engine.stats,
                "adapters": engine.resident(), "replica": serve.get_replica_context().replica_id.unique_id,
                "pid": os.getpid()}

    async def call(self, method: str, *args) -> Reply | ApiError:
        """`method` of the local backend (see `Backend`), under the request's multiplexed adapter when it
        classifies or generates (loaded first, through Ray's multiplexer)."""
        try:
            name = serve.get_multiplexed_model_id()
            if name and method in {"classify", "generate"}:
                await self._current(name)
            value = await getattr(self.backend, method)(*args)
            return Reply(value, await self.server.on_worker(self._figures))
        except ApiError as error:
            return error

    async def stream(self, requests: list[GenerationRequest]) -> AsyncGenerator[Update | ApiError | None, None]:
        """The local backend's stream under the request's multiplexed adapter: first None (accepted) or the
        ApiError that refused it, then the updates as the decoder writes them."""
        try:
            name = serve.get_multiplexed_model_id()
            if name:
                await self._current(name)
            updates = await self.backend.stream(requests)
        except ApiError as error:
            yield error
            return
        yield None
        async with aclosing(updates):
            async for update in updates:
                yield update


class ReplicaFigures:
    """An ingress's per-replica figures and resent requests, collected into its metrics' registry."""

    def __init__(self, ingress: "Ingress"):
        self.ingress = ingress

    def collect(self):
        replicas = list(self.ingress.figures.values())
        for key, name, description in (
                ("misses", "adapterlab_replica_adapter_loads", "Adapter loads (engine cache misses) per replica, "
                 "as its last answer reported them."),
                ("batches", "adapterlab_replica_batches", "Engine batches per replica (rows of any adapters "
                 "together), as its last answer reported them.")):
            family = CounterMetricFamily(name, description, labels=["replica", "pid"])
            for figures in replicas:
                family.add_metric([figures["replica"], str(figures["pid"])], figures[key])
            yield family
        yield CounterMetricFamily("adapterlab_resent_requests", "Requests sent to another replica after theirs died.",
                                  value=self.ingress.resent)


@serve.deployment(max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The `Backend` of the HTTP API on Ray (the same application as `adapterlab serve`): it holds no backbone,
    and routes each adapter's rows to the replicas by the adapter's name (Ray Serve model multiplexing)."""

    def __init__(self, replicas: DeploymentHandle, options: RayServeOptions):
        self.replicas, self.options = replicas, options
        self.settings, self.metrics, self.store = Settings(**options.settings), Metrics(), Path(options.store)
        self.figures: dict[str, dict] = {}  # replica id → its latest figures
        self.resent = 0  # requests sent again after their replica died
        self.backbone_name: str | None = None
        self.metrics.registry.register(ReplicaFigures(self))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return api_app(self, title="adapterlab on Ray Serve", summary="Many adapters on one frozen backbone, "
                         "over replicas.")

    async def describe(self) -> dict:
        return await self.call(None, "describe")

    async def backbone(self) -> str:
        if self.backbone_name is None:
            self.backbone_name = await self.call(None, "backbone")
        return self.backbone_name

    async def classify(self, rows: list[BatchRow]) -> list[Prediction]:
        """Answers in row order; each adapter's rows go together to a replica that holds it."""
        groups: dict[str | None, list[int]] = {}
        for index, row in enumerate(rows):
            groups.setdefault(row.adapter, []).append(index)
        answers = await asyncio.gather(*(self.call(adapter, "classify", [rows[i] for i in indices])
                                         for adapter, indices in groups.items()))
        predictions: list = [None] * len(rows)
        for indices, answer in zip(groups.values(), answers):
            for index, prediction in zip(indices, answer):
                predictions[index] = prediction
        return predictions

    async def card(self, adapter: str) -> AdapterCard:
        return await self.call(adapter, "card", adapter)

    async def count_tokens(self, texts: list[str]) -> list[int]:
        return await self.call(None, "count_tokens", texts)

    async def generate(self, requests: list[GenerationRequest]) -> list[Update]:
        return await self.call(requests[0].adapter, "generate", requests)

    async def stream(self, requests: list[GenerationRequest]) -> AsyncGenerator[Update, None]:
        """The replica's updates as it writes them (through Ray's streaming handle)."""
        events = self._handle(requests[0].adapter, stream=True).stream.remote(requests)
        try:
            refusal = await anext(events)
        except asyncio.CancelledError:
            events.cancel()
            raise
        if refusal is not None:
            raise refusal
        return _relayed(events)

    async def resident(self) -> list[str]:
        """The adapters some replica holds, as its latest answer reported them."""
        return sorted({name for figures in self.figures.values() for name in figures["adapters"]})

    async def register(self, path: str | None, archive: BinaryIO | None) -> AdapterCard:
        upload = None if archive is None else io.BytesIO(await asyncio.to_thread(archive.read))
        return await self.call(path, "register", path, upload)

    async def remove(self, adapter: str) -> None:
        await self.call(adapter, "remove", adapter)

    def _handle(self, adapter: str | None, stream: bool = False) -> DeploymentHandle:
        multiplexed = adapter if adapter is not None and self.options.route_by_adapter else ""
        return self.replicas.options(multiplexed_model_id=multiplexed, stream=stream)

    async def call(self, adapter: str | None, method: str, *args):
        """`method` of the backend on a replica chosen by Ray for `adapter`. A call whose replica died on the
        way is sent again (Ray routes around the dead replica), except a register or remove (503); one
        whose awaiting task is cancelled (its client left) is cancelled on the replica too."""
        for attempt in range(1, ATTEMPTS + 1):
            response = self._handle(adapter).call.remote(method, *args)
            try:
                reply = await response
                break
            except RayActorError:
                if method in CHANGES or attempt == ATTEMPTS:
                    raise ApiError(503, "a replica went away while answering; retry shortly", {"Retry-After": "1"})
                self.resent += 1
            except asyncio.CancelledError:
                response.cancel()
                raise
        if isinstance(reply, ApiError):
            raise reply
        latest = self.figures.get(reply.figures["replica"])
        if latest is None or _progress(reply.figures) >= _progress(latest):  # replies can overtake each other
            self.figures[reply.figures["replica"]] = reply.figures
        return reply.value

    def render_metrics(self) -> str:
        """Prometheus text: the ingress's requests and latencies, and the replicas' figures (summed, and per
        replica: `ReplicaFigures`) as their latest answers reported them."""
        self.metrics.add_up(list(self.figures.values()))
        return self.metrics.render()


async def _relayed(events: DeploymentResponseGenerator) -> AsyncGenerator[Update, None]:
    """A replica's stream; closed before its end (the client left), the replica's generation is cancelled."""
    finished = False
    try:
        async for update in events:
            yield update
        finished = True
    finally:
        if not finished:
            events.cancel()


def build_app(options: RayServeOptions) -> serve.Application:
    """The application: `options.replicas` replicas (or autoscaling up to max_replicas) behind the ingress."""
    scaling = ({"autoscaling_config": {"min_replicas": options.replicas, "max_replicas": options.max_replicas,
                                       "target_ongoing_requests": options.target_ongoing_requests}}
               if options.max_replicas else {"num_replicas": options.replicas})
    replicas = AdapterReplica.options(
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus}, **scaling)
    return Ingress.bind(replicas.bind(options), options)


def serve_on_ray(options: RayServeOptions, address: str | None, host: str, port: int) -> None:
    """Deploy on the cluster at `address` (None: RAY_ADDRESS, else a local one) and serve until stopped."""
    ray.init(address=address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(options), name="adapterlab", route_prefix="/", blocking=True)


def _progress(figures: dict) -> int:
    """How far a replica's counters had run when it reported them."""
    return figures["hits"] + figures["misses"] + figures["batches"]


def _version(folder: Path) -> tuple[int, int] | None:
    """Which adapter is at `folder` now: a replacement is a new folder moved into place, a new card.json."""
    try:
        info = (folder / "card.json").stat()
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_mtime_ns
