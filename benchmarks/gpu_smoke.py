"""GPU smoke run: where a CUDA GPU exists, train a MiniLM and a SmolLM2 adapter on it, serve each in
one mixed batch (adapter rows beside zero-shot rows, checked against the adapter's rows alone) and over
HTTP, and print JSON figures. Without a GPU it says so and exits 0 (`--device cpu` runs the same
steps on the CPU, to check the script itself).

Training precision is the recipes' `auto` (bf16 on a GPU that computes it, else fp16), serving dtype
the engine's `auto`; both are printed with the device's name and memory.

    .venv/bin/python benchmarks/gpu_smoke.py [--device cuda:1] [--k 8]
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from _common import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
DATA = SHARED_DATA / "sst2"
RUNS = {  # backbone: (recipe, overrides that keep the run short)
    "minilm": ("sst2-lora-minilm-tied.yaml", []),
    "smollm2-135m": ("sst2-lora-smollm2.yaml", ["training.epochs=3"]),
}
ZERO_SHOT_LABELS = ("sports", "politics", "music")


def run_backbone(backbone: str, device: str, k: int, test_rows: int, store: str) -> dict:
    from adapterlab.engine import Engine, Request
    from adapterlab.recipe import load_recipe
    from adapterlab.store import read_card
    from adapterlab.training import train

    recipe_file, overrides = RUNS[backbone]
    recipe = load_recipe(ROOT / "recipes" / recipe_file, overrides + [
        f"data.path={DATA}", f"data.k={k}", f"data.test_limit={test_rows}", f"output.store={store}"])
    result = train(recipe, show_progress=False)
    card = read_card(result.adapter_path)

    engine = Engine(backbone, store, device=device)
    texts = ["a gorgeous, moving film", "dull and overlong", "the best thing I saw this year", "a waste of time"] * 8
    alone = engine.predict(str(result.adapter_path), texts)
    mixed = [Request(str(result.adapter_path), text) for text in texts]
    mixed += [Request(None, text, labels=ZERO_SHOT_LABELS) for text in texts]
    engine.predict_batch(mixed)  # warm-up
    _sync(device)
    started = time.perf_counter()
    answers = engine.predict_batch(mixed)
    _sync(device)
    mixed_seconds = time.perf_counter() - started
    drift = max(abs(a.scores[label] - b.scores[label]) for a, b in zip(alone, answers) for label in a.scores)
    return {"train_seconds": round(result.train_seconds, 3),
            "mixed_precision": card.recipe["training"]["mixed_precision"],
            "serving_dtype": str(engine.backbone.dtype).removeprefix("torch."),
            "serving_device": str(engine.backbone.device),
            "test_accuracy": round(result.metrics["accuracy"], 4),
            "engine_accuracy": round(engine.evaluate(str(result.adapter_path), str(DATA),
                                                     limit=test_rows)["accuracy"], 4),
            "mixed_batch_rows": len(mixed), "mixed_batch_rows_per_second": round(len(mixed) / mixed_seconds, 1),
            "mixed_vs_alone_max_abs_diff": round(drift, 6),
            "http": http_figures(store, backbone, device, f"{card.task}/{card.name}", texts)}


def http_figures(store: str, backbone: str, device: str, adapter: str, texts: list[str]) -> dict:
    """Median latency of /v1/classify for one text and for a batch, on a loopback server."""
    import httpx
    import uvicorn

    from adapterlab.server import Settings, create_app

    server = uvicorn.Server(uvicorn.Config(create_app(store, backbone, Settings(device=device)), host="127.0.0.1",
                                           port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    figures = {}
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            for name, inputs in (("one_text", texts[:1]), ("batch", texts)):
                seconds = []
                for _ in range(6):
                    started = time.perf_counter()
                    response = client.post("/v1/classify", json={"adapter": adapter, "inputs": inputs})
                    seconds.append(time.perf_counter() - started)
                    response.raise_for_status()
                figures[f"{name}_median_ms"] = round(1000 * sorted(seconds[1:])[2], 2)
    finally:
        server.should_exit = True
        thread.join(60)
    return figures


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", help="cuda, cuda:N, or cpu to check the script (default: cuda when present)")
    parser.add_argument("--k", type=int, default=8, help="training examples per class")
    parser.add_argument("--test-rows", type=int, default=200)
    options = parser.parse_args(argv)
    device = options.device or ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        return {"benchmark": "gpu_smoke", "skipped": "no CUDA GPU here (torch.cuda.is_available() is False)"}
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # Accelerate trains where the engine serves
    from adapterlab.precision import cpu_capability

    hardware = {"device": device, "cpu": cpu_capability()}
    if device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(torch.device(device))
        hardware |= {"gpu": properties.name, "gpu_memory_gib": round(properties.total_memory / 2**30, 1),
                     "bf16": torch.cuda.is_bf16_supported()}
    results = {}
    with tempfile.TemporaryDirectory() as store:
        for backbone in RUNS:
            results[backbone] = run_backbone(backbone, device, options.k, options.test_rows, store)
            print(json.dumps({backbone: results[backbone]}), file=sys.stderr)
    if device.startswith("cuda"):
        hardware["gpu_peak_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return {"benchmark": "gpu_smoke", **hardware, "k": options.k, "test_rows": options.test_rows, **results}


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with contextlib.redirect_stdout(sys.stderr):
        result = main()
    print(json.dumps(result))
