"""Stopping without dropping work (a deploy's SIGTERM, a Ctrl-C): `DrainingServer`, uvicorn's server with a
drain before its own shutdown, and `Traffic`, what the `Gate` tells it.

On the first SIGTERM or SIGINT the server keeps listening but answers every new request 503 with Retry-After
(a client, or the load balancer's health check, learns at once to go elsewhere; a closed port would look
like a crash), while the requests in flight finish: classification answers, generations and streams to
their last event. When none is left, or at the drain deadline, uvicorn's shutdown runs as usual: it closes
the sockets, cancels what still runs (past the deadline only) and runs the application's shutdown (the
worker answers what it had queued). The process then exits 0. A second signal ends the drain at once."""

import logging
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import uvicorn

log = logging.getLogger("uvicorn.error")  # beside uvicorn's own lines about the shutdown
SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class Traffic:
    """The requests inside the application now, and whether new ones are refused (the `Gate` keeps both)."""

    in_flight: int = 0
    draining: bool = False


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, traffic: Traffic, drain_seconds: float):
        super().__init__(config)
        self.traffic, self.drain_seconds = traffic, drain_seconds
        self.drain_deadline = float("inf")

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, except that the signal is not raised again once the server has stopped: a drained
        stop is a clean exit (0), not a death by SIGTERM."""
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame) -> None:
        if self.traffic.draining:
            self.drain_deadline = time.monotonic()  # a second signal: cancel what is left now
            return
        self.traffic.draining = True
        self.drain_deadline = time.monotonic() + self.drain_seconds
        log.info("%s: new requests get 503; waiting up to %gs for %d in flight", signal.Signals(sig).name,
                 self.drain_seconds, self.traffic.in_flight)

    async def on_tick(self, counter: int) -> bool:
        """Every 0.1 s in uvicorn's main loop: once drained (or out of time), uvicorn's shutdown begins."""
        if self.traffic.draining and not self.should_exit:
            remaining = self.drain_deadline - time.monotonic()
            if self.traffic.in_flight == 0 or remaining <= 0:
                self.config.timeout_graceful_shutdown = max(0.0, remaining)  # then uvicorn cancels the rest
                self.should_exit = True
        return await super().on_tick(counter)


def serve_draining(app, traffic: Traffic, drain_seconds: float, **config) -> None:
    """Run `app` under uvicorn (`config`: uvicorn.Config's options) until a signal and a drain."""
    DrainingServer(uvicorn.Config(app, **config), traffic, drain_seconds).run()
