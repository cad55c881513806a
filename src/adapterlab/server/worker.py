"""`Server`: the engine, its worker thread and the batcher.

The engine is not thread-safe, so every engine call (batches, loading, unloading, decode steps) runs on
one worker thread, in submission order; the event loop only parses, queues and answers. Generation is
a loop of decode steps on that thread (rows of any adapters in one batch, joining between steps), so a
classification batch waits for one step at most. Concurrent
classification requests are gathered for a short window (bounded by time and rows) and answered by
one `Engine.predict_batch` call whatever adapters they name; a request's rows stay together.
Registering and deleting adapters go through the same worker, so a running batch finishes with the
adapters it resolved and the next batch sees the change.
"""

import asyncio
import shutil
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncGenerator, BinaryIO, Callable

from adapterlab.engine import Engine, GenerationRequest, Prediction, Request
from adapterlab.generation import Sequence
from adapterlab.errors import AdapterlabError
from adapterlab.names import name_problem
from adapterlab.server.backend import Update
from adapterlab.server.bodies import BatchRow
from adapterlab.server.durability import synced_folders, synced_tree
from adapterlab.server.errors import ApiError
from adapterlab.server.metrics import Metrics
from adapterlab.server.settings import Settings
from adapterlab.server.uploads import unpack
from adapterlab.store import (AdapterCard, BackboneMismatch, StoreError, list_adapters, read_card, swap_into_place,
                              verify)


@dataclass
class Job:
    """One classification request on its way through a batch."""

    requests: list[Request]  # adapters named by their folders in the store
    future: asyncio.Future
    arrived: float

    def folders(self) -> set[Path]:
        return {Path(request.adapter) for request in self.requests if request.adapter is not None}


