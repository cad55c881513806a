"""E2E few-shot report: generative adapters against prompting the same backbone, on the same rows.

For each direction × k training rows × seed:
  - adapter: the shipped recipe (generate: recipes/e2e-lora-smollm2.yaml, MR → sentence; extract:
    recipes/e2e-extract-lora-smollm2.yaml, sentence → MR) with data.k, data.seed and training.seed set
    and the epochs of EPOCHS (the recipe's 4 at k=16; past it, about 64 optimizer steps' worth of rows),
    scored by the training run's own evaluation on the first --test-limit test rows;
  - in-context: the bare backbone shown --shots of those same k rows as chat turns, then the test input
    (a seed's draws of different sizes start with the same rows: a cell whose prompts equal those of a
    finished cell at another k takes its figures, marked `same_prompts_as_k`);
  - zero-shot: the bare backbone given the recipe's template alone (one cell per direction).
Greedy decoding everywhere, the recipe's max_new_tokens. Main metric: BLEU (generate), slot F1 (extract).
Every finished cell is appended to OUT/cells.jsonl, so a rerun skips it; e2e.json, e2e.md and e2e.png
are rebuilt from the cells after each one. Progress goes to stderr, the summary (JSON) to stdout.

    .venv/bin/python benchmarks/e2e_fewshot.py                        # k 16 64 256 × seeds 0 1 2
    .venv/bin/python benchmarks/e2e_fewshot.py --k 16 --seeds 0 --test-limit 20 --out /tmp/e2e
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from tqdm.auto import tqdm

from _common import SHARED_DATA, append_jsonl, cell_cpu, pyplot, read_jsonl, sample_std, save_figure

ROOT = Path(__file__).resolve().parents[1]
DIRECTIONS = {"generate": (ROOT / "recipes" / "e2e-lora-smollm2.yaml", "bleu"),
              "extract": (ROOT / "recipes" / "e2e-extract-lora-smollm2.yaml", "slot_f1")}
EPOCHS = {16: 4, 64: 2, 256: 1}  # k rows → passes; other k: the recipe's epochs
SYSTEMS = ("zero-shot", "in-context", "adapter")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directions", nargs="+", choices=list(DIRECTIONS), default=list(DIRECTIONS))
    parser.add_argument("--k", nargs="+", type=int, default=[16, 64, 256])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--test-limit", type=int, default=100)
    parser.add_argument("--shots", type=int, default=4, help="Demonstrations in the in-context prompt.")
    parser.add_argument("--data", default=str(SHARED_DATA / "e2e"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "e2e"))
    return parser.parse_args(argv)


def grid(args) -> list[dict]:
    """Zero-shot first, then k by k (smallest first: a partial run still covers every direction and seed)."""
    cells = [{"direction": direction, "system": "zero-shot", "k": 0, "seed": 0} for direction in args.directions]
    cells += [{"direction": direction, "system": system, "k": k, "seed": seed} for k in args.k for seed in args.seeds
              for direction in args.directions for system in ("in-context", "adapter")]
    return [{**cell, "test_limit": args.test_limit, "shots": args.shots if cell["system"] == "in-context" else 0}
            for cell in cells]


def key(cell: dict) -> tuple:
    return tuple(cell[name] for name in ("direction", "system", "k", "seed", "test_limit", "shots"))


def recipe_for(cell: dict, args, store: Path):
    from adapterlab.recipe import load_recipe

    file, _ = DIRECTIONS[cell["direction"]]
    overrides = [f"data.path={args.data}", f"data.test_limit={args.test_limit}",
                 f"output.store={store}", f"output.name=k{cell['k']}-s{cell['seed']}"]
    if cell["k"]:
        overrides += [f"data.k={cell['k']}", f"data.seed={cell['seed']}", f"training.seed={cell['seed']}"]
        if cell["k"] in EPOCHS:
            overrides.append(f"training.epochs={EPOCHS[cell['k']]}")
    return load_recipe(file, overrides)


def run_adapter(cell: dict, args, store: Path) -> dict:
    from adapterlab.training import train

    result = train(recipe_for(cell, args, store), show_progress=False)
    return {**result.metrics, "train_seconds": round(result.train_seconds, 1)}


def run_prompting(cell: dict, args, engines: dict) -> dict:
    """Zero-shot or in-context: the bare backbone on the recipe's template, through the engine."""
    from adapterlab.engine import Engine
    from adapterlab.baselines import evaluate_prompting

    recipe = recipe_for(cell, args, Path(args.out) / "adapters")
    if recipe.backbone not in engines:
        engines[recipe.backbone] = Engine(recipe.backbone, store=Path(args.out) / "adapters")
    return evaluate_prompting(engines[recipe.backbone], recipe, cell["shots"] if cell["k"] else 0)


