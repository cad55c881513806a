"""`LocalBackend`: the `Backend` of one process, over the worker's `Server` (adapter names become store folders).
`adapterlab serve` answers through it, and so does each Ray replica."""

import asyncio
import shutil
from dataclasses import replace
from pathlib import Path
from typing import AsyncGenerator, BinaryIO

from adapterlab.engine import GenerationRequest, Prediction
from adapterlab.server.backend import Update
from adapterlab.server.bodies import BatchRow
from adapterlab.server.settings import Settings
from adapterlab.server.worker import Server
from adapterlab.store import AdapterCard


class LocalBackend:
    """The engine of this process, on its worker thread (see `Server`)."""

    def __init__(self, server: Server):
        self.server = server
        self.settings, self.metrics, self.store = server.settings, server.metrics, server.store

    @classmethod
    def open(cls, store: str | Path, backbone: str | None = None, settings: Settings | None = None) -> "LocalBackend":
        """A backend over `store`; the backbone loads now (default: the one the store's adapters share)."""
        return cls(Server(store, backbone, settings))

    async def describe(self) -> dict:
        backbone = self.server.engine.backbone
        return {"backbone": backbone.name, "kind": backbone.kind, "batching": self.settings.batching}

    async def backbone(self) -> str:
        return self.server.engine.backbone.name

    async def classify(self, rows: list[BatchRow]) -> list[Prediction]:
        return await self.server.classify(rows)

    async def card(self, adapter: str) -> AdapterCard:
        return await asyncio.to_thread(self.server.checked_card, self.server.adapter_folder(adapter))

    async def count_tokens(self, texts: list[str]) -> list[int]:
        tokenizer = self.server.engine.backbone.tokenizer
        return [len(tokenizer(text).input_ids) for text in texts]

    async def generate(self, requests: list[GenerationRequest]) -> list[Update]:
        return await self.server.generate(self._in_store(requests))

    async def stream(self, requests: list[GenerationRequest]) -> AsyncGenerator[Update, None]:
        return await self.server.stream(self._in_store(requests))

    def _in_store(self, requests: list[GenerationRequest]) -> list[GenerationRequest]:
        """The requests with their adapters' folders: a client's TASK/NAME never reaches past the store."""
        return [replace(request, adapter=request.adapter and str(self.server.adapter_folder(request.adapter)))
                for request in requests]

    async def resident(self) -> list[str]:
        return await self.server.on_worker(self.server.engine.resident)

    async def register(self, path: str | None, archive: BinaryIO | None) -> AdapterCard:
        """A folder already in the store, or an archive, moved atomically to STORE/TASK/NAME after its card
        (replacing an adapter of that name); checked and loaded first."""
        if archive is not None:
            staging, target = await asyncio.to_thread(self.server.stage_upload, archive)
        else:
            staging, target = None, await asyncio.to_thread(self.server.check_in_place, path)
        try:
            return await self.server.on_worker(self.server.install, staging, target)
        finally:
            if staging is not None:  # at once: a cancelled task's await would not run
                shutil.rmtree(staging, ignore_errors=True)

    async def remove(self, adapter: str) -> None:
        await self.server.on_worker(self.server.remove, self.server.adapter_folder(adapter))

    def render_metrics(self) -> str:
        return self.metrics.render()
