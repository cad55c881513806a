"""`Backend`: what the HTTP routes ask of whatever serves them (the local worker, or Ray replicas behind an
ingress), and `Update`, a generation's progress. The routes are written once against this; a deployment adds
a backend, never a second copy of the routes."""

from dataclasses import dataclass
from pathlib import Path
from typing import AsyncGenerator, BinaryIO, Protocol

from adapterlab.engine import GenerationRequest, Prediction
from adapterlab.server.bodies import BatchRow
from adapterlab.server.metrics import Metrics
from adapterlab.server.settings import Settings
from adapterlab.store import AdapterCard


@dataclass(frozen=True)
class Update:
    """A request's text so far, as one decode step left it."""

    index: int  # which of the submitted requests
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class Backend(Protocol):
    """Adapters are named TASK/NAME; a problem the client can fix is raised as an `ApiError`. Cancelling the
    task that awaits `generate`, or closing the iterator of `stream`, cancels the generation."""

    settings: Settings
    metrics: Metrics  # the routes' requests are counted here
    store: Path  # the adapter store (the routes list its cards)

    async def describe(self) -> dict:
        """The served backbone's name and kind, and whether requests are batched (asks the engine: a health check)."""

    async def backbone(self) -> str:
        """The served backbone's name: the `model` that names no adapter."""

    async def classify(self, rows: list[BatchRow]) -> list[Prediction]:
        """Each row's prediction, under its own adapter or zero-shot."""

    async def card(self, adapter: str) -> AdapterCard:
        """The card of a complete adapter of the store (400, 404, 422 otherwise)."""

    async def count_tokens(self, texts: list[str]) -> list[int]:
        """Each text's length in the backbone's tokens."""

    async def generate(self, requests: list[GenerationRequest]) -> list[Update]:
        """Each request's final update; the requests name one adapter (TASK/NAME) or none."""

    async def stream(self, requests: list[GenerationRequest]) -> AsyncGenerator[Update, None]:
        """The requests accepted (or refused: raised here), then their updates as they advance."""

    async def resident(self) -> list[str]:
        """The adapters loaded now."""

    async def register(self, path: str | None, archive: BinaryIO | None) -> AdapterCard:
        """Register an adapter already in the store as TASK/NAME (`path`), or an uploaded `archive`; loaded."""

    async def remove(self, adapter: str) -> None:
        """Stop serving an adapter and delete it from the store."""

    def render_metrics(self) -> str:
        """Prometheus text."""