def same_prompts(cell: dict, done: list[dict], args) -> dict | None:
    """An in-context cell's metrics from a finished cell of another k whose demonstrations are the same
    rows (a seed's draws of different sizes start alike, and greedy decoding of the same prompts writes
    the same text): computed once, not once per k. None when no such cell is done."""
    if cell["system"] != "in-context":
        return None
    from adapterlab.data import load_pairs

    def shown(k: int) -> list:
        train = load_pairs(recipe_for({**cell, "k": k}, args, Path(args.out) / "adapters").data).train
        return list(zip(train.inputs, train.targets))[:cell["shots"]]

    for row in done:
        if (row["system"] == "in-context" and row["k"] != cell["k"]
                and all(row[name] == cell[name] for name in ("direction", "seed", "test_limit", "shots"))
                and shown(row["k"]) == shown(cell["k"])):
            metrics = {name: value for name, value in row.items() if name not in cell and name not in ("cpu", "fast_bf16")}
            return {**metrics, "same_prompts_as_k": row["k"]}
    return None


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["direction"], row["system"], row["k"]), []).append(row)
    summary = []
    for (direction, system, k), group in sorted(groups.items()):
        metric = DIRECTIONS[direction][1]
        values = [row[metric] for row in group]
        summary.append({"direction": direction, "system": system, "k": k, "metric": metric, "seeds": len(group),
                        "mean": statistics.fmean(values), "std": sample_std(values),
                        "min": min(values)})
    return summary


def verdicts(rows: list[dict]) -> dict:
    """Per direction: does every adapter cell beat zero-shot and the in-context cell of its own rows?"""
    result = {}
    for direction, (_, metric) in DIRECTIONS.items():
        zero = [row[metric] for row in rows if row["direction"] == direction and row["system"] == "zero-shot"]
        adapters = [row for row in rows if row["direction"] == direction and row["system"] == "adapter"]
        if not zero or not adapters:
            continue
        beaten = []
        for adapter in adapters:
            context = [row[metric] for row in rows if row["direction"] == direction and row["system"] == "in-context"
                       and row["k"] == adapter["k"] and row["seed"] == adapter["seed"]]
            beaten.append(bool(context) and adapter[metric] > max(zero[0], context[0]))
        result[direction] = {"metric": metric, "adapter_cells": len(adapters), "beat_both": sum(beaten)}
    return result


def write_report(rows: list[dict], out: Path, cpu: dict) -> dict:
    summary = summarize(rows)
    report = {"benchmark": "e2e_fewshot", "backbone": "smollm2-135m", "cpu": cpu, "epochs": EPOCHS,
              "summary": summary, "verdicts": verdicts(rows)}
    (out / "e2e.json").write_text(json.dumps(report, indent=2))
    lines = ["| direction | metric | k | zero-shot | in-context | adapter | adapter train s |",
             "|---|---|---|---|---|---|---|"]
    for direction, (_, metric) in DIRECTIONS.items():
        zero = next((s for s in summary if s["direction"] == direction and s["system"] == "zero-shot"), None)
        for k in sorted({s["k"] for s in summary if s["direction"] == direction and s["k"]}):
            cell = {s["system"]: s for s in summary if s["direction"] == direction and s["k"] == k}
            seconds = [row["train_seconds"] for row in rows if row["direction"] == direction
                       and row["system"] == "adapter" and row["k"] == k]
            zero_text = f"{zero['mean']:.2f}" if zero else "-"
            seconds_text = f"{statistics.fmean(seconds):.0f}" if seconds else "-"
            lines.append(f"| {direction} | {metric} | {k} | {zero_text} | {_shown(cell.get('in-context'))} | "
                         f"{_shown(cell.get('adapter'))} | {seconds_text} |")
    (out / "e2e.md").write_text("\n".join(lines) + "\n")
    plot(summary, out)
    return report


def _shown(summary: dict | None) -> str:
    return f"{summary['mean']:.2f} ± {summary['std']:.2f} ({summary['seeds']})" if summary else "-"


def plot(summary: list[dict], out: Path) -> None:
    """A panel per direction: the adapter and in-context against k (mean ± std over seeds), zero-shot dashed."""
    directions = [d for d in DIRECTIONS if any(s["direction"] == d for s in summary)]
    figure, axes = pyplot().subplots(1, len(directions), figsize=(5 * len(directions), 3.8), squeeze=False)
    for axis, direction in zip(axes[0], directions):
        metric = DIRECTIONS[direction][1]
        for system in ("adapter", "in-context"):
            points = sorted((s["k"], s["mean"], s["std"]) for s in summary
                            if s["direction"] == direction and s["system"] == system)
            if points:
                xs, means, stds = zip(*points)
                axis.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=system)
        for s in summary:
            if s["direction"] == direction and s["system"] == "zero-shot":
                axis.axhline(s["mean"], linestyle="--", color="grey", label="zero-shot")
        axis.set(title=f"E2E {direction}", xlabel="k (training rows)", ylabel=metric, xscale="log")
        axis.legend(fontsize=8)
    save_figure(figure, out / "e2e.png")


def main(argv=None) -> int:
    from adapterlab.precision import cpu_capability

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cells_file = out / "cells.jsonl"
    done = read_jsonl(cells_file)
    wanted = {key(cell) for cell in grid(args)}
    todo = [cell for cell in grid(args) if key(cell) not in {key(row) for row in done}]
    cpu = cpu_capability()
    engines: dict = {}
    for cell in tqdm(todo, desc="e2e cells"):
        if cell["system"] == "adapter":
            metrics = run_adapter(cell, args, out / "adapters")
        else:
            metrics = same_prompts(cell, done, args) or run_prompting(cell, args, engines)
        row = {**cell, **metrics, **cell_cpu(cpu)}
        append_jsonl(cells_file, row)
        done.append(row)
        print(json.dumps(row), file=sys.stderr)
        write_report([row for row in done if key(row) in wanted], out, cpu)
    report = write_report([row for row in done if key(row) in wanted], out, cpu)
    print(json.dumps({"summary": report["summary"], "verdicts": report["verdicts"]}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
