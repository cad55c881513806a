"""How well does training.select's cross-validation estimate predict test accuracy? The few-shot report's
recipe (recipes/sst2-lora-minilm-tied.yaml) choosing its epochs and prototype weight by 2-fold CV on
the k-shot rows, per dataset × seed: the chosen adapter's test accuracy beside its cv_accuracy, the
zero-shot start's CV estimate and test accuracy (the floor: below_zero_shot), and what the selection
cost against the final run. Each finished cell is appended to --out/fewshot-cv.jsonl and skipped on a
rerun; a markdown table of all cells goes to --out/fewshot-cv.md. Prints one JSON object (last line).

    .venv/bin/python benchmarks/fewshot_cv.py --datasets sst2 mpqa --seeds 0 1 2
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "sst2-lora-minilm-tied.yaml"
SHARED_DATA = ROOT.parent / "shared" / "data"
# 1.5 single runs in optimizer steps (2 folds, each training on half the rows: 15 + 30 epochs); the
# prototype weights share those trainings.
SELECT = "{folds: 2, grid: {training.epochs: [15, 30], head.prototype_weight: [0, 0.5, 1]}}"
CELLS = "fewshot-cv.jsonl"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["sst2", "mpqa"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="k-shot draw and training seeds")
    parser.add_argument("--k", type=int, default=16, help="training examples per class")
    parser.add_argument("--test-limit", type=int, default=1000, help="first N test rows")
    parser.add_argument("--select", default=SELECT, help="the training.select section, as --set writes it")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results folder")
    return parser.parse_args(argv)


def run_cell(dataset: str, seed: int, args) -> dict:
    from adapterlab.data import load_task
    from adapterlab.engine import Engine
    from adapterlab.recipe import load_recipe
    from adapterlab.store import read_card
    from adapterlab.train import train

    store = args.out / "fewshot-cv-adapters"
    name = f"k{args.k}-s{seed}"
    recipe = load_recipe(RECIPE, [
        f"task={dataset}", f"data.path={SHARED_DATA / dataset}", f"data.k={args.k}", f"data.seed={seed}",
        f"training.seed={seed}", f"data.test_limit={args.test_limit}", f"training.select={args.select}",
        f"output.store={store}", f"output.name={name}"])
    result = train(recipe, show_progress=False)
    selection = read_card(result.adapter_path).selection
    engine = Engine("minilm", store, dtype="float32")
    test = load_task(recipe.data).test
    labels = engine.card(f"{dataset}/{name}").labels
    start = engine.classify(engine.baseline(f"{dataset}/{name}"), test.texts, test.text_pairs)
    return {"dataset": dataset, "seed": seed, "k": args.k, "test_limit": args.test_limit, "select": args.select,
            "test_accuracy": round(result.metrics["accuracy"], 4), "cv_accuracy": selection["cv_accuracy"],
            "zero_shot_cv_accuracy": selection["zero_shot_cv_accuracy"],
            "zero_shot_test_accuracy": round(sum(p.label == labels[y] for p, y in zip(start, test.labels)) / len(test), 4),
            "below_zero_shot": selection["below_zero_shot"], "fell_back": selection["fell_back"],
            "chosen": selection["chosen"], "points": selection["points"],
            "select_seconds": selection["seconds"], "train_seconds": round(result.train_seconds, 3),
            "time_ratio": selection["time_ratio"], "steps_ratio": selection["steps_ratio"],
            "recipe_as_written_accuracy": report_accuracy(dataset, seed, args.k, args.test_limit),
            "load_average": round(os.getloadavg()[0], 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def report_accuracy(dataset: str, seed: int, k: int, test_limit: int) -> float | None:
    """The same recipe without selection in the few-shot report (fewshot.json), where it ran these rows."""
    report = json.loads((ROOT / "benchmarks" / "results" / "fewshot.json").read_text())
    if (report["k"], report["test_limit"]) != (k, test_limit):
        return None
    return report["datasets"].get(dataset, {}).get("adapterlab", {}).get("per_seed", {}).get(str(seed), {}).get("accuracy")


def read_cells(file: Path) -> list[dict]:
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()] if file.is_file() else []


def markdown(cells: list[dict]) -> str:
    header = ("| dataset | seed | chosen | cv_accuracy | test accuracy | recipe as written (report) | zero-shot CV / test "
              "| below zero-shot | select s / final s (ratio) |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        chosen = ", ".join(f"{key.split('.')[-1]} {value}" for key, value in c["chosen"].items())
        lines.append(f"| {c['dataset']} | {c['seed']} | {chosen} | {100 * c['cv_accuracy']:.1f} | "
                     f"{100 * c['test_accuracy']:.1f} | {_pct(c['recipe_as_written_accuracy'])} | {100 * c['zero_shot_cv_accuracy']:.1f} / "
                     f"{100 * c['zero_shot_test_accuracy']:.1f} | {c['below_zero_shot']} | {c['select_seconds']:.0f} / "
                     f"{c['train_seconds']:.0f} ({c['time_ratio']}) |")
    if cells:
        gap = sum(abs(c["cv_accuracy"] - c["test_accuracy"]) for c in cells) / len(cells)
        lines.append(f"\nMean over {len(cells)} cells: cv_accuracy {_pct(_mean(cells, 'cv_accuracy'))}, test "
                     f"{_pct(_mean(cells, 'test_accuracy'))}, mean |cv - test| {100 * gap:.1f} points; selection "
                     f"{_mean(cells, 'time_ratio'):.2f}x the final run's seconds.")
    return "\n".join(lines) + "\n"


def _mean(cells: list[dict], key: str) -> float:
    return sum(c[key] for c in cells) / len(cells)


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    file = args.out / CELLS
    done = {(c["dataset"], c["seed"], c["k"], c["test_limit"], c["select"]) for c in read_cells(file)}
    for dataset in args.datasets:
        for seed in args.seeds:
            if (dataset, seed, args.k, args.test_limit, args.select) in done:
                continue
            cell = run_cell(dataset, seed, args)
            with open(file, "a") as handle:
                handle.write(json.dumps(cell) + "\n")
            print(json.dumps(cell), file=sys.stderr)
    cells = read_cells(file)
    (args.out / "fewshot-cv.md").write_text(markdown(cells))
    summary = {"benchmark": "fewshot_cv", "cells": len(cells)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
