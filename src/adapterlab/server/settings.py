"""Batching and limits of the server (`Settings`), and the check of a request's size."""

from dataclasses import dataclass

from adapterlab.adapter_slots import DEFAULT_MAX_BYTES
from adapterlab.server.errors import ApiError


@dataclass
class Settings:
    """Batching, limits and the drain deadline (the `adapterlab serve` options)."""

    max_wait_ms: float = 2.0  # how long a batch's first request waits for company
    max_batch_rows: int = 256  # a batch closes once it holds this many rows
    batching: bool = True  # off: one request, one forward (the benchmark's baseline)
    max_queued_rows: int = 4096  # rows waiting for the engine; more: 503, so a flood cannot grow the queue unbounded
    max_inputs: int = 256  # rows per request
    max_chars: int = 20_000  # per text, text pair, label or prompt
    max_labels: int = 64  # zero-shot labels per row
    max_new_tokens: int = 256
    max_queued_generations: int = 16  # generations waiting or running; more: 503 with Retry-After
    max_upload_bytes: int = 64 << 20
    max_body_bytes: int = 32 << 20  # any other request body
    body_seconds: float = 60.0  # a request's body must arrive within this (a client trickling it: 408)
    drain_seconds: float = 30.0  # on SIGTERM or Ctrl-C, requests in flight may finish within this; then cancelled
    # Bearer tokens. Admin endpoints (register, delete) need admin_token; without one they are off
    # unless allow_admin_without_token (local use). With client_token, classification, generation and
    # the adapter list need it (or the admin token).
    admin_token: str | None = None
    client_token: str | None = None
    allow_admin_without_token: bool = False
    device: str = "auto"  # where the backbone runs (precision.resolve_device)
    dtype: str = "auto"  # its dtype: auto is bfloat16 where the device computes it natively, else float32
    max_adapter_bytes: int | None = DEFAULT_MAX_BYTES  # adapters' weights in the device's slots (an LRU); None: no bound

    def check_size(self, count: int, *texts: str | None) -> None:
        """413 for more inputs than max_inputs, or a text longer than max_chars."""
        if count > self.max_inputs:
            raise ApiError(413, f"{count} inputs in one request; the limit is {self.max_inputs}")
        longest = max((len(text) for text in texts if text is not None), default=0)
        if longest > self.max_chars:
            raise ApiError(413, f"an input holds {longest:,} characters; the limit is {self.max_chars:,}")
