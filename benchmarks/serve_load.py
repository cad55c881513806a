"""HTTP serving figures (JSON on stdout): throughput and p50/p95 latency of N concurrent clients
spread over K adapters, with dynamic batching and with batching off (one request, one forward),
plus p95 latency at light load (one client) for both. The servers run as `adapterlab serve` on
loopback; every loop is bounded in requests and in time. Random LoRA weights on MiniLM (see
benchmarks/engine.py): fine for speed, meaningless for accuracy.

    .venv/bin/python benchmarks/serve_load.py [--clients 32] [--adapters 64] [--requests 40]
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from _common import classify_clients

TEXTS = ["the plot never finds its feet", "a warm, funny and generous film", "my card was declined twice",
         "rates rose again this quarter", "is there a fee for transfers abroad?", "what a dull, lifeless match"]
PHASE_SECONDS = 120  # no phase runs longer, whatever the request counts


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(store: Path, batching: bool, log: Path, *options: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "adapterlab", "serve", "--store", str(store), "--port", str(port), *options]
    process = subprocess.Popen(command + ([] if batching else ["--no-batching"]), stdout=subprocess.DEVNULL,
                               stderr=log.open("w"), env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the server did not start:\n{log.read_text()[-2000:]}")


def run_clients(url: str, refs: list[str], clients: int, requests: int) -> dict:
    """`clients` threads, each sending `requests` one-text requests in turn; latencies and throughput."""
    plan = [[(refs[n % len(refs)], TEXTS[n % len(TEXTS)]) for n in range(index * requests, (index + 1) * requests)]
            for index in range(clients)]
    return classify_clients(url, plan, PHASE_SECONDS)


def measure(store: Path, refs: list[str], args) -> dict:
    """Both servers up at once, their phases interleaved: on a shared machine, background load then
    weighs on both alike."""
    modes = {"batching": True, "no_batching": False}
    servers = {mode: start_server(store, batching, store.parent / f"{mode}.log") for mode, batching in modes.items()}
    try:
        for _, url in servers.values():  # warm-up: every adapter loaded once
            run_clients(url, refs, 8, -(-len(refs) // 8))
        figures = {mode: {} for mode in modes}
        for phase, clients, requests in (("loaded", args.clients, args.requests), ("light", 1, args.light_requests)):
            for mode, (_, url) in servers.items():
                figures[mode][phase] = run_clients(url, refs, clients, requests)
        return figures
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--requests", type=int, default=40, help="Per client under load.")
    parser.add_argument("--light-requests", type=int, default=100, help="Of the single client.")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="adapterlab-serve-bench-"))
    try:
        import engine  # benchmarks/engine.py, beside this script

        store = root / "store"
        refs = engine.make_store(store, args.adapters)
        shutil.rmtree(store / "template")  # the trained template: served adapters are the random copies only
        figures = measure(store, refs, args)
        batched, unbatched = figures["batching"], figures["no_batching"]
        ratio = batched["loaded"]["requests_per_s"] / unbatched["loaded"]["requests_per_s"]
        light_ratio = batched["light"]["p95_ms"] / unbatched["light"]["p95_ms"]
        print(json.dumps({
            "benchmark": "serve", "backbone": "minilm", "clients": args.clients, "adapters": args.adapters,
            "cpu_cores": os.cpu_count(), "batching": batched, "no_batching": unbatched,
            "throughput_ratio": round(ratio, 2), "light_load_p95_ratio": round(light_ratio, 2),
            "targets": {"throughput_ratio_min": 3.0, "light_load_p95_ratio_max": 2.0},
            "targets_met": ratio >= 3.0 and light_ratio <= 2.0}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
