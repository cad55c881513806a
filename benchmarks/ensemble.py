"""Ensembles against single adapters: accuracy and its spread over seeds, at equal training time, and the
serving cost per row.

For each dataset × seed (the seed draws the k-shot rows and seeds training, as in benchmarks/fewshot.py),
on the shipped recipe recipes/sst2-lora-minilm-tied.yaml (precision auto):
  - single:   one adapter (training seed = seed). It is the ensemble's member 0: the same recipe, rows
              and seed, so it is read from the ensemble's card instead of being trained twice;
  - ensemble: --members adapters (training seeds seed, seed+1, ...) stored and served as one;
  - long:     one adapter given the ensemble's training budget (epochs × members): equal training time.
Every cell is evaluated on the first --test-limit test rows. The spread is the std (and range) over seeds;
"member spread" is the std among one draw's members (training seed alone). Serving cost: engine rows/s
of one ensemble against its member 0 alone (the same adapter settings), on the same test texts, after a
warm-up pass of each, the best of three alternated runs.
Finished cells are kept in ensemble.jsonl (a rerun resumes). Prints one JSON object on stdout (last line)
and writes ensemble.json, ensemble.md and ensemble.png to --out; progress goes to stderr.

    .venv/bin/python benchmarks/ensemble.py                                   # sst2 mpqa emotion, seeds 0 1 2
    .venv/bin/python benchmarks/ensemble.py --datasets sst2 --seeds 0 --test-limit 200 --out /tmp/ens
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

from _common import (PAIR_FIELDS, SHARED_DATA, append_jsonl, cell_cpu, describe_cell_cpu, describe_cpu, plot_accuracy_bars,
                     read_jsonl, sample_std, wait_for_quiet)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "sst2-lora-minilm-tied.yaml"
SWEEP_FILE = ROOT / "recipes" / "sweeps" / "minilm-single-text.yaml"  # the shared datasets and their settings
CELLS = "ensemble.jsonl"
KINDS = ("ensemble", "long")


def dataset_settings(dataset: str) -> dict:
    """A shared dataset's data settings: the sweep's for single-text tasks, the pair column for pair tasks."""
    if dataset in PAIR_FIELDS:
        return {"path": str(SHARED_DATA / dataset), "text_pair_field": PAIR_FIELDS[dataset]}
    settings = dict(yaml.safe_load(SWEEP_FILE.read_text())["datasets"][dataset])
    return {**settings, "path": str((ROOT / settings["path"]).resolve())}


def parse_args(argv=None) -> argparse.Namespace:
    datasets = [*yaml.safe_load(SWEEP_FILE.read_text())["datasets"], *PAIR_FIELDS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["sst2", "mpqa", "emotion"], choices=datasets)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="k-shot draw and training seeds")
    parser.add_argument("--k", type=int, default=16, help="training examples per class")
    parser.add_argument("--members", type=int, default=3, help="ensemble members (and the long run's epoch factor)")
    parser.add_argument("--test-limit", type=int, default=1000, help="first N test rows (0: the whole test split)")
    parser.add_argument("--serve-rows", type=int, default=256, help="test texts timed for the serving cost")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results folder")
    return parser.parse_args(argv)


def cell_recipe(options, dataset: str, seed: int, kind: str):
    from adapterlab.recipe import load_recipe

    base = load_recipe(RECIPE)
    data = dataset_settings(dataset)
    overrides = [f"task={dataset}", f"data.path={data.pop('path')}", f"data.k={options.k}",
                 f"data.seed={seed}", f"training.seed={seed}", f"output.store={options.out / 'ensemble-adapters'}",
                 f"output.name={kind}-k{options.k}-s{seed}-m{options.members}"]
    overrides += [f"data.{key}={value}" for key, value in data.items()]
    if options.test_limit:
        overrides.append(f"data.test_limit={options.test_limit}")
    if kind == "ensemble":
        overrides.append(f"training.ensemble={options.members}")
    else:
        overrides.append(f"training.epochs={base.training.epochs * options.members}")
    return load_recipe(RECIPE, overrides)


def cell_key(row: dict) -> tuple:
    return row["dataset"], row["seed"], row["kind"], row["k"], row["members"], row["test_limit"]


def run_cell(options, dataset: str, seed: int, kind: str) -> dict:
    from adapterlab.precision import cpu_capability
    from adapterlab.store import read_card
    from adapterlab.training import train

    recipe = cell_recipe(options, dataset, seed, kind)
    load, started = os.getloadavg()[0], time.perf_counter()
    result = train(recipe, show_progress=False)
    card = read_card(result.adapter_path)
    cpu = cpu_capability()
    return {"dataset": dataset, "seed": seed, "kind": kind, "k": options.k, "members": options.members,
            "test_limit": options.test_limit or None, "adapter": str(result.adapter_path),
            "accuracy": card.metrics["accuracy"], "macro_f1": card.metrics["macro_f1"],
            "train_seconds": card.train_seconds, "wall_seconds": round(time.perf_counter() - started, 1),
            "epochs": card.recipe["training"]["epochs"], "mixed_precision": card.recipe["training"]["mixed_precision"],
            "member_cells": card.members, "load_average_at_start": round(load, 2),
            **cell_cpu(cpu)}


def run_cells(options) -> list[dict]:
    """Every ensemble cell first (each also holds its single adapter, member 0), then the equal-time ones;
    seed by seed over the datasets, so that partial runs cover every dataset. Finished cells are skipped."""
    file = options.out / CELLS
    done = {cell_key(row) for row in read_jsonl(file)}
    for kind in KINDS:
        for seed in options.seeds:
            for dataset in options.datasets:
                key = (dataset, seed, kind, options.k, options.members, options.test_limit or None)
                if key in done:
                    continue
                wait_for_quiet()
                print(f"cell {dataset} seed {seed} {kind} ...", file=sys.stderr, flush=True)
                row = run_cell(options, dataset, seed, kind)
                print(f"  accuracy {row['accuracy']:.4f} in {row['train_seconds']:.0f}s", file=sys.stderr, flush=True)
                append_jsonl(file, row)
    return [row for row in read_jsonl(file) if row["dataset"] in options.datasets and row["seed"] in options.seeds
            and (row["k"], row["members"], row["test_limit"]) == (options.k, options.members, options.test_limit or None)]


def serving_cost(options, rows: list[dict]) -> dict | None:
    """Engine rows/s of an ensemble and of its member 0 alone (same settings), on the same test texts; timed on
    this machine at each report."""
    from adapterlab.data import load_task
    from adapterlab.engine import Engine
    from adapterlab.recipe import DataConfig
    from adapterlab.store import read_card

    # the first ensemble still in the store (a fresh checkout has the cells, not the adapters)
    ensemble = next((row for row in rows if row["kind"] == "ensemble" and Path(row["adapter"]).exists()), None)
    if ensemble is None:
        return None
    folder = Path(ensemble["adapter"])
    data = DataConfig.model_validate({**read_card(folder).recipe["data"], "k": None,
                                      "test_limit": options.serve_rows})
    texts = load_task(data).test.texts
    wait_for_quiet()
    engine = Engine("minilm", folder.parents[1])
    references = {"single": str(folder / "members" / "0"), "ensemble": str(folder)}
    timings = {name: 0.0 for name in references}
    for reference in references.values():
        engine.predict(reference, texts)  # loaded, and the kernels of the batches' shapes warm
    for _ in range(3):  # alternated, the best of three: other jobs on the machine come and go
        for name, reference in references.items():
            started = time.perf_counter()
            engine.predict(reference, texts)
            timings[name] = max(timings[name], len(texts) / (time.perf_counter() - started))
    return {"dataset": ensemble["dataset"], "rows": len(texts), "engine_dtype": str(engine.backbone.dtype),
            "batch_size": engine.batch_size, "single_rows_per_s": round(timings["single"], 1),
            "ensemble_rows_per_s": round(timings["ensemble"], 1),
            "cost_ratio": round(timings["single"] / timings["ensemble"], 2)}


def stats(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"mean": statistics.mean(values), "std": sample_std(values),
            "min": min(values), "max": max(values), "n": len(values)}


def summarize(rows: list[dict], datasets: list[str]) -> dict:
    """Per dataset: single (member 0), ensemble and long: accuracy over seeds, train seconds; the
    spread among one draw's members."""
    table = {}
    for dataset in datasets:
        ensembles = sorted((r for r in rows if r["dataset"] == dataset and r["kind"] == "ensemble"),
                           key=lambda r: r["seed"])
        longs = [r for r in rows if r["dataset"] == dataset and r["kind"] == "long"]
        singles = [r["member_cells"][0] for r in ensembles]
        table[dataset] = {
            "seeds": [r["seed"] for r in ensembles],
            # the CPUs its cells ran on: a dataset's times compare within its own cells
            "cpus": sorted({describe_cell_cpu(r) for r in ensembles + longs}),
            "single": stats([m["metrics"]["accuracy"] for m in singles]),
            "ensemble": stats([r["accuracy"] for r in ensembles]),
            "long": stats([r["accuracy"] for r in longs]),
            "member_spread": stats([statistics.stdev(m["metrics"]["accuracy"] for m in r["member_cells"])
                                    for r in ensembles]),
            "train_seconds": {"single": stats([m["train_seconds"] for m in singles]),
                              "ensemble": stats([r["train_seconds"] for r in ensembles]),
                              "long": stats([r["train_seconds"] for r in longs])}}
    return table


