"""`adapterlab serve` in processes of its own, started in about a second: each is forked from a process that
imported adapterlab, torch and transformers once (multiprocessing's forkserver, those modules preloaded),
then runs the command line as `adapterlab serve ARGS` would. A fresh interpreter spends 5-15 s importing
them on this project's test machines, too slow to restart a server twenty times. The processes are real:
signals, exit codes and a SIGKILL act on them as on the command."""

import multiprocessing
import os
import socket
import time
from pathlib import Path

import httpx

PRELOADED = ["adapterlab.cli", "adapterlab.server.app", "adapterlab.engine", "peft",
             "transformers.models.bert.modeling_bert", "transformers.models.llama.modeling_llama",
             "server_processes"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """One `adapterlab serve --host 127.0.0.1 --port PORT ARGS`, its output in `log`. `delays` slow the
    engine down in that process (seconds per call): "step" for each decode step, "predict" for each
    classification batch (which also appends its row count to LOG.predicting, so that a test knows which rows
    are under way)."""

    def __init__(self, args: list[str], log: Path, delays: dict[str, float] | None = None):
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOADED)
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        argv = ["serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.process = context.Process(target=_run, args=(argv, str(log), delays or {}), daemon=False)

    def start(self, timeout: float = 120) -> "ServerProcess":
        """Started, and answering /health."""
        self.process.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.is_alive():
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.05)
        self.kill()
        raise AssertionError(f"the server did not start:\n{self.log.read_text()[-3000:]}")

    def signal(self, number: int) -> None:
        os.kill(self.process.pid, number)

    def kill(self) -> None:
        """SIGKILL, and wait for the process to end."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join(30)

    def wait(self, timeout: float) -> int | None:
        """The exit code (negative: the signal that ended it), or None if still running after `timeout`."""
        self.process.join(timeout)
        return self.process.exitcode


def _run(argv: list[str], log: str, delays: dict[str, float]) -> None:
    """In the new process: output to `log`, the engine slowed as asked, then the command line."""
    handle = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    from adapterlab.cli import app
    from adapterlab.engine import Engine
    from adapterlab.generation import Decoder

    if delays.get("step"):
        Decoder.step = _slowed(Decoder.step, delays["step"])
    if delays.get("predict"):
        Engine.predict_batch = _slowed(Engine.predict_batch, delays["predict"], Path(log + ".predicting"))
    app(argv, prog_name="adapterlab")


def _slowed(method, seconds: float, marker: Path | None = None):
    """`method` after `seconds`; each call first appends a line to `marker`: the length of its argument."""
    def slowed(self, *args, **kwargs):
        if marker is not None:
            with open(marker, "a") as handle:
                handle.write(f"{len(args[0])}\n")
        time.sleep(seconds)
        return method(self, *args, **kwargs)

    return slowed
