"""Engine figures (JSON on stdout): cold load and warm switch at 1/100/1,000 resident adapters,
mixed-batch throughput against one adapter, a naive peft `set_adapter` loop and one merged model
per task, and resident memory. Random LoRA weights (r=8 on query/value of MiniLM): fine for speed
and memory, meaningless for accuracy.

    .venv/bin/python benchmarks/engine.py [--adapters 1000] [--rows 64]
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

from adapterlab.backbones import load_backbone
from adapterlab.engine import Engine, Request
from adapterlab.recipe import validate_recipe
from adapterlab.training import train

TEXTS = ["the plot never finds its feet", "a warm, funny and generous film", "my card was declined twice",
         "rates rose again this quarter"]


def make_store(root: Path, count: int) -> list[str]:
    """One trained template adapter, then `count` copies with random LoRA weights of the same shapes."""
    recipe = validate_recipe({"task": "template", "backbone": "minilm", "method": {"name": "lora", "r": 8},
                              "data": {"path": "demo:sentiment", "k": 2}, "training": {"max_steps": 1},
                              "output": {"store": str(root), "name": "t"}})
    template = train(recipe, show_progress=False).adapter_path
    from safetensors.torch import load_file
    tensors = load_file(template / "adapter_model.safetensors")
    card = json.loads((template / "card.json").read_text())
    refs = []
    for i in range(count):
        folder = root / "bench" / f"a{i:04d}"
        shutil.copytree(template, folder)
        save_file({k: torch.randn_like(v) * 0.02 for k, v in tensors.items()}, folder / "adapter_model.safetensors")
        (folder / "card.json").write_text(json.dumps({**card, "task": "bench", "name": f"a{i:04d}"}))
        refs.append(f"bench/a{i:04d}")
    return refs


def percentiles(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"p50_ms": round(1e3 * statistics.median(ordered), 3),
            "p95_ms": round(1e3 * ordered[int(0.95 * (len(ordered) - 1))], 3)}


def cold_and_warm(engine: Engine, refs: list[str], checkpoints: list[int]) -> dict:
    """Cold load+activate of fresh adapters once 1, 100, ... are resident; warm switch between resident ones."""
    figures, loaded = {}, 0
    for checkpoint in checkpoints:
        while loaded < checkpoint - 1:
            engine.servable(refs[loaded])
            loaded += 1
        samples = []
        for ref in refs[loaded:loaded + 20]:
            started = time.perf_counter()
            engine.servable(ref)
            samples.append(time.perf_counter() - started)
        loaded += 20
        figures[f"cold_load_at_{checkpoint}_resident"] = percentiles(samples)
    warm = []
    for i in range(200):
        started = time.perf_counter()
        engine.servable(refs[i % 50])
        warm.append(time.perf_counter() - started)
    figures["warm_switch"] = percentiles(warm)
    return figures


def rows_per_second(run, rows: int, repeats: int = 3) -> float:
    run()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return rows * repeats / (time.perf_counter() - started)


def throughput(engine: Engine, refs: list[str], rows: int, store: Path) -> dict:
    texts = [TEXTS[i % len(TEXTS)] for i in range(rows)]
    mixed = [Request(refs[i], text) for i, text in enumerate(texts)]
    single = [Request(refs[0], text) for text in texts]
    many = rows_per_second(lambda: engine.predict_batch(mixed), rows)
    one = rows_per_second(lambda: engine.predict_batch(single), rows)
    naive = naive_peft_loop(store, refs[:rows], texts)
    merged = merged_per_task(engine, texts)
    return {"rows": rows, "mixed_batch_rows_per_s": round(many, 1), "one_adapter_rows_per_s": round(one, 1),
            "ratio_mixed_vs_one_adapter": round(many / one, 3), "naive_set_adapter_rows_per_s": round(naive, 1),
            "speedup_vs_naive_set_adapter": round(many / naive, 2), **merged,
            "speedup_vs_merged_per_task": round(many / merged["merged_per_task_rows_per_s"], 2)}


def naive_peft_loop(store: Path, refs: list[str], texts: list[str]) -> float:
    """peft with every adapter loaded: set_adapter, then a forward per request."""
    from peft import PeftModel

    backbone = load_backbone("minilm")
    model = PeftModel.from_pretrained(backbone.model, str(store / refs[0]), adapter_name=refs[0])
    for ref in refs[1:]:
        model.load_adapter(str(store / ref), adapter_name=ref)
    model.eval()

    def run():
        with torch.no_grad():
            for ref, text in zip(refs, texts):
                model.set_adapter(ref)
                model(**backbone.tokenizer([text], return_tensors="pt"))

    return rows_per_second(run, len(texts), repeats=1)


def merged_per_task(engine: Engine, texts: list[str]) -> dict:
    """One merged model per task: each request runs on its own model (a batch of one)."""
    backbone = engine.backbone
    tokenized = [backbone.tokenizer([text], return_tensors="pt") for text in texts]

    def run():
        with torch.no_grad():
            for batch in tokenized:
                backbone.model(**batch)

    bytes_per_model = sum(p.numel() * p.element_size() for p in backbone.model.parameters())
    return {"merged_per_task_rows_per_s": round(rows_per_second(run, len(texts), repeats=1), 1),
            "merged_per_task_bytes_for_rows_tasks": bytes_per_model * len(texts)}


def memory(refs: list[str], store: Path) -> dict:
    """Resident set growth from loading every adapter, against their size on disk."""
    process = psutil.Process()
    engine = Engine("minilm", store, max_adapters=None)
    engine.predict(refs[0], TEXTS[:1])
    before = process.memory_info().rss
    for ref in refs:
        engine.servable(ref)
    grown = process.memory_info().rss - before
    on_disk = sum((store / ref / f).stat().st_size for ref in refs
                  for f in ("adapter_model.safetensors", "head.safetensors"))
    backbone = sum(p.numel() * p.element_size() for p in engine.backbone.model.parameters())
    return {"resident_adapters": len(refs), "adapter_bytes_on_disk": on_disk, "rss_growth_bytes": grown,
            "rss_growth_over_adapter_bytes": round(grown / on_disk, 3), "backbone_bytes": backbone}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=64)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="adapterlab-bench-"))
    try:
        refs = make_store(root, args.adapters + 60)
        engine = Engine("minilm", root, max_adapters=None)
        checkpoints = [c for c in (1, 100, 1000) if c + 20 <= len(refs)]
        result = {"benchmark": "engine", "backbone": "minilm", "torch_threads": torch.get_num_threads(),
                  **cold_and_warm(engine, refs, checkpoints),
                  **throughput(engine, refs, args.rows, root),
                  **memory(refs[:args.adapters], root),
                  "targets": {"cold_load_p50_ms_max": 5, "warm_switch_p50_ms_max": 0.5, "ratio_mixed_min": 0.8,
                              "speedup_vs_naive_min": 5, "rss_growth_over_adapter_bytes_max": 1.2}}
        print(json.dumps(result))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
