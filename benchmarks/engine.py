"""Engine figures (JSON on stdout): cold load and warm switch at 1/100/1,000 resident adapters,
mixed-batch throughput against one adapter, a naive peft `set_adapter` loop and one merged model
per task, and resident memory (host, and on a GPU the device's). Random LoRA weights (r=8 on
query/value of MiniLM): fine for speed and memory, meaningless for accuracy.

    .venv/bin/python benchmarks/engine.py [--adapters 1000] [--rows 64] [--phases throughput,memory]
        [--store DIR] [--device auto] [--dtype auto] [--threads N]

`--store DIR` keeps the random adapters there (made once, reused by later runs): runs of two source
trees (PYTHONPATH) then time the same adapters side by side.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from _common import SERVE_TEXTS, cold_and_warm, kept_adapter_store
from adapterlab.backbones import load_backbone
from adapterlab.engine import Engine, Request

TEXTS = SERVE_TEXTS[:4]  # the engine's figures are measured on these four
PHASES = ("load", "throughput", "baselines", "memory")


def rows_per_second(run, rows: int, repeats: int = 3) -> float:
    run()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    _synchronize()
    return rows * repeats / (time.perf_counter() - started)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def requests_of(refs: list[str], rows: int) -> tuple[list[Request], list[Request]]:
    """`rows` requests of as many adapters, and the same texts all for the first adapter."""
    texts = [TEXTS[i % len(TEXTS)] for i in range(rows)]
    return [Request(refs[i], text) for i, text in enumerate(texts)], [Request(refs[0], text) for text in texts]


def throughput(engine: Engine, refs: list[str], rows: int, pairs: int = 7) -> dict:
    """Mixed-batch and one-adapter rows per second of wall time and of this process's CPU time, timed in
    turn (`pairs` times each, after a warm-up of each), so that a load that drifts on a shared machine
    weighs on both alike; the medians. With one torch thread the CPU time is the work done, whatever
    else runs (at two threads, on a loaded machine, it counts the threads' spinning too)."""
    mixed, single = requests_of(refs, rows)
    seconds: dict[tuple[str, str], list[float]] = {}
    for _ in range(pairs + 1):
        for name, requests in (("mixed", mixed), ("one", single)):
            started, cpu = time.perf_counter(), time.process_time()
            engine.predict_batch(requests)
            _synchronize()
            seconds.setdefault((name, "wall"), []).append(time.perf_counter() - started)
            seconds.setdefault((name, "cpu"), []).append(time.process_time() - cpu)
    speed = {key: rows / statistics.median(samples[1:]) for key, samples in seconds.items()}
    return {"rows": rows, "mixed_batch_rows_per_s": round(speed["mixed", "wall"], 1),
            "one_adapter_rows_per_s": round(speed["one", "wall"], 1),
            "ratio_mixed_vs_one_adapter": round(speed["mixed", "wall"] / speed["one", "wall"], 3),
            "mixed_batch_rows_per_cpu_s": round(speed["mixed", "cpu"], 1),
            "one_adapter_rows_per_cpu_s": round(speed["one", "cpu"], 1),
            "ratio_mixed_vs_one_adapter_in_cpu_time": round(speed["mixed", "cpu"] / speed["one", "cpu"], 3)}


def baselines(engine: Engine, refs: list[str], rows: int, store: Path) -> dict:
    mixed, _ = requests_of(refs, rows)
    many = rows_per_second(lambda: engine.predict_batch(mixed), rows)
    texts = [request.text for request in mixed]
    naive = naive_peft_loop(store, refs[:rows], texts, engine.backbone.device)
    merged = merged_per_task(engine, texts)
    return {"naive_set_adapter_rows_per_s": round(naive, 1), "speedup_vs_naive_set_adapter": round(many / naive, 2),
            **merged, "speedup_vs_merged_per_task": round(many / merged["merged_per_task_rows_per_s"], 2)}


def naive_peft_loop(store: Path, refs: list[str], texts: list[str], device: torch.device) -> float:
    """peft with every adapter loaded: set_adapter, then a forward per request."""
    from peft import PeftModel

    backbone = load_backbone("minilm", device=device)
    model = PeftModel.from_pretrained(backbone.model, str(store / refs[0]), adapter_name=refs[0])
    for ref in refs[1:]:
        model.load_adapter(str(store / ref), adapter_name=ref)
    model.eval()

    def run():
        with torch.no_grad():
            for ref, text in zip(refs, texts):
                model.set_adapter(ref)
                model(**backbone.tokenizer([text], return_tensors="pt").to(device))

    return rows_per_second(run, len(texts), repeats=1)


def merged_per_task(engine: Engine, texts: list[str]) -> dict:
    """One merged model per task: each request runs on its own model (a batch of one)."""
    backbone = engine.backbone
    tokenized = [backbone.tokenizer([text], return_tensors="pt").to(backbone.device) for text in texts]

    def run():
        with torch.no_grad():
            for batch in tokenized:
                backbone.model(**batch)

    bytes_per_model = sum(p.numel() * p.element_size() for p in backbone.model.parameters())
    return {"merged_per_task_rows_per_s": round(rows_per_second(run, len(texts), repeats=1), 1),
            "merged_per_task_bytes_for_rows_tasks": bytes_per_model * len(texts)}


def memory(refs: list[str], store: Path, rows: int, options: dict) -> dict:
    """Resident set growth from loading every adapter, against their size on disk; on a GPU, the
    device memory of the backbone and of the adapters' slots after a mixed batch of `rows` of them."""
    process = psutil.Process()
    engine = Engine("minilm", store, max_adapters=None, **options)
    engine.predict(refs[0], TEXTS[:1])
    before = process.memory_info().rss
    for ref in refs:
        engine.servable(ref)
    grown = process.memory_info().rss - before
    on_disk = sum((store / ref / f).stat().st_size for ref in refs
                  for f in ("adapter_model.safetensors", "head.safetensors"))
    backbone = sum(p.numel() * p.element_size() for p in engine.backbone.model.parameters())
    figures = {"resident_adapters": len(refs), "adapter_bytes_on_disk": on_disk, "rss_growth_bytes": grown,
               "rss_growth_over_adapter_bytes": round(grown / on_disk, 3), "backbone_bytes": backbone}
    if engine.backbone.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        engine.predict_batch(requests_of(refs, rows)[0])
        figures |= {"device_allocated_bytes_after_loading": held,
                    "device_allocated_bytes_after_mixed_batch": torch.cuda.memory_allocated(),
                    "device_peak_bytes_in_mixed_batch": torch.cuda.max_memory_allocated()}
    return figures


def run(root: Path, args) -> dict:
    phases = args.phases.split(",")
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"unknown phases {sorted(unknown)}; known: {', '.join(PHASES)}")
    refs = kept_adapter_store(root, args.adapters + 60)
    options = {"device": args.device, "dtype": args.dtype}
    engine = Engine("minilm", root, max_adapters=None, **options)
    result = {"benchmark": "engine", "backbone": "minilm", "torch_threads": torch.get_num_threads(),
              "device": str(engine.backbone.device), "dtype": str(engine.backbone.dtype).removeprefix("torch.")}
    if "load" in phases:
        result |= cold_and_warm(engine, refs, [c for c in (1, 100, 1000) if c + 20 <= len(refs)])
    if "throughput" in phases:
        result |= throughput(engine, refs, args.rows)
    if "baselines" in phases:
        result |= baselines(engine, refs, args.rows, root)
    if "memory" in phases:
        result |= memory(refs[:args.adapters], root, args.rows, options)
    result["targets"] = {"cold_load_p50_ms_max": 5, "warm_switch_p50_ms_max": 0.5, "ratio_mixed_min": 0.97,
                         "speedup_vs_naive_min": 5, "rss_growth_over_adapter_bytes_max": 1.2}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--phases", default=",".join(PHASES), help=f"Comma-separated, of {', '.join(PHASES)}.")
    parser.add_argument("--store", type=Path, help="Keep (and reuse) the random adapters here.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.store is not None:
        print(json.dumps(run(args.store, args)))
        return
    with tempfile.TemporaryDirectory(prefix="adapterlab-bench-", ignore_cleanup_errors=True) as folder:
        print(json.dumps(run(Path(folder), args)))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
