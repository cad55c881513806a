"""Quantization benchmark: LoRA on SmolLM2-135M over an fp32, an 8-bit and a 4-bit (nf4) backbone.

Trains recipes/sst2-lora-smollm2.yaml (SST-2, k examples per class, data ../shared/data/sst2) once per
mode and seed (the seed draws the k-shot rows and seeds training), each run in its own subprocess so
that memory peaks do not mix. Measured per run, then per mode (memory: the largest; time and accuracy:
the mean over seeds, accuracy also per seed):
  - backbone_bytes: the loaded backbone's weights (transformers' `get_memory_footprint`);
  - rss_loaded_mb: the process's resident memory once the backbone and adapter are loaded;
  - peak_rss_train_mb: the process's highest resident memory while it trains (sampled every 10 ms);
  - max_rss_mb: the process's peak over its whole life, loading and evaluation included (getrusage);
  - step_seconds: seconds in `fit` divided by its optimizer steps (backbone already loaded);
  - accuracy: on the test split (its first --test-limit rows when given).
Targets, for 8-bit: backbone weights at most half of fp32's, mean accuracy within 2 points
of fp32's (above or below: a gain as large says the runs differ just as much); 4-bit's figures are
reported beside them. One seed's accuracy moves by a few points with the rows drawn, hence the seeds.
Prints one JSON object on stdout (last line); progress goes to stderr.

    make bench
    .venv/bin/python benchmarks/quantized.py [--modes fp32 8bit 4bit] [--k 16] [--seeds 0 1 2] [--test-limit 0]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from _common import SHARED_DATA, sample_std

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "sst2-lora-smollm2.yaml"
QUANTIZATION = {"fp32": "none", "8bit": "8bit", "4bit": "4bit"}  # 4bit: the recipe schema's default nf4
TARGETS = {"backbone_bytes_8bit_vs_fp32": 0.5, "accuracy_gap_points": 2.0}  # maxima


class PeakMemory:
    """The highest resident set size of this process while the block runs, sampled by a thread."""

    def __enter__(self):
        self.peak, self._done = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        process = psutil.Process()
        while not self._done.is_set():
            self.peak = max(self.peak, process.memory_info().rss)
            self._done.wait(0.01)

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()


def measure(mode: str, seed: int, k: int, epochs: int | None, test_limit: int, store: str) -> dict:
    """One mode and seed, in this process: load, train, evaluate."""
    from adapterlab.recipe import load_recipe
    from adapterlab.training.builders import setup
    from adapterlab.training.loop import evaluate, fit, schedule

    overrides = [f"quantization.mode={QUANTIZATION[mode]}", f"data.path={SHARED_DATA / 'sst2'}",
                 f"data.k={k}", f"data.seed={seed}", f"training.seed={seed}", f"output.store={store}"] + ([f"data.test_limit={test_limit}"] if test_limit else [])
    recipe = load_recipe(RECIPE, overrides + ([f"training.epochs={epochs}"] if epochs else []))
    accelerator, task, model = setup(recipe)
    steps = schedule(len(task.train), recipe.training, accelerator.num_processes)[0]
    loaded = psutil.Process().memory_info().rss
    with PeakMemory() as memory:
        started = time.perf_counter()
        fit(model, task.train, recipe, accelerator, show_progress=False)
        seconds = time.perf_counter() - started
    metrics = evaluate(accelerator.unwrap_model(model), task.test, recipe)
    return {"mode": mode, "seed": seed, "backbone_bytes": model.backbone.model.get_memory_footprint(),
            "rss_loaded_mb": round(loaded / 2**20, 1), "peak_rss_train_mb": round(memory.peak / 2**20, 1),
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, 1),  # KiB on Linux
            "steps": steps, "train_seconds": round(seconds, 3), "step_seconds": round(seconds / steps, 3),
            "accuracy": round(metrics["accuracy"], 4),
            "train_rows": len(task.train), "test_rows": len(task.test)}


def run(mode: str, seed: int, options) -> dict:
    """`measure` in a fresh interpreter, so that its memory peaks are its own."""
    command = [sys.executable, __file__, "--worker", mode, "--seeds", str(seed), "--k", str(options.k),
               "--test-limit", str(options.test_limit), *(["--epochs", str(options.epochs)] if options.epochs else [])]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=list(QUANTIZATION), default=list(QUANTIZATION))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per mode and seed")
    parser.add_argument("--k", type=int, default=16, help="training examples per class")
    parser.add_argument("--epochs", type=int, help="training epochs (default: the recipe's)")
    parser.add_argument("--test-limit", type=int, default=0, help="first N test rows (0: the whole split)")
    parser.add_argument("--worker", choices=list(QUANTIZATION), help=argparse.SUPPRESS)  # one mode, in-process
    options = parser.parse_args(argv)
    if options.worker:
        with tempfile.TemporaryDirectory() as store:
            return measure(options.worker, options.seeds[0], options.k, options.epochs, options.test_limit, store)

    runs = {}
    for mode in options.modes:
        per_seed = []
        for seed in options.seeds:
            per_seed.append(run(mode, seed, options))
            print(json.dumps(per_seed[-1]), file=sys.stderr)
        runs[mode] = summarize(per_seed)
    checks = target_checks(runs)
    return {"benchmark": "quantized", "backbone": "smollm2-135m", "dataset": "sst2", "k": options.k,
            "epochs": options.epochs or "recipe", "modes": runs, "checks": checks,
            "meets_targets": bool(checks) and all(check["pass"] for check in checks.values()),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}


def summarize(per_seed: list[dict]) -> dict:
    """A mode over its seeds: the largest memory figures, the mean step time and accuracy."""
    first, accuracies = per_seed[0], [r["accuracy"] for r in per_seed]
    return {"mode": first["mode"], "seeds": [r["seed"] for r in per_seed], "backbone_bytes": first["backbone_bytes"],
            **{key: max(r[key] for r in per_seed) for key in ("rss_loaded_mb", "peak_rss_train_mb", "max_rss_mb")},
            "steps": first["steps"], "step_seconds": round(statistics.fmean(r["step_seconds"] for r in per_seed), 3),
            "accuracy": round(statistics.fmean(accuracies), 4),
            "accuracy_std": round(sample_std(accuracies), 4),
            "accuracy_per_seed": accuracies, "train_rows": first["train_rows"], "test_rows": first["test_rows"]}


def target_checks(runs: dict) -> dict:
    """Each target against fp32: its value, its maximum, pass or fail."""
    if "fp32" not in runs:
        return {}
    fp32, checks = runs["fp32"], {}
    if "8bit" in runs:
        ratio = round(runs["8bit"]["backbone_bytes"] / fp32["backbone_bytes"], 3)
        checks["backbone_bytes_8bit_vs_fp32"] = check(ratio, TARGETS["backbone_bytes_8bit_vs_fp32"])
        # Either way: a gain as large says the runs differ just as much.
        gap = round(100 * abs(runs["8bit"]["accuracy"] - fp32["accuracy"]), 1)
        checks["accuracy_gap_points_8bit"] = check(gap, TARGETS["accuracy_gap_points"])
    return checks


def check(value: float, maximum: float) -> dict:
    return {"value": value, "max": maximum, "pass": value <= maximum}


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(main()))
