"""The adapter library, measured leave-one-out: what starting from stored adapters gives a task they never saw.

1. The library: recipes/library-minilm.yaml (the recommended recipe's method and head, a dataset's whole train
   split, 500 steps) once per shared dataset, into WORK/library/<dataset>/library.
2. For each target dataset × seed at k rows a class, a store that holds the other datasets' library adapters
   only (never the target's: WORK/stores/<target>/, links into the library), and the recommended recipe
   (recipes/sst2-lora-minilm-tied.yaml) trained on the target's k-shot rows:
   - scratch: as written (a fresh adapter);
   - auto: `training.init_from: auto` (the k-shot rows choose a source or none); its seconds count the
     choice: scoring the candidates, the cross-validation and the final run;
   - oracle (--oracle-seeds): trained from every source in turn, the best test accuracy: a ceiling that
     reads the test rows, not a method;
   zero-shot and SetFit come from the few-shot report's cells (benchmarks/results/fewshot-sweep-test1000,
   fewshot-setfit.jsonl): the same k-shot rows, seeds and test rows; each names the CPU it ran on.
--backbone mpnet does it all on all-mpnet-base-v2 (the recipes as written but for their backbone), with a
library, stores, cells and report of its own (WORK and OUT named -mpnet) beside the few-shot report's mpnet
cells. Every finished cell is kept in OUT/cells.jsonl (a rerun skips it). Writes library.json, library.md and
library.png to OUT; prints the report's JSON as the last line.

    .venv/bin/python benchmarks/library.py --library-only                       # the nine library adapters
    .venv/bin/python benchmarks/library.py --datasets sst2 mpqa --seeds 0 1 2   # and their cells
    .venv/bin/python benchmarks/library.py --backbone mpnet --library-only      # all-mpnet-base-v2's library
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _common import (BACKBONES, PAIR_FIELDS, SHARED_DATA, append_jsonl, backbone_path, backbone_tag, cell_cpu,
                     describe_cell_cpu, fewshot_files, git_commit, of_backbone, plot_accuracy_bars, read_jsonl,
                     sample_std, wait_for_quiet)
from adapterlab.precision import cpu_capability
from adapterlab.recipe import load_recipe
from adapterlab.store import read_card
from adapterlab.training import train

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_RECIPE = ROOT / "recipes" / "library-minilm.yaml"
TARGET_RECIPE = ROOT / "recipes" / "sst2-lora-minilm-tied.yaml"
FEWSHOT = ROOT / "benchmarks" / "results"
DATASETS = ["sst2", "sst5", "imdb", "mpqa", "agnews", "emotion", "banking77", "rte", "cb"]
METHODS = ["zeroshot", "scratch", "auto", "oracle", "setfit"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS, help="targets")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--oracle-seeds", type=int, nargs="*", default=[0], help="seeds that also get the oracle")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--test-limit", type=int, default=1000)
    parser.add_argument("--library-only", action="store_true", help="train the library adapters and stop")
    parser.add_argument("--backbone", choices=BACKBONES, default="minilm",
                        help="the library's and every cell's backbone (mpnet: all-mpnet-base-v2, made once from PyPI)")
    parser.add_argument("--out", type=Path,
                        help="cells and report (default benchmarks/results/library, library-mpnet for mpnet)")
    parser.add_argument("--work", type=Path,
                        help="the library and the leave-one-out stores (adapters, not committed; default "
                             "~/.cache/adapterlab/library-benchmark, library-benchmark-mpnet for mpnet)")
    args = parser.parse_args(argv)
    tag = backbone_tag(args.backbone)
    args.out = args.out or ROOT / "benchmarks" / "results" / f"library{tag}"
    args.work = args.work or Path.home() / ".cache" / "adapterlab" / f"library-benchmark{tag}"
    return args


def data_settings(dataset: str) -> list[str]:
    pair = PAIR_FIELDS.get(dataset)
    return [f"data.path={SHARED_DATA / dataset}", f"task={dataset}"] + ([f"data.text_pair_field={pair}"] if pair else [])


def build_library(out: Path, backbone: str) -> None:
    """One library adapter per shared dataset on `backbone` (kept: a rerun trains only the missing ones)."""
    for dataset in DATASETS:
        if (out / "library" / dataset / "library" / "card.json").is_file():
            continue
        wait_for_quiet()
        recipe = load_recipe(LIBRARY_RECIPE, [*data_settings(dataset), f"backbone={backbone_path(backbone)}",
                                              f"output.store={out / 'library'}"])
        result = train(recipe, show_progress=False)
        print(f"library {dataset}: {result.metrics} in {result.train_seconds:.0f}s", file=sys.stderr)


def target_store(out: Path, target: str) -> Path:
    """The leave-one-out store of `target`: links to every other dataset's library adapter."""
    store = out / "stores" / target
    for dataset in DATASETS:
        link = store / dataset / "library"
        if dataset != target and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(out / "library" / dataset / "library", target_is_directory=True)
    return store


