"""HTTP serving figures (JSON on stdout): throughput and p50/p95 latency of N concurrent clients
spread over K adapters, with dynamic batching and with batching off (one request, one forward),
plus p95 latency at light load (one client) for both. The servers run as `adapterlab serve` on
loopback; every loop is bounded in requests and in time. Random LoRA weights on MiniLM (see
random_adapter_store in benchmarks/_common.py): fine for speed, meaningless for accuracy.

    .venv/bin/python benchmarks/serve_load.py [--clients 32] [--adapters 64] [--requests 40] [--store DIR]

`--store DIR` keeps the random adapters there (made once, reused), as in benchmarks/engine.py.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from _common import SERVE_TEXTS, classify_clients, kept_adapter_store, start_server

PHASE_SECONDS = 120  # no phase runs longer, whatever the request counts


def run_clients(url: str, refs: list[str], clients: int, requests: int) -> dict:
    """`clients` threads, each sending `requests` one-text requests in turn; latencies and throughput."""
    plan = [[(refs[n % len(refs)], SERVE_TEXTS[n % len(SERVE_TEXTS)])
             for n in range(index * requests, (index + 1) * requests)] for index in range(clients)]
    return classify_clients(url, plan, PHASE_SECONDS)


def measure(store: Path, refs: list[str], args, logs: Path) -> dict:
    """Both servers up at once, their phases interleaved: on a shared machine, background load then
    weighs on both alike."""
    modes = {"batching": True, "no_batching": False}
    servers = {mode: start_server(store, batching, logs / f"{mode}.log") for mode, batching in modes.items()}
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
    parser.add_argument("--store", type=Path, help="Keep (and reuse) the random adapters here.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="adapterlab-serve-bench-", ignore_cleanup_errors=True) as scratch:
        store = args.store or Path(scratch) / "store"
        refs = kept_adapter_store(store, args.adapters)
        figures = measure(store, refs, args, Path(scratch))
        batched, unbatched = figures["batching"], figures["no_batching"]
        ratio = batched["loaded"]["requests_per_s"] / unbatched["loaded"]["requests_per_s"]
        light_ratio = batched["light"]["p95_ms"] / unbatched["light"]["p95_ms"]
        print(json.dumps({
            "benchmark": "serve", "backbone": "minilm", "clients": args.clients, "adapters": args.adapters,
            "cpu_cores": os.cpu_count(), "batching": batched, "no_batching": unbatched,
            "throughput_ratio": round(ratio, 2), "light_load_p95_ratio": round(light_ratio, 2),
            "targets": {"throughput_ratio_min": 3.0, "light_load_p95_ratio_max": 2.0},
            "targets_met": ratio >= 3.0 and light_ratio <= 2.0}))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
