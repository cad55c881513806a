"""Packed training rows against the padded layout, side by side in one process: the tied recipe
(recipes/sst2-lora-minilm-tied.yaml) trained per dataset × seed twice, once with its rows padded and
the descriptions in their own forward (as before backbones/packing.py), once packed; seconds in `fit`
and test accuracy for each, with the CPU it ran on. The two differ only in the dropout masks drawn,
so accuracies differ by that noise alone. Prints one JSON object (last line).

    .venv/bin/python benchmarks/packing.py --datasets sst2 agnews --set training.mixed_precision=no
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 \\
        .venv/bin/python benchmarks/packing.py --set training.mixed_precision=no   # an AVX2-only CPU, emulated
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _common import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "sst2-lora-minilm-tied.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["sst2", "agnews"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="k-shot draw and training seeds")
    parser.add_argument("--k", type=int, default=16, help="training examples per class")
    parser.add_argument("--test-limit", type=int, default=1000, help="first N test rows")
    parser.add_argument("--set", nargs="*", default=[], dest="overrides", help="recipe overrides (a.b=value)")
    return parser.parse_args(argv)


def run(dataset: str, seed: int, packed: bool, args) -> dict:
    import tempfile

    from adapterlab.model import AdapterModel
    from adapterlab.recipe import load_recipe
    from adapterlab.training.builders import setup
    from adapterlab.training.loop import evaluate, fit

    packs_rows = AdapterModel.__dict__["packs_rows"]
    if not packed:  # the padded layout: what training ran before rows were packed
        AdapterModel.packs_rows = property(lambda self: False)
    try:
        with tempfile.TemporaryDirectory() as store:
            recipe = load_recipe(RECIPE, [f"task={dataset}", f"data.path={SHARED_DATA / dataset}", f"data.k={args.k}",
                                          f"data.seed={seed}", f"training.seed={seed}", f"data.test_limit={args.test_limit}",
                                          f"output.store={store}", *args.overrides])
            accelerator, task, model = setup(recipe)
            started = time.perf_counter()
            fit(model, task.train, recipe, accelerator, show_progress=False)
            seconds = time.perf_counter() - started
            metrics = evaluate(accelerator.unwrap_model(model), task.test, recipe)
    finally:
        AdapterModel.packs_rows = packs_rows
    return {"dataset": dataset, "seed": seed, "layout": "packed" if packed else "padded",
            "mixed_precision": str(accelerator.mixed_precision), "train_seconds": round(seconds, 2),
            "accuracy": round(metrics["accuracy"], 4), "load_average": round(os.getloadavg()[0], 2)}


def main(argv=None) -> dict:
    import torch

    from adapterlab.precision import cpu_capability

    args = parse_args(argv)
    cells = []
    for dataset in args.datasets:
        for seed in args.seeds:
            pair = [run(dataset, seed, packed, args) for packed in (False, True)]
            for cell in pair:
                print(json.dumps(cell), file=sys.stderr)
            cells += pair
            pair[1]["time_ratio"] = round(pair[1]["train_seconds"] / pair[0]["train_seconds"], 3)
    summary = {"benchmark": "packing", "cpu": cpu_capability(), "threads": torch.get_num_threads(),
               "isa_limit": os.environ.get("ONEDNN_MAX_CPU_ISA"), "overrides": args.overrides, "cells": cells}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