class Server:
    """The engine, its worker thread, the batcher and the decoder; `LocalBackend` calls it."""

    def __init__(self, store: str | Path, backbone: str | None = None, settings: Settings | None = None):
        self.store = Path(store).resolve()
        self.settings = settings or Settings()
        self.engine = Engine(backbone or backbone_from_store(self.store), self.store, device=self.settings.device,
                             dtype=self.settings.dtype, max_device_bytes=self.settings.max_adapter_bytes)
        self.store.mkdir(parents=True, exist_ok=True)
        self.metrics = Metrics()
        self.decoder = self.engine.decoder()  # the running generation batch, stepped on the worker
        self.listeners: dict[Sequence, tuple[asyncio.Queue, int]] = {}  # where each sequence's updates go

    async def start(self) -> None:
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="adapterlab-engine")
        self.queue: asyncio.Queue[Job | None] = asyncio.Queue()
        self.queued_rows = 0  # rows in self.queue, not yet in a batch
        self.batcher = asyncio.create_task(self._batch_loop())
        self.wakeup = asyncio.Event()
        self.generation = asyncio.create_task(self._generation_loop())

    async def stop(self) -> None:
        """Answer every queued request, then stop the worker."""
        self.queue.put_nowait(None)
        await self.batcher
        self.generation.cancel()
        self.worker.shutdown(wait=True)

    async def on_worker(self, function: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self.worker, function, *args)

    # --- names and limits (on the event loop) ----------------------------------------------------
    def adapter_folder(self, name: str) -> Path:
        """STORE/TASK/NAME for a client's TASK/NAME; anything that could leave the store is refused."""
        parts = name.split("/")
        if len(parts) != 2 or any(name_problem(part) for part in parts):
            raise ApiError(400, f"adapter {name!r}: name adapters TASK/NAME; each part {name_problem('')}")
        return self.store / parts[0] / parts[1]

    # --- classification --------------------------------------------------------------------------
    async def classify(self, rows: list[BatchRow]) -> list[Prediction]:
        """Answers for rows (each with its own adapter, or zero-shot labels), through the batcher."""
        requests = [self._engine_request(row) for row in rows]
        if self.queued_rows and self.queued_rows + len(requests) > self.settings.max_queued_rows:
            raise ApiError(503, f"the server is busy: {self.queued_rows} rows wait for the engine (limit "
                                f"{self.settings.max_queued_rows}); retry shortly", {"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        job = Job(requests, loop.create_future(), loop.time())
        self.queue.put_nowait(job)
        self.queued_rows += len(requests)
        return await job.future

    def _engine_request(self, row: BatchRow) -> Request:
        if row.adapter is None:
            if not row.labels:
                raise ApiError(422, "a row without an adapter needs its labels (zero-shot)")
            if len(row.labels) > self.settings.max_labels or len(set(row.labels)) != len(row.labels):
                raise ApiError(422, f"zero-shot labels must be distinct, at most {self.settings.max_labels}")
            if not all(label.strip() for label in row.labels):
                raise ApiError(422, "zero-shot labels must not be blank")
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
            rows = sum(len(job.requests) for job in jobs)
            self.queued_rows -= rows
            self.metrics.batch_rows.observe(rows)
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
            answers = self.engine.predict_batch([request for job in jobs for request in job.requests])
            self.metrics.truncated += sum(answer.truncated for answer in answers)
            predictions = iter(answers)
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
                self.checked_card(folder)
            except ApiError as problem:
                return problem
        return ApiError(_status(error), self._scrub(str(error)))

    def _scrub(self, message: str) -> str:
        """The client's TASK/NAME in a message, not the server's paths."""
        return message.replace(f"{self.store}/", "")

    def checked_card(self, folder: Path, name: str | None = None) -> AdapterCard:
        """The card of a complete adapter: 404, 422 or 400 otherwise. Whether it fits the served backbone is
        the store's check, made as the engine loads it (409)."""
        name = name or _name(folder)
        if not (folder / "card.json").is_file():
            raise ApiError(404, f"no adapter {name!r} in the store")
        problems = [problem.replace(f"{folder}/", "") for problem in verify(folder)]
        if problems:
            raise ApiError(422, f"adapter {name!r} is unusable: {'; '.join(problems)}")
        card = read_card(folder)
        if name_problem(card.task) or name_problem(card.name):
            raise ApiError(400, f"adapter {name!r}: its card's task and name must be plain names")
        return card

    def _publish_engine_figures(self) -> None:
        self.metrics.engine = {"resident": len(self.engine.resident()), **self.engine.stats}

    # --- registering and removing adapters -------------------------------------------------------
    def check_in_place(self, name: str) -> Path:
        """An adapter folder copied into the store as TASK/NAME, checked (its card must agree) and fsync'd."""
        folder = self.adapter_folder(name)
        card = self.checked_card(folder)
        if (card.task, card.name) != (folder.parent.name, folder.name):
            raise ApiError(400, f"adapter {name!r}: its card names it {card.task}/{card.name}")
        synced_tree(folder)  # copied in by someone else: its files may still be in the page cache only
        return folder

    def stage_upload(self, upload: BinaryIO) -> tuple[Path, Path]:
        """(The unpacked adapter in a hidden folder of the store, where it belongs), checked."""
        staging = Path(tempfile.mkdtemp(dir=self.store, prefix=".upload-"))
        try:
            unpack(upload, staging, self.settings.max_upload_bytes)
            if not (staging / "card.json").is_file():
                raise ApiError(400, "the upload is unusable: missing card.json")
            card = self.checked_card(staging, "the upload")
            return staging, self.store / card.task / card.name
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def install(self, staging: Path | None, target: Path) -> AdapterCard:
        """On the worker: move a staged adapter into place (replacing one of the same name), and
        load it; if it does not load, the store is left as it was. Either way the store is on disk
        before the answer (a 201 survives a crash)."""
        if staging is not None:  # afterwards staging holds the adapter it replaced, if any (the caller removes it)
            target.parent.mkdir(exist_ok=True)
            swap_into_place(staging, target)
        self.engine.unload(str(target))  # a replaced adapter must not answer from the cache
        try:
            self.load(target)
        except ApiError:
            if staging is not None:
                if staging.exists():
                    swap_into_place(staging, target)
                else:
                    target.rename(staging)
            raise
        finally:  # the renames (and a new task folder) are changes of these two folders
            synced_folders(target.parent, self.store)
        return read_card(target)

    def load(self, folder: Path) -> None:
        """On the worker: an adapter ready to serve (the store's checks: 409 for one of another backbone,
        422 or 400 for one that cannot be served)."""
        try:
            self.engine.servable(str(folder))
        except AdapterlabError as error:
            raise ApiError(_status(error), self._scrub(str(error))) from None
        finally:
            self._publish_engine_figures()

    def remove(self, folder: Path) -> None:
        """On the worker, so after every batch already submitted: unload, then delete atomically
        (renamed to a hidden name first: the store never shows half an adapter)."""
        if not (folder / "card.json").is_file():
            raise ApiError(404, f"no adapter {_name(folder)!r} in the store")
        self.engine.unload(str(folder))
        trash = folder.rename(folder.with_name(f".{folder.name}.deleted-{uuid.uuid4().hex[:8]}"))
        synced_folders(folder.parent)  # a 200 for the deletion survives a crash
        shutil.rmtree(trash, ignore_errors=True)
        self._publish_engine_figures()

    # --- generation ------------------------------------------------------------------------------
    async def stream(self, requests: list[GenerationRequest]) -> AsyncGenerator[Update, None]:
        """Queue requests for the decoder (at most max_queued_generations waiting or running: 503 beyond;
        refusals are raised here), then their `Update`s as they advance, a step at a time. Closing the
        iterator before every request has finished (its client left) cancels the rest."""
        if self.engine.backbone.kind != "decoder":
            raise ApiError(400, f"generation needs an LLM backbone; {self.engine.backbone.name!r} is an encoder")
        limit = self.settings.max_queued_generations
        if len(self.listeners) + len(requests) > limit:
            raise ApiError(503, f"the server is busy: {len(self.listeners)} generations wait for the engine (limit "
                                f"{limit}); retry shortly", {"Retry-After": "1"})
        try:
            sequences = await self.on_worker(self._admit, requests)
        except AdapterlabError as error:
            raise ApiError(_status(error), self._scrub(str(error))) from None
        updates: asyncio.Queue = asyncio.Queue()
        for index, sequence in enumerate(sequences):
            self.listeners[sequence] = (updates, index)
        self._note_running()
        self.wakeup.set()
        return self._relay(updates, len(requests))

    async def _relay(self, updates: asyncio.Queue, count: int) -> AsyncGenerator[Update, None]:
        finished = 0
        try:
            while finished < count:
                update = await updates.get()
                if isinstance(update, Exception):
                    raise update
                finished += bool(update.finish_reason)
                yield update
        finally:
            if finished < count:
                self._cancel(updates)

    async def generate(self, requests: list[GenerationRequest]) -> list[Update]:
        """Each request's final update (its whole text), once every one has finished. Cancelling the
        awaiting task (a client that left, a server stopping) cancels its rows rather than decoding them
        to their end for nobody."""
        return sorted([update async for update in await self.stream(requests) if update.finish_reason],
                      key=lambda update: update.index)

    def _admit(self, requests: list[GenerationRequest]) -> list[Sequence]:
        """On the worker: every request checked and made a sequence before any joins the decoder."""
        sequences = [self.engine.sequence(request) for request in requests]
        if not all(sequence.prompt_ids for sequence in sequences):  # the decoder cannot start from nothing
            raise ApiError(422, "the prompt is empty (no tokens): there is nothing to continue")
        for sequence in sequences:
            self.decoder.add(sequence)
        return sequences

    def _cancel(self, updates: asyncio.Queue) -> None:
        """Stop generating for a client that went away: the worker marks its rows between steps, and they
        leave at the next. Nothing to await: a task being cancelled (over and over, by anyio) calls this."""
        gone = [sequence for sequence, (queue, _) in self.listeners.items() if queue is updates]
        for sequence in gone:
            del self.listeners[sequence]
        self.metrics.generation["cancelled"] += len(gone)
        self.worker.submit(_cancel, gone)

    async def _generation_loop(self) -> None:
        """Decode steps on the worker while rows wait or run; classification batches queue between them
        on the same worker, so a batch waits for one step at most, not for a whole generation."""
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.decoder.busy:
                try:
                    advanced = await self.on_worker(self.decoder.step)
                except Exception as error:  # a bug, not bad input: every running request gets a 500
                    self.decoder = self.engine.decoder()
                    for queue, _ in self.listeners.values():
                        queue.put_nowait(error)
                    self.listeners.clear()
                    break
                finally:
                    self._note_running()
                self.metrics.generation["tokens"] += len(advanced)
                for sequence in advanced:
                    if sequence in self.listeners:
                        self._publish(sequence)

    def _publish(self, sequence: Sequence) -> None:
        """A sequence's progress to its request's listener."""
        queue, index = self.listeners[sequence]
        queue.put_nowait(Update(index, sequence.text, sequence.finish_reason, len(sequence.prompt_ids),
                                len(sequence.token_ids)))
        if sequence.done:
            del self.listeners[sequence]
            self.metrics.generation[sequence.finish_reason] += 1

    def _note_running(self) -> None:
        self.metrics.generation["running"] = len(self.decoder.active) + len(self.decoder.waiting)


def _cancel(sequences: list[Sequence]) -> None:
    for sequence in sequences:
        sequence.finish_reason = sequence.finish_reason or "cancelled"


def _status(error: AdapterlabError) -> int:
    """409 for an adapter of another backbone, 422 for one that cannot be served, 400 for the rest."""
    if isinstance(error, BackboneMismatch):
        return 409
    return 422 if isinstance(error, StoreError) else 400


def _name(folder: Path) -> str:
    """TASK/NAME of a folder of the store."""
    return f"{folder.parent.name}/{folder.name}"


def backbone_from_store(store: Path) -> str:
    """The backbone the store's adapters share (when the server is not told one)."""
    backbones = {card.backbone_fingerprint: card.backbone for card in list_adapters(store)}
    if not backbones:
        raise AdapterlabError(f"store {store} holds no adapters: name the backbone with --backbone")
    if len(backbones) > 1:
        names = ", ".join(sorted(f"{name} ({fingerprint[:19]}…)" for fingerprint, name in backbones.items()))
        raise AdapterlabError(f"store {store} holds adapters of several backbones ({names}): choose one with --backbone")
    return next(iter(backbones.values()))