def run_cell(work: Path, target: str, seed: int, method: str, args) -> dict:
    """One trained cell: its test metrics and seconds (auto: counting the choice), what auto chose."""
    store = target_store(work, target)
    settings = [*data_settings(target), f"data.k={args.k}", f"data.seed={seed}", f"training.seed={seed}",
                f"data.test_limit={args.test_limit}", f"output.store={store}",
                f"backbone={backbone_path(args.backbone)}"]
    if method == "oracle":
        sources = [f"{d}/library" for d in DATASETS if d != target]
        runs = [run_recipe(settings + [f"training.init_from={s}", f"output.name=oracle-{s.split('/')[0]}-s{seed}"])
                for s in sources]
        best = max(runs, key=lambda run: run["accuracy"])
        return {**best, "sources": {s: round(run["accuracy"], 4) for s, run in zip(sources, runs)}}
    init = ["training.init_from=auto"] if method == "auto" else []
    return run_recipe(settings + init + [f"output.name={method}-s{seed}"])


def run_recipe(settings: list[str]) -> dict:
    wait_for_quiet()
    card = read_card(train(load_recipe(TARGET_RECIPE, settings), show_progress=False).adapter_path)
    choice = card.init_from or {}
    seconds = card.train_seconds + (card.selection or {}).get("seconds", 0) + choice.get("seconds", 0)
    return {"accuracy": card.metrics["accuracy"], "macro_f1": card.metrics["macro_f1"], "seconds": round(seconds, 3),
            "source": choice.get("source"), "tried": choice.get("tried"), "candidates": choice.get("candidates")}


def fewshot_cells(k: int, backbone: str) -> list[dict]:
    """The few-shot report's zero-shot, recipe and SetFit cells on `backbone` (same rows, seeds, test rows)."""
    files = fewshot_files(backbone)
    sweep = [{**row, "method": {"lora": "scratch (few-shot report)"}.get(row["method"], row["method"])}
             for row in read_jsonl(FEWSHOT / files["sweep"] / "results.jsonl") if row["k"] in (0, k)]
    setfit = [row for row in of_backbone(read_jsonl(FEWSHOT / files["setfit"]), backbone)
              if row.get("status") == "ok"]
    return [{**row, "seconds": row.get("train_seconds", 0.0)} for row in sweep + setfit]


def report(cells: list[dict], previous: list[dict], datasets: list[str], seeds: list[int]) -> dict:
    """Per dataset and method: mean ± std accuracy and mean seconds over the seeds; auto's choices."""
    table = {}
    for dataset in datasets:
        table[dataset] = {}
        for method in METHODS:
            rows = [c for c in (cells if method in ("scratch", "auto", "oracle") else previous)
                    if c["dataset"] == dataset and c["method"] == method and (method == "zeroshot" or c["seed"] in seeds)]
            if rows:
                accuracies = [row["accuracy"] for row in rows]
                table[dataset][method] = {"mean": statistics.mean(accuracies), "std": sample_std(accuracies),
                                          "seeds": len(rows), "seconds": statistics.mean(r["seconds"] for r in rows)}
        auto = [c for c in cells if c["dataset"] == dataset and c["method"] == "auto"]
        oracle_seeds = {c["seed"] for c in cells if c["dataset"] == dataset and c["method"] == "oracle"}
        on_oracle_seeds = [c["accuracy"] for c in auto if c["seed"] in oracle_seeds]
        zero_shot = table[dataset].get("zeroshot", {}).get("mean")
        table[dataset] |= {
            "auto_chose": [c["source"] for c in auto],
            "auto_on_oracle_seeds": statistics.mean(on_oracle_seeds) if on_oracle_seeds else None,
            "auto_seeds_below_zero_shot": None if zero_shot is None else sum(c["accuracy"] < zero_shot for c in auto)}
    return {"table": table, "summary": summary(table)}


def summary(table: dict) -> dict:
    """Means over the datasets that have every compared method."""
    def mean_of(method: str, key: str = "mean"):
        values = [row[method][key] for row in table.values() if method in row and "setfit" in row and "auto" in row]
        return statistics.mean(values) if values else None

    gaps = [row["oracle"]["mean"] - row["auto_on_oracle_seeds"] for row in table.values()
            if "oracle" in row and row["auto_on_oracle_seeds"] is not None]
    return {method: mean_of(method) for method in METHODS if method != "oracle"} | {
        "oracle_minus_auto_on_its_seeds": statistics.mean(gaps) if gaps else None, "oracle_datasets": len(gaps),
        "auto_minus_setfit": _minus(mean_of("auto"), mean_of("setfit")),
        "auto_minus_scratch": _minus(mean_of("auto"), mean_of("scratch")),
        "auto_time_ratio_to_setfit": _ratio(table),
        "auto_seeds_below_zero_shot": sum(row["auto_seeds_below_zero_shot"] or 0 for row in table.values())}


def _minus(a, b):
    return None if a is None or b is None else a - b