def markdown(report: dict) -> str:
    pct = lambda s: "-" if s is None else f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f} (n={s['n']})"  # noqa: E731
    secs = lambda s: "-" if s is None else f"{s['mean']:.0f}"  # noqa: E731
    lines = [f"Ensembles on MiniLM, recipe {RECIPE.name}, k={report['k']}, {report['members']} members, first "
             f"{report['test_limit']} test rows; accuracy % mean ± std over seeds. Each dataset's cells ran on one "
             "CPU (its last column), one cell at a time.", "",
             "| dataset | single | ensemble | single, equal time | member spread (std) | train s single / ens / long | CPU |",
             "|---|---|---|---|---|---|---|"]
    for dataset, entry in report["datasets"].items():
        spread, seconds = entry["member_spread"], entry["train_seconds"]
        member_std = "-" if spread is None else f"{100 * spread['mean']:.1f}"
        lines.append(f"| {dataset} | {pct(entry['single'])} | {pct(entry['ensemble'])} | {pct(entry['long'])} | "
                     f"{member_std} | {secs(seconds['single'])} / {secs(seconds['ensemble'])} / {secs(seconds['long'])} | "
                     f"{', '.join(entry['cpus'])} |")
    serving = report.get("serving")
    if serving:
        lines += ["", f"Serving ({serving['dataset']}, {serving['rows']} test rows, engine {serving['engine_dtype']}, "
                      f"{describe_cpu(report['cpu'])}, "
                      f"batch {serving['batch_size']}): single {serving['single_rows_per_s']} rows/s, ensemble "
                      f"{serving['ensemble_rows_per_s']} rows/s ({serving['cost_ratio']}x the cost per row)."]
    return "\n".join(lines) + "\n"


def plot(report: dict, file: Path) -> None:
    datasets = list(report["datasets"])
    bars = []
    for kind, label in (("single", "single"), ("ensemble", f"ensemble of {report['members']}"),
                        ("long", "single, equal time")):
        entries = [report["datasets"][d][kind] for d in datasets]
        bars.append((label, [e["mean"] if e else 0 for e in entries], [e["std"] if e else 0 for e in entries]))
    plot_accuracy_bars(file, datasets, bars, report["k"])


def main(argv=None) -> dict:
    from adapterlab.precision import cpu_capability

    options = parse_args(argv)
    options.out.mkdir(parents=True, exist_ok=True)
    rows = run_cells(options)
    report = {"k": options.k, "members": options.members, "test_limit": options.test_limit or None,
              "seeds": options.seeds, "recipe": str(RECIPE.relative_to(ROOT)), "cpu": cpu_capability(),
              "datasets": summarize(rows, options.datasets), "serving": serving_cost(options, rows)}
    (options.out / "ensemble.json").write_text(json.dumps(report, indent=2))
    (options.out / "ensemble.md").write_text(markdown(report))
    plot(report, options.out / "ensemble.png")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
