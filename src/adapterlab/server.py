"""The HTTP server (`adapterlab serve`): one engine behind FastAPI, with dynamic batching and live
adapter changes.

The engine is not thread-safe, so every engine call (batches, loading, unloading, generation) runs on
one worker thread, in submission order; the event loop only parses, queues and answers. Concurrent
classification requests are gathered for a short window (bounded by time and rows) and answered by
one `Engine.predict_batch` call whatever adapters they name; a request's rows stay together.
Registering and deleting adapters go through the same worker, so a running batch finishes with the
adapters it resolved and the next batch sees the change.
"""

import asyncio
import logging
import shutil
import stat
import tarfile
import tempfile
import time
import uuid
import zipfile
from bisect import bisect_left
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, BinaryIO, Callable, NamedTuple

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from adapterlab.backbones import Backbone, load_backbone
from adapterlab.engine import Engine, Prediction, Request
from adapterlab.errors import AdapterlabError
from adapterlab.store import AdapterCard, adapter_folders, list_adapters, read_card, verify

log = logging.getLogger("adapterlab.server")

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "head.safetensors", "card.json", "README.md"}
PICKLED = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass
class Settings:
    """Batching and limits (the `adapterlab serve` options)."""

    max_wait_ms: float = 2.0  # how long a batch's first request waits for company
    max_batch_rows: int = 256  # a batch closes once it holds this many rows
    batching: bool = True  # off: one request, one forward (the benchmark's baseline)
    max_inputs: int = 256  # rows per request
    max_chars: int = 20_000  # per text, text pair, label or prompt
    max_labels: int = 64  # zero-shot labels per row
    max_new_tokens: int = 256
    max_upload_bytes: int = 64 << 20
    max_body_bytes: int = 32 << 20  # any other request body