def _ratio(table: dict):
    ratios = [row["auto"]["seconds"] / row["setfit"]["seconds"] for row in table.values()
              if "auto" in row and "setfit" in row and row["setfit"]["seconds"]]
    return statistics.mean(ratios) if ratios else None


def markdown(result: dict, cpu: str, when: str, head: str, backbone: str) -> str:
    lines = [f"# The adapter library, leave-one-out ({backbone}, k=16, {when}, {cpu}, commit {head})", "",
             "| dataset | zero-shot | scratch | auto | SetFit | auto chose | auto s / SetFit s | oracle (auto) |",
             "|---|---|---|---|---|---|---|---|"]
    for dataset, row in result["table"].items():
        cell = lambda m: f"{100 * row[m]['mean']:.1f} ± {100 * row[m]['std']:.1f}" if m in row else "-"  # noqa: E731
        ratio = f"{row['auto']['seconds']:.0f} / {row['setfit']['seconds']:.0f}" if "auto" in row and "setfit" in row else "-"
        chose = ", ".join(source or "none" for source in row["auto_chose"]) or "-"
        oracle = (f"{100 * row['oracle']['mean']:.1f} ({100 * row['auto_on_oracle_seeds']:.1f})"
                  if "oracle" in row and row["auto_on_oracle_seeds"] is not None else "-")
        lines.append(f"| {dataset} | {cell('zeroshot')} | {cell('scratch')} | {cell('auto')} | {cell('setfit')} | "
                     f"{chose} | {ratio} | {oracle} |")
    s = result["summary"]
    points = lambda v: "-" if v is None else f"{100 * v:+.2f}"  # noqa: E731
    ratio = "-" if s["auto_time_ratio_to_setfit"] is None else f"{s['auto_time_ratio_to_setfit']:.2f}"
    lines += ["", f"Mean over the datasets with every method: auto − SetFit {points(s['auto_minus_setfit'])} points, "
              f"auto − scratch {points(s['auto_minus_scratch'])} points; auto's seconds ÷ SetFit's, per dataset, "
              f"averaged: {ratio}; auto seeds below zero-shot: {s['auto_seeds_below_zero_shot']}; oracle − auto on "
              f"the oracle's seeds, over its {s['oracle_datasets']} datasets: {points(s['oracle_minus_auto_on_its_seeds'])} "
              "points. Zero-shot and "
              "SetFit are the few-shot report's cells (same rows and seeds). Oracle: on the seeds it ran, the best "
              "test accuracy of the recipe trained from each source in turn (a ceiling that reads the test rows), "
              "beside auto's on the same seeds."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    build_library(args.work, args.backbone)
    if args.library_only:
        return {}
    cells_file = args.out / "cells.jsonl"
    done = {(c["dataset"], c["seed"], c["method"]) for c in of_backbone(read_jsonl(cells_file), args.backbone)}
    cpu = cpu_capability()
    for dataset in args.datasets:
        for seed in args.seeds:
            for method in ["scratch", "auto"] + (["oracle"] if seed in args.oracle_seeds else []):
                if (dataset, seed, method) in done:
                    continue
                started = time.strftime("%Y-%m-%d")
                row = {"dataset": dataset, "seed": seed, "method": method, "backbone": args.backbone, "k": args.k,
                       **run_cell(args.work, dataset, seed, method, args), **cell_cpu(cpu), "date": started,
                       "commit": git_commit()}
                append_jsonl(cells_file, row)
                print(f"{dataset} s{seed} {method}: {row['accuracy']:.3f} in {row['seconds']:.0f}s"
                      f"{' from ' + str(row['source']) if method != 'scratch' else ''}", file=sys.stderr)
    cells = of_backbone(read_jsonl(cells_file), args.backbone)
    measured = [d for d in DATASETS if any(c["dataset"] == d for c in cells)]  # every kept cell, not this run's only
    result = report(cells, fewshot_cells(args.k, args.backbone), measured, args.seeds)
    cpus = sorted({describe_cell_cpu(c) for c in cells})
    dates = sorted({c["date"] for c in cells})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}" if dates else "-"
    (args.out / "library.json").write_text(json.dumps(result, indent=1))
    (args.out / "library.md").write_text(markdown(result, "; ".join(cpus), when, git_commit(), args.backbone))
    shown = [d for d in measured if result["table"][d]]
    oracle_seeds = sorted({c["seed"] for c in cells if c["method"] == "oracle"})
    label = lambda m: f"oracle (seed {', '.join(map(str, oracle_seeds))})" if m == "oracle" else m  # noqa: E731
    bars = [(label(m), [result["table"][d].get(m, {}).get("mean", 0) for d in shown],
             [result["table"][d].get(m, {}).get("std", 0) for d in shown]) for m in METHODS]
    plot_accuracy_bars(args.out / "library.png", shown, bars, args.k)
    print(json.dumps(result["summary"]))
    return result


if __name__ == "__main__":
    main()
