"""The few-shot frontier: every path the project ships against SetFit, in accuracy and training time.

Reads the kept cells (k=16, one row per dataset × seed; nothing is trained here):
  - the few-shot report (fewshot.json: zero-shot, the recommended recipe, the same with CV, SetFit on MiniLM;
    fewshot-mpnet.json where it exists: the recipe, with CV, and SetFit on all-mpnet-base-v2);
  - the library benchmark (library/cells.jsonl: `init_from: auto`, its seconds counting the choice);
  - the LLM tier (smollm2-sst2-agnews/results.jsonl: SmolLM2 LoRA, prefix-tuning, in-context, 200 test rows;
    smollm2-nine/results.jsonl: prefix-tuning and zero-shot with the prompt written from the label
    descriptions, the report's test rows, every shared dataset but banking77);
  - the tier choice (tiered-nine/results.jsonl: recipes/tiered-minilm-smollm2.yaml, MiniLM or SmolLM2 chosen
    per cell by cross-validation, its seconds counting the selection).
Each path is compared with SetFit on the cells both have, so that paths measured on fewer datasets still
compare fairly: the mean accuracy difference in points and the mean per-dataset ratio of training seconds.
Writes frontier.json, frontier.md and frontier.png (points over SetFit (MiniLM) against the time ratio, log
scale; SetFit at 1, zero-shot as a line) to benchmarks/results/, and frontier-mpnet.* against SetFit on
all-mpnet-base-v2 (the 110M budget) where its cells exist.

    .venv/bin/python benchmarks/frontier.py
"""

import json
import statistics
import textwrap
from pathlib import Path

from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from _common import describe_cpu, git_commit, pyplot, read_jsonl, save_figure

RESULTS = Path(__file__).resolve().parent / "results"
PEERS = {"": "SetFit (MiniLM)", "-mpnet": "SetFit (mpnet)"}  # file suffix: the peer every path is held against


def report_cells(file: Path, methods: dict[str, str]) -> dict[str, dict]:
    """{path name: {(dataset, seed): (accuracy, seconds)}} from a few-shot report's per-seed figures."""
    if not file.exists():
        return {}
    report = json.loads(file.read_text())
    paths = {name: {} for name in methods.values()}
    for dataset, entry in report["datasets"].items():
        for key, name in methods.items():
            for seed, cell in ((entry.get(key) or {}).get("per_seed") or {}).items():
                paths[name][dataset, int(seed)] = (cell["accuracy"], cell["train_seconds"])
    return {name: cells for name, cells in paths.items() if cells}


def zero_shot_cells(file: Path) -> dict[tuple[str, int], tuple[float, float]]:
    """Zero-shot's accuracy per dataset, as a cell for each seed SetFit ran (no training: 0 s)."""
    report = json.loads(file.read_text())
    return {(dataset, int(seed)): (entry["zero_shot"], 0.0) for dataset, entry in report["datasets"].items()
            for seed in ((entry.get("setfit") or {}).get("per_seed") or {}) if entry["zero_shot"] is not None}


def jsonl_cells(file: Path, methods: dict[str, str], seconds: str) -> dict[str, dict]:
    paths: dict[str, dict] = {}
    for row in read_jsonl(file):
        if row.get("method") in methods and row.get("backbone", "minilm") == "minilm":
            paths.setdefault(methods[row["method"]], {})[row["dataset"], row["seed"]] = (row["accuracy"], row[seconds])
    return paths


def gather() -> dict[str, dict]:
    paths = report_cells(RESULTS / "fewshot.json", {"adapterlab": "tied recipe (MiniLM)",
                                                    "adapterlab_cv": "tied recipe + CV (MiniLM)", "setfit": PEERS[""]})
    paths |= report_cells(RESULTS / "fewshot-mpnet.json", {"adapterlab": "tied recipe (mpnet)",
                                                           "adapterlab_cv": "tied recipe + CV (mpnet)",
                                                           "setfit": PEERS["-mpnet"]})
    paths |= jsonl_cells(RESULTS / "library" / "cells.jsonl", {"auto": "library auto (MiniLM)"}, "seconds")
    paths |= jsonl_cells(RESULTS / "smollm2-sst2-agnews" / "results.jsonl",
                         {"lora": "SmolLM2 LoRA", "prefix": "SmolLM2 prefix", "incontext": "SmolLM2 in-context"},
                         "train_seconds")
    llm = RESULTS / "smollm2-nine" / "results.jsonl"  # the same test rows as SetFit's, prompts from the labels
    paths |= jsonl_cells(llm, {"prefix": "SmolLM2 prefix, written prompt"}, "train_seconds")
    paths |= jsonl_cells(RESULTS / "tiered-nine" / "results.jsonl", {"tiered": "tiered: MiniLM or SmolLM2 by CV"},
                         "train_seconds")  # the selection's seconds counted
    paths["zero-shot (MiniLM)"] = zero_shot_cells(RESULTS / "fewshot.json")
    paths["zero-shot (SmolLM2)"] = {(row["dataset"], seed): (row["accuracy"], 0.0) for row in read_jsonl(llm)
                                    if row["method"] == "zeroshot" for seed in (0, 1, 2)}
    return paths