class ApiError(Exception):
    """An answer for the client: a status and a message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# --- request bodies ------------------------------------------------------------------------------
class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored


class TextInput(Body):
    text: str
    text_pair: str | None = None


class ClassifyBody(Body):
    adapter: str | None = Field(None, description="TASK/NAME in the store; null: zero-shot with `labels`.")
    inputs: list[str | TextInput] = Field(min_length=1)
    labels: list[str] | None = Field(None, description="Zero-shot labels (with adapter null).")
    top_k: int | None = Field(None, ge=1, description="Only the k best scores per input.")


class BatchRow(Body):
    adapter: str | None = None
    text: str
    text_pair: str | None = None
    labels: list[str] | None = None


class BatchBody(Body):
    rows: list[BatchRow] = Field(min_length=1)
    top_k: int | None = Field(None, ge=1)


class GenerateBody(Body):
    adapter: str | None = Field(None, description="A LoRA or prefix adapter of the LLM; null: the bare backbone.")
    prompt: str
    max_new_tokens: int = Field(32, ge=1)


class RegisterBody(Body):
    path: str = Field(description="TASK/NAME of an adapter folder already copied into the store.")


# --- metrics -------------------------------------------------------------------------------------
class Histogram:
    def __init__(self, bounds: tuple[float, ...]):
        self.bounds, self.counts, self.sum = bounds, [0] * (len(bounds) + 1), 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def lines(self, labels: str = "") -> list[str]:
        """Samples with `labels` ('key="value",' each) prepended to the bucket bounds."""
        cumulative, lines = 0, []
        for bound, count in zip((*self.bounds, "+Inf"), self.counts):
            cumulative += count
            lines.append(f'_bucket{{{labels}le="{bound}"}} {cumulative}')
        labels = f"{{{labels.rstrip(',')}}}" if labels else ""
        return lines + [f"_sum{labels} {self.sum}", f"_count{labels} {cumulative}"]


class Metrics:
    """Counted on the event loop; the engine figures are a snapshot the worker publishes."""

    def __init__(self):
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency: dict[str, Histogram] = {}
        self.batch_rows = Histogram(BATCH_BUCKETS)
        self.engine = {"resident": 0, "hits": 0, "misses": 0, "evictions": 0}

    def record(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[endpoint, status] += 1
        self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def render(self) -> str:
        """The Prometheus text format."""
        requests = self.requests.items()
        out = _family("adapterlab_requests_total", "counter", "HTTP requests by endpoint and status.",
                      [f'{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in requests])
        out += _family("adapterlab_errors_total", "counter", "HTTP answers with status >= 400.",
                       [f'{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in requests if s >= 400])
        out += _family("adapterlab_request_seconds", "histogram", "Request latency.",
                       [line for e, h in self.latency.items() for line in h.lines(f'endpoint="{e}",')])
        out += _family("adapterlab_batch_rows", "histogram", "Rows per engine batch.", self.batch_rows.lines())
        out += _family("adapterlab_resident_adapters", "gauge", "Adapters loaded in the engine.",
                       [f" {self.engine['resident']}"])
        for name in ("hits", "misses", "evictions"):
            out += _family(f"adapterlab_cache_{name}_total", "counter", f"Engine adapter cache {name}.",
                           [f" {self.engine[name]}"])
        return "\n".join(out) + "\n"


def _family(name: str, kind: str, description: str, samples: list[str]) -> list[str]:
    """A metric family; each sample is its labels (and _bucket/_sum/_count suffix) and value."""
    return [f"# HELP {name} {description}", f"# TYPE {name} {kind}"] + [name + sample for sample in samples]


# --- the server ----------------------------------------------------------------------------------
@dataclass
class Job:
    """One classification request on its way through a batch."""

    requests: list[Request]  # adapters named by their folders in the store
    future: asyncio.Future
    arrived: float

    def folders(self) -> set[Path]:
        return {Path(request.adapter) for request in self.requests if request.adapter is not None}


class Server:
    """The engine, its worker thread and the batcher; the routes below call it."""

    def __init__(self, store: str | Path, backbone: str | None = None, settings: Settings | None = None):
        self.store = Path(store).resolve()
        self.settings = settings or Settings()
        self.engine = Engine(backbone or backbone_from_store(self.store), self.store)
        self.store.mkdir(parents=True, exist_ok=True)
        self.metrics = Metrics()
        self.generator: Backbone | None = None  # a second backbone for generation under peft adapters

    async def start(self) -> None:
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="adapterlab-engine")
        self.queue: asyncio.Queue[Job | None] = asyncio.Queue()
        self.batcher = asyncio.create_task(self._batch_loop())

    async def stop(self) -> None:
        """Answer every queued request, then stop the worker."""
        self.queue.put_nowait(None)
        await self.batcher
        self.worker.shutdown(wait=True)

    async def on_worker(self, function: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self.worker, function, *args)

    # --- names and limits (on the event loop) ----------------------------------------------------
    def adapter_folder(self, name: str) -> Path:
        """STORE/TASK/NAME for a client's TASK/NAME; anything that could leave the store is refused."""
        parts = name.split("/")
        if len(parts) != 2 or not all(map(_plain, parts)):
            raise ApiError(400, f"adapter {name!r}: name adapters TASK/NAME, each part a plain name "
                                "(no '/', '\\', '..' or leading '.')")
        return self.store / parts[0] / parts[1]

    def check_size(self, count: int, *texts: str | None) -> None:
        if count > self.settings.max_inputs:
            raise ApiError(413, f"{count} inputs in one request; the limit is {self.settings.max_inputs}")
        longest = max((len(text) for text in texts if text is not None), default=0)
        if longest > self.settings.max_chars:
            raise ApiError(413, f"an input holds {longest:,} characters; the limit is {self.settings.max_chars:,}")

    # --- classification --------------------------------------------------------------------------
    async def classify(self, rows: list[BatchRow]) -> list[Prediction]:
        """Answers for rows (each with its own adapter, or zero-shot labels), through the batcher."""
        self.check_size(len(rows), *(text for row in rows for text in (row.text, row.text_pair, *(row.labels or ()))))
        requests = [self._engine_request(row) for row in rows]
        loop = asyncio.get_running_loop()
        job = Job(requests, loop.create_future(), loop.time())
        self.queue.put_nowait(job)
        return await job.future

    def _engine_request(self, row: BatchRow) -> Request:
        if row.adapter is None:
            if not row.labels:
                raise ApiError(422, "a row without an adapter needs its labels (zero-shot)")
            if len(row.labels) > self.settings.max_labels or len(set(row.labels)) != len(row.labels):
                raise ApiError(422, f"zero-shot labels must be distinct, at most {self.settings.max_labels}")
            return Request(None, row.text, row.text_pair, tuple(row.labels))
        if row.labels:
            raise ApiError(422, "labels are for zero-shot rows (adapter null)")
        return Request(str(self.adapter_folder(row.adapter)), row.text, row.text_pair)

    async def _batch_loop(self) -> None:
        """Batch after batch on the worker, until the queue closes (None)."""
        closing = False
        while not closing:
            first = await self.queue.get()
            if first is None:
                break
            jobs, closing = await self._gather(first)
            self.metrics.batch_rows.observe(sum(len(job.requests) for job in jobs))
            try:
                outcomes = await self.on_worker(self._answer_batch, jobs)
            except Exception as error:  # a bug, not bad input: the batch's requests get a 500
                outcomes = [error] * len(jobs)
            for job, outcome in zip(jobs, outcomes):
                if not job.future.done():  # done: its client went away
                    (job.future.set_exception if isinstance(outcome, Exception) else job.future.set_result)(outcome)

    async def _gather(self, first: Job) -> tuple[list[Job], bool]:
        """`first` and the jobs that join it until it has waited max_wait_ms or max_batch_rows are in
        (jobs queued during the previous batch join at once); and whether the queue closed."""
        jobs, rows = [first], len(first.requests)
        deadline = first.arrived + self.settings.max_wait_ms / 1000
        while self.settings.batching and rows < self.settings.max_batch_rows:
            try:
                job = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    job = await asyncio.wait_for(self.queue.get(), deadline - asyncio.get_running_loop().time())
                except TimeoutError:
                    break
            if job is None:
                return jobs, True
            jobs.append(job)
            rows += len(job.requests)
        return jobs, False

    def _answer_batch(self, jobs: list[Job]) -> list:
        """On the worker: each job's predictions, or its error. A job naming a missing adapter fails
        alone; the others share one predict_batch call."""
        outcomes: list = [self._missing(job) for job in jobs]
        ready = [i for i, outcome in enumerate(outcomes) if outcome is None]
        for i, outcome in zip(ready, self._predict([jobs[i] for i in ready])):
            outcomes[i] = outcome
        self._publish_engine_figures()
        return outcomes

    def _missing(self, job: Job) -> ApiError | None:
        missing = sorted(_name(folder) for folder in job.folders() if not (folder / "card.json").is_file())
        return ApiError(404, f"no adapter {missing[0]!r} in the store") if missing else None

    def _predict(self, jobs: list[Job]) -> list:
        """Predictions per job from one forward; if that fails, each job alone, so that only the
        faulty one fails (a damaged adapter, one for another backbone)."""
        if not jobs:
            return []
        try:
            predictions = iter(self.engine.predict_batch([request for job in jobs for request in job.requests]))
            return [[next(predictions) for _ in job.requests] for job in jobs]
        except Exception as error:
            if len(jobs) > 1:
                return [self._predict([job])[0] for job in jobs]
            return [self._problem(jobs[0], error)]

    def _problem(self, job: Job, error: Exception) -> Exception:
        if not isinstance(error, AdapterlabError):
            return error  # a bug: logged, and a generic 500 for the client
        for folder in job.folders():
            try:
                self._checked_card(folder)
            except ApiError as problem:
                return problem
        return ApiError(400, self._scrub(str(error)))

    def _scrub(self, message: str) -> str:
        """The client's TASK/NAME in a message, not the server's paths."""
        return message.replace(f"{self.store}/", "")

    def _checked_card(self, folder: Path, name: str | None = None) -> AdapterCard:
        """The card of a complete adapter for this backbone: 404, 400 or 409 otherwise."""
        name = name or _name(folder)
        if not (folder / "card.json").is_file():
            raise ApiError(404, f"no adapter {name!r} in the store")
        problems = [problem.replace(f"{folder}/", "") for problem in verify(folder)]
        if problems:
            raise ApiError(400, f"adapter {name!r} is unusable: {'; '.join(problems)}")
        card = read_card(folder)
        if not (_plain(card.task) and _plain(card.name)):
            raise ApiError(400, f"adapter {name!r}: its card's task and name must be plain names")
        if card.backbone_fingerprint != self.engine.backbone.fingerprint:
            raise ApiError(409, f"adapter {name!r} was trained on backbone {card.backbone!r} "
                                f"({card.backbone_fingerprint[:19]}…), not on the served backbone "
                                f"{self.engine.backbone.name!r} ({self.engine.backbone.fingerprint[:19]}…)")
        return card

    def _publish_engine_figures(self) -> None:
        self.metrics.engine = {"resident": len(self.engine.resident()), **self.engine.stats}

    # --- registering and removing adapters -------------------------------------------------------
    def check_in_place(self, name: str) -> Path:
        """An adapter folder copied into the store as TASK/NAME, checked (its card must agree)."""
        folder = self.adapter_folder(name)
        card = self._checked_card(folder)
        if (card.task, card.name) != (folder.parent.name, folder.name):
            raise ApiError(400, f"adapter {name!r}: its card names it {card.task}/{card.name}")
        return folder

    def stage_upload(self, upload: BinaryIO) -> tuple[Path, Path]:
        """(The unpacked adapter in a hidden folder of the store, where it belongs), checked."""
        staging = Path(tempfile.mkdtemp(dir=self.store, prefix=".upload-"))
        try:
            try:
                unpack(upload, staging, self.settings.max_upload_bytes)
            except ApiError:
                raise
            except Exception as error:  # archive readers fail in many ways on damaged input
                raise ApiError(400, f"the archive could not be read ({type(error).__name__})") from None
            if not (staging / "card.json").is_file():
                raise ApiError(400, "the upload is unusable: missing card.json")
            card = self._checked_card(staging, "the upload")
            return staging, self.store / card.task / card.name
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def install(self, staging: Path | None, target: Path) -> AdapterCard:
        """On the worker: move a staged adapter into place (replacing one of the same name), and
        load it; if it does not load, the store is left as it was."""
        previous = None
        if staging is not None:
            target.parent.mkdir(exist_ok=True)
            if target.exists():
                previous = target.rename(target.with_name(f".{target.name}.replaced-{uuid.uuid4().hex[:8]}"))
            staging.rename(target)
        self.engine.unload(str(target))  # a replaced adapter must not answer from the cache
        try:
            self.engine.servable(str(target))
        except AdapterlabError as error:
            if staging is not None:
                target.rename(staging)
                if previous is not None:
                    previous.rename(target)
            raise ApiError(400, self._scrub(str(error))) from None
        finally:
            self._publish_engine_figures()
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        return read_card(target)

    def remove(self, folder: Path) -> None:
        """On the worker, so after every batch already submitted: unload, then delete atomically
        (renamed to a hidden name first: the store never shows half an adapter)."""
        if not (folder / "card.json").is_file():
            raise ApiError(404, f"no adapter {_name(folder)!r} in the store")
        self.engine.unload(str(folder))
        trash = folder.rename(folder.with_name(f".{folder.name}.deleted-{uuid.uuid4().hex[:8]}"))
        shutil.rmtree(trash, ignore_errors=True)
        self._publish_engine_figures()

    # --- generation ------------------------------------------------------------------------------
    def generate(self, folder: Path | None, prompt: str, max_new_tokens: int) -> str:
        """On the worker: greedy generation by the bare backbone, or under a peft adapter applied
        to a second copy of the backbone (peft injects layers, which the engine's must never get)."""
        if folder is None:
            return _generate(self.engine.backbone.model, self.engine.backbone.tokenizer, prompt, max_new_tokens)
        self._checked_card(folder)
        from peft import PeftModel

        if self.generator is None:
            self.generator = load_backbone(self.engine.backbone.name)
        try:
            model = PeftModel.from_pretrained(self.generator.model, str(folder), is_trainable=False)
            text = _generate(model, self.generator.tokenizer, prompt, max_new_tokens)
            if not model.active_peft_config.is_prompt_learning:  # prefixes add no layers: nothing to undo
                model.unload()
            return text
        except Exception:
            self.generator = None  # it may still hold the adapter's layers: load a clean one next time
            raise


