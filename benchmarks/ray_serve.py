"""Ray Serve figures (JSON on stdout): requests/s and p50/p95 latency of N concurrent clients over K
adapters, for the single-process server (`adapterlab serve`) and for Ray Serve with 1 and 2 replicas
on a local Ray cluster of this machine's cores; and adapter loads per 1,000 requests with Ray's
multiplexed routing (requests go to a replica holding their adapter) against random routing, with
fewer adapter slots per replica than adapters. Clients pick adapters at random (seeded). Each phase
records the machine's 1-minute load average: other work on the machine slows every figure. Random LoRA
weights on MiniLM (random_adapter_store, benchmarks/_common.py): fine for speed, meaningless for accuracy.

On a machine of 2 cores, Ray's own processes (proxy, controller, ingress) share the cores with the
replicas, and 2 replicas split the cores a single process would use alone: the figures show Ray's
overhead here, not its scaling, which needs cores (or GPUs) per replica.

    .venv/bin/python benchmarks/ray_serve.py [--clients 16] [--adapters 64] [--requests 25]
"""

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import httpx

from _common import SERVE_TEXTS, classify_clients, free_port, random_adapter_store, start_server

PHASE_SECONDS = 120  # no phase runs longer, whatever the request counts


def run_clients(url: str, refs: list[str], clients: int, requests: int, texts: list[str]) -> dict:
    """`clients` threads, each sending `requests` one-text requests for adapters drawn at random."""
    draws = [random.Random(index) for index in range(clients)]  # client i's draws, seeded by i
    plan = [[(draw.choice(refs), texts[step % len(texts)]) for step in range(requests)] for draw in draws]
    return classify_clients(url, plan, PHASE_SECONDS)


def adapter_loads(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("adapterlab_replica_adapter_loads_total{"))


def warm(url: str, refs: list[str], texts: list[str]) -> None:
    """Every adapter asked for once, 8 at a time."""
    for start in range(0, len(refs), 8):
        with httpx.Client(base_url=url, timeout=120) as http:
            for ref in refs[start:start + 8]:
                http.post("/v1/classify", json={"adapter": ref, "inputs": texts[:1]})


def measure(store: Path, refs: list[str], args, texts: list[str]) -> dict:
    """The single-process server stays up beside the Ray application; each Ray phase runs right after
    a phase of the single process, twice, so that the other work of a shared machine weighs on both."""
    import ray
    from ray import serve

    import adapterlab
    from adapterlab.ray_serve import RayServeOptions, build_app

    single, single_url = start_server(store, True, store.parent / "single.log")
    warm(single_url, refs, texts)
    cores = os.cpu_count()
    source = str(Path(adapterlab.__file__).parents[1])
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": source, "HF_HUB_OFFLINE": "1"}})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    def deploy(replicas: int, adapters_per_replica: int, route_by_adapter: bool = True) -> None:
        """The application anew: updated in place, new replicas would wait for the old ones' CPUs."""
        serve.delete("adapterlab")
        options = RayServeOptions(store=str(store), replicas=replicas, replica_cpus=cores / replicas,
                                  adapters_per_replica=adapters_per_replica, route_by_adapter=route_by_adapter)
        serve.run(build_app(options), name="adapterlab", route_prefix="/")
        warm(url, refs, texts)

    def phase(at: str) -> dict:
        return {**run_clients(at, refs, args.clients, args.requests, texts), "load_average_1m": os.getloadavg()[0]}

    figures: dict = {"single_process": [], "replicas_1": [], "replicas_2": []}
    try:
        for replicas in (1, 2):
            deploy(replicas, len(refs))
            for _ in range(2):
                figures["single_process"].append(phase(single_url))
                figures[f"replicas_{replicas}"].append(phase(url))
        slots = max(1, int(len(refs) * args.slot_share))
        for routing, by_adapter in (("multiplexed", True), ("random", False)):
            deploy(2, slots, by_adapter)
            before = adapter_loads(url)
            measured = phase(url)
            measured["adapter_loads_per_1000_requests"] = round(1000 * (adapter_loads(url) - before) / measured["requests"], 1)
            figures[f"loads_{routing}_routing"] = {**measured, "adapter_slots_per_replica": slots}
    finally:
        serve.shutdown()
        ray.shutdown()
        single.terminate()
        single.wait(30)
    return figures


def main() -> None:
    from adapterlab.precision import cpu_capability

    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--requests", type=int, default=25, help="Per client.")
    parser.add_argument("--slot-share", type=float, default=0.625,
                        help="Adapter slots per replica as a share of the adapters, in the loads comparison.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="adapterlab-ray-bench-", ignore_cleanup_errors=True) as root:
        store = Path(root) / "store"
        refs = random_adapter_store(store, args.adapters)
        figures = measure(store, refs, args, SERVE_TEXTS)
        cpu = cpu_capability()
        print(json.dumps({
            "benchmark": "ray_serve", "backbone": "minilm", "clients": args.clients, "adapters": args.adapters,
            "cpu": cpu["cpu"], "avx512_bf16": cpu["avx512_bf16"], "cpu_cores": os.cpu_count(), **figures}))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the local Ray cluster on the loopback address
    sys.exit(main())