def against_peer(cells: dict, peer: dict) -> dict | None:
    """Mean accuracy and points over the peer on the cells both have; the mean per-dataset time ratio."""
    shared = sorted(set(cells) & set(peer))
    if not shared:
        return None
    datasets = sorted({dataset for dataset, _ in shared})
    seconds = lambda source, d: statistics.fmean(source[c][1] for c in shared if c[0] == d)  # noqa: E731
    return {"cells": len(shared), "datasets": datasets,
            "accuracy": round(statistics.fmean(cells[c][0] for c in shared), 4),
            "peer_accuracy": round(statistics.fmean(peer[c][0] for c in shared), 4),
            "points_over_peer": round(100 * statistics.fmean(cells[c][0] - peer[c][0] for c in shared), 2),
            "seconds": round(statistics.fmean(cells[c][1] for c in shared), 2),
            "time_ratio": round(statistics.fmean(seconds(cells, d) / seconds(peer, d) for d in datasets), 4)}


def plot(rows: dict[str, dict], peer: str, file: Path, heading: str) -> None:
    """Trained paths as points, no-training ones as dashed lines, each named in a legend beside the axes
    (paths crowd near SetFit's time: labels on the points overlap)."""
    figure, axis = pyplot().subplots(figsize=(10, 5))
    colors = pyplot().get_cmap("tab20").colors[::2] + pyplot().get_cmap("tab20").colors[1::2]
    for index, (name, row) in enumerate(rows.items()):
        if name == peer:
            axis.scatter([1.0], [0.0], marker="*", s=220, color="black", zorder=3, label=peer)
        elif row["time_ratio"] == 0:
            axis.axhline(row["points_over_peer"], linestyle="--", linewidth=1, color=colors[index % len(colors)],
                         label=f"{name}, no training: {row['points_over_peer']:+.1f} ({row['cells']} cells)")
        else:
            axis.scatter([row["time_ratio"]], [row["points_over_peer"]], s=50, zorder=3, color=colors[index % len(colors)],
                         label=f"{name}: {row['points_over_peer']:+.1f} at {row['time_ratio']:.2f}× "
                               f"({row['cells']} cells)")
    axis.set_xscale("log")
    axis.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}×"))
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.axhline(0, color="black", linewidth=0.5)
    axis.set(xlabel="training seconds ÷ SetFit's (mean per dataset, log scale)",
             ylabel="accuracy − SetFit's (points)")
    axis.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    axis.set_title(textwrap.fill(heading, 110), fontsize=8)
    save_figure(figure, file)


def markdown(rows: dict[str, dict], peer: str, heading: str) -> str:
    lines = [f"# {heading}", "", f"| path | cells | datasets | accuracy | {peer} on those cells | points "
             "over it | train s | time ratio |", "|---|---|---|---|---|---|---|---|"]
    for name, row in sorted(rows.items(), key=lambda item: -item[1]["points_over_peer"]):
        lines.append(f"| {name} | {row['cells']} | {len(row['datasets'])} | {100 * row['accuracy']:.1f} | "
                     f"{100 * row['peer_accuracy']:.1f} | {row['points_over_peer']:+.2f} | {row['seconds']:.1f} | "
                     f"{row['time_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> dict:
    paths = gather()
    cpus = describe_cpu(json.loads((RESULTS / "fewshot.json").read_text())["cpu"])
    frontiers = {}
    for suffix, peer in PEERS.items():
        if peer not in paths:
            continue
        rows = {name: row for name, cells in paths.items() if (row := against_peer(cells, paths[peer]))}
        datasets = sorted({dataset for dataset, _ in paths[peer]})
        heading = (f"Few-shot frontier, k=16, each path against {peer} on the same rows and seeds "
                   f"({len(datasets)} datasets: {', '.join(datasets)}; the few-shot report measured on {cpus}; "
                   f"commit {git_commit()})")
        (RESULTS / f"frontier{suffix}.json").write_text(json.dumps({"heading": heading, "paths": rows}, indent=1))
        (RESULTS / f"frontier{suffix}.md").write_text(markdown(rows, peer, heading))
        plot(rows, peer, RESULTS / f"frontier{suffix}.png", heading)
        frontiers[peer] = rows
    return frontiers


if __name__ == "__main__":
    print(json.dumps(main()))