def _generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    encoded = tokenizer(prompt, return_tensors="pt")
    output = model.generate(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def _name(folder: Path) -> str:
    """TASK/NAME of a folder of the store."""
    return f"{folder.parent.name}/{folder.name}"


def _plain(name: str) -> bool:
    """A name that cannot leave its folder (the recipe's rule for task and adapter names)."""
    return bool(name) and not name.startswith(".") and not any(c in name for c in "/\\\0")


def backbone_from_store(store: Path) -> str:
    """The backbone the store's adapters share (when the server is not told one)."""
    backbones = {card.backbone_fingerprint: card.backbone for card in list_adapters(store)}
    if not backbones:
        raise AdapterlabError(f"store {store} holds no adapters: name the backbone with --backbone")
    if len(backbones) > 1:
        names = ", ".join(sorted(f"{name} ({fingerprint[:19]}…)" for fingerprint, name in backbones.items()))
        raise AdapterlabError(f"store {store} holds adapters of several backbones ({names}): choose one with --backbone")
    return next(iter(backbones.values()))


# --- uploads -------------------------------------------------------------------------------------
class Entry(NamedTuple):
    name: str
    is_dir: bool
    is_plain_file: bool
    size: int
    open: Callable[[], BinaryIO]


def unpack(upload: BinaryIO, target: Path, max_bytes: int) -> None:
    """Write a .zip or .tar of one adapter folder into `target`: only the adapter's own files, no
    pickles, no links, nothing outside the folder; checked in full before anything is written."""
    if zipfile.is_zipfile(upload):
        upload.seek(0)
        with zipfile.ZipFile(upload) as archive:
            _write_entries([Entry(i.filename, i.is_dir(), not stat.S_ISLNK(i.external_attr >> 16), i.file_size,
                                  lambda i=i: archive.open(i)) for i in archive.infolist()], target, max_bytes)
        return
    upload.seek(0)
    try:
        archive = tarfile.open(fileobj=upload, mode="r:*")
    except tarfile.TarError:
        raise ApiError(400, "the upload is not a .zip or .tar archive") from None
    with archive:
        _write_entries([Entry(m.name, m.isdir(), m.isfile(), m.size, lambda m=m: archive.extractfile(m))
                        for m in archive.getmembers()], target, max_bytes)


def _write_entries(entries: list[Entry], target: Path, max_bytes: int) -> None:
    files = [entry for entry in entries if not entry.is_dir]
    for entry in entries:
        path = PurePosixPath(entry.name)
        if path.is_absolute() or ".." in path.parts or "\\" in entry.name:
            raise ApiError(400, f"archive entry {entry.name!r} points outside its folder")
        if not (entry.is_dir or entry.is_plain_file):
            raise ApiError(400, f"archive entry {entry.name!r} is a link or a device: plain files only")
        if not entry.is_dir and entry.name.lower().endswith(PICKLED):
            raise ApiError(415, f"archive entry {entry.name!r} holds pickled weights: adapterlab reads safetensors only")
        if not entry.is_dir and path.name not in ADAPTER_FILES:
            raise ApiError(400, f"archive entry {entry.name!r}: an adapter folder holds only "
                                f"{', '.join(sorted(ADAPTER_FILES))}")
    names = [PurePosixPath(entry.name).name for entry in files]
    if len({PurePosixPath(entry.name).parent for entry in files}) > 1 or len(set(names)) < len(names):
        raise ApiError(400, "the archive must hold one adapter folder (its files at the top or in one folder)")
    if sum(entry.size for entry in files) > max_bytes:
        raise ApiError(413, f"the archive unpacks to more than {max_bytes:,} bytes")
    for entry, name in zip(files, names):
        with entry.open() as source, open(target / name, "xb") as destination:
            shutil.copyfileobj(source, destination)


# --- the application -----------------------------------------------------------------------------
router = APIRouter()


def _server(request: HttpRequest) -> Server:
    return request.app.state.server


ServerDep = Annotated[Server, Depends(_server)]


@router.get("/health")
async def health(server: ServerDep) -> dict:
    backbone = server.engine.backbone
    return {"status": "ok", "backbone": backbone.name, "kind": backbone.kind, "batching": server.settings.batching}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(server: ServerDep) -> PlainTextResponse:
    """Prometheus text format."""
    return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/adapters")
async def adapters(server: ServerDep) -> dict:
    """The store's adapters (cards included), and which are resident in the engine."""
    resident = await server.on_worker(server.engine.resident)
    cards = await asyncio.to_thread(_cards, server.store)
    return {"backbone": server.engine.backbone.name, "resident": resident,
            "available": [{"adapter": name, "resident": name in resident, "card": card.model_dump(mode="json")}
                          for name, card in cards]}


def _cards(store: Path) -> list[tuple[str, AdapterCard]]:
    cards = []
    for folder in adapter_folders(store):
        try:
            cards.append((f"{folder.parent.name}/{folder.name}", read_card(folder)))
        except AdapterlabError:  # a broken folder is not available; `adapterlab adapters verify` names it
            continue
    return cards


REGISTER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": RegisterBody.model_json_schema()},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "A .zip or .tar of one adapter folder."}}}}}}}


@router.post("/v1/adapters", status_code=201, openapi_extra=REGISTER_BODY)
async def register(request: HttpRequest, server: ServerDep) -> dict:
    """Register an adapter, checked and loaded: a folder already in the store (JSON {"path":
    "TASK/NAME"}), or an uploaded archive (multipart field "file"), moved atomically to
    STORE/TASK/NAME after its card (replacing an adapter of that name)."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async with request.form(max_files=1, max_fields=0) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ApiError(422, 'send the archive as the multipart field "file"')
            staging, target = await asyncio.to_thread(server.stage_upload, upload.file)
    else:
        body = RegisterBody.model_validate_json(await request.body())
        staging, target = None, await asyncio.to_thread(server.check_in_place, body.path)
    try:
        card = await server.on_worker(server.install, staging, target)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return {"adapter": f"{card.task}/{card.name}", "card": card.model_dump(mode="json")}


@router.delete("/v1/adapters/{name:path}")
async def delete(name: str, server: ServerDep) -> dict:
    """Stop serving an adapter and delete it from the store; requests naming it get 404 after."""
    await server.on_worker(server.remove, server.adapter_folder(name))
    return {"deleted": name}


@router.post("/v1/classify")
async def classify(body: ClassifyBody, server: ServerDep) -> dict:
    """Label inputs with one adapter, or zero-shot (`adapter` null, `labels` given)."""
    rows = [BatchRow(adapter=body.adapter, labels=body.labels,
                     **({"text": item} if isinstance(item, str) else item.model_dump())) for item in body.inputs]
    predictions = await server.classify(rows)
    return {"adapter": body.adapter, "predictions": [_answer(p, body.top_k) for p in predictions]}


@router.post("/v1/classify/batch")
async def classify_batch(body: BatchBody, server: ServerDep) -> dict:
    """Label rows that each name their own adapter (or are zero-shot)."""
    predictions = await server.classify(body.rows)
    return {"predictions": [{"adapter": row.adapter, **_answer(p, body.top_k)}
                            for row, p in zip(body.rows, predictions)]}


@router.post("/v1/generate")
async def generate(body: GenerateBody, server: ServerDep) -> dict:
    """Greedy continuation of a prompt (LLM backbones), under an adapter or by the bare backbone."""
    if body.max_new_tokens > server.settings.max_new_tokens:
        raise ApiError(413, f"max_new_tokens {body.max_new_tokens}; the limit is {server.settings.max_new_tokens}")
    server.check_size(1, body.prompt)
    backbone = server.engine.backbone
    if backbone.kind != "decoder":
        raise ApiError(400, f"generation needs an LLM backbone; {backbone.name!r} is an encoder")
    folder = server.adapter_folder(body.adapter) if body.adapter else None
    text = await server.on_worker(server.generate, folder, body.prompt, body.max_new_tokens)
    return {"adapter": body.adapter, "text": text}


def _answer(prediction: Prediction, top_k: int | None) -> dict:
    ranked = sorted(prediction.scores.items(), key=lambda item: item[1], reverse=True)[:top_k]
    return {"label": prediction.label, "score": prediction.score,
            "scores": [{"label": label, "score": score} for label, score in ranked]}


# --- errors, metrics and body limits -------------------------------------------------------------
def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _invalid(errors: list[dict]) -> JSONResponse:
    if errors and errors[0]["type"] == "json_invalid":
        return _error(422, f"the body is not valid JSON ({errors[0]['ctx']['error']})")
    where = lambda error: ".".join(str(part) for part in error["loc"])  # noqa: E731
    return _error(422, "; ".join(f"{where(error)}: {error['msg']}" for error in errors[:5]))


async def _error_answer(request: HttpRequest, error: Exception) -> JSONResponse:
    """Every expected error as {"error": message} (`Gate` answers the unexpected ones)."""
    if isinstance(error, ApiError):
        return _error(error.status, str(error))
    if isinstance(error, HTTPException):
        return _error(error.status_code, str(error.detail))
    return _invalid(error.errors())


class Gate:
    """Pure ASGI middleware: times and counts every request by route and status, stops reading a
    body past its limit (413: no request can exhaust memory), and answers an unexpected error with
    a generic 500, its traceback logged here only (answered, not raised: the connection stays up)."""

    def __init__(self, app, settings: Settings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, received = time.perf_counter(), None, 0
        upload = scope["method"] == "POST" and scope["path"] == "/v1/adapters"
        limit = self.settings.max_upload_bytes if upload else self.settings.max_body_bytes

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, f"request body over {limit:,} bytes")
            return message

        async def noting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, noting_send)
        except Exception:
            log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            if status is not None:  # the answer had started: nothing more can be sent
                raise
            await _error(500, "internal server error (logged on the server)")(scope, receive, noting_send)
        finally:
            route = scope.get("route")
            self.metrics.record(route.path if route else "unmatched", status or 500, time.perf_counter() - started)


def create_app(store: str | Path, backbone: str | None = None, settings: Settings | None = None) -> FastAPI:
    """The application; the backbone loads now, the worker and batcher start with the app."""
    server = Server(store, backbone, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.start()
        yield
        await server.stop()  # uvicorn lets requests in flight finish first; then the queue drains

    app = FastAPI(title="adapterlab", summary="Many adapters on one frozen backbone, over HTTP.", lifespan=lifespan)
    app.state.server = server
    app.include_router(router)
    for error_type in (ApiError, HTTPException, RequestValidationError, ValidationError):
        app.add_exception_handler(error_type, _error_answer)
    app.add_middleware(Gate, settings=server.settings, metrics=server.metrics)
    return app


def serve(store: str | Path, backbone: str | None, host: str, port: int, settings: Settings) -> None:
    uvicorn.run(create_app(store, backbone, settings), host=host, port=port, log_level="info")
