"""Which rows to label: training on the rows `adapterlab select` picks against random rows of the same count.

For each shared classification dataset × seed, with MiniLM and --recipe (the recommended
recipes/sst2-lora-minilm-tied.yaml unless told; data.path, k, seeds and test rows set per cell), every arm
trains on k × labels rows and is scored on the same first --test-limit test rows:
  - selected: `adapterlab select`'s picks from the pool (the first --pool train rows; embeddings and
    zero-shot guesses once per dataset, k-means seeded by the cell's seed), written to the file a person
    labels, labelled from the data, trained on as that file;
  - random pool draw: k × labels rows drawn uniformly from the same pool, labelled and trained the same
    way (what a person without any model would label);
  - random k-shot: the recipe's own draw, k per class by the true labels from the whole train split
    (data.k, data.seed): balanced by labels nobody has yet, so an upper reference, not a peer;
  - zero-shot: the classifier every arm starts from (once per dataset).
The selected and pool-drawn rows are unevenly spread over the true classes; that is the honest setting.
Every finished cell is appended to OUT/cells.jsonl (pool indices, never texts), so a rerun skips it;
selection.json, selection.md and selection.png are rebuilt after each cell. Files to label and adapters
go to --work (outside the repository: they hold the data's texts). Progress to stderr, summary to stdout.

    .venv/bin/python benchmarks/selection.py                          # 9 datasets × seeds 0 1 2, k=16
    .venv/bin/python benchmarks/selection.py --datasets sst2 --seeds 0 --test-limit 100 --out /tmp/selection
"""

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from _common import (PAIR_FIELDS, SHARED_DATA, append_jsonl, cell_cpu, describe_cell_cpu, pyplot, read_jsonl, sample_std,
                     save_figure)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/sst2-lora-minilm-tied.yaml"
# Cells written before --recipe existed trained the default recipe.
FORMER_RECIPE = "recipes/sst2-lora-minilm.yaml"
DATASETS = {name: PAIR_FIELDS.get(name) for name in  # name → text pair column
            ("sst2", "sst5", "imdb", "mpqa", "agnews", "emotion", "banking77", "rte", "cb")}
ARMS = ("zero-shot", "random k-shot", "random pool draw", "selected")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--recipe", default=RECIPE, help="the recipe every arm trains, relative to the repository")
    parser.add_argument("--k", type=int, default=16, help="rows per label (every arm trains on k × labels rows)")
    parser.add_argument("--pool", type=int, default=2000, help="first N train rows: the unlabelled pool")
    parser.add_argument("--test-limit", type=int, default=1000)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "selection"))
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "adapterlab-selection"))
    return parser.parse_args(argv)


def grid(args) -> list[dict]:
    """Seed by seed (a partial run covers every dataset), zero-shot first."""
    cells = [{"dataset": d, "arm": "zero-shot", "seed": 0} for d in args.datasets]
    cells += [{"dataset": d, "arm": arm, "seed": s} for s in args.seeds for d in args.datasets for arm in ARMS[1:]]
    return [{**cell, "recipe": args.recipe, "k": args.k, "pool": args.pool, "test_limit": args.test_limit}
            for cell in cells]


def same_settings(rows: list[dict], args) -> list[dict]:
    """Finished cells of this recipe, k, pool and test size: the report keeps those of other datasets and seeds
    (zero-shot cells train nothing, so any recipe's serve)."""
    return [row for row in rows if (row["k"], row["pool"], row["test_limit"]) == (args.k, args.pool, args.test_limit)
            and (row["arm"] == "zero-shot" or row.get("recipe", FORMER_RECIPE) == args.recipe)]


def key(cell: dict) -> tuple:
    recipe = "-" if cell["arm"] == "zero-shot" else cell.get("recipe", FORMER_RECIPE)
    return (recipe, *(cell[name] for name in ("dataset", "arm", "seed", "k", "pool", "test_limit")))


class PoolOfDataset:
    """A dataset's pool, its true labels, and (on first use) its embeddings and zero-shot scores."""

    def __init__(self, dataset: str, size: int, engine):
        from adapterlab.data import read_pool
        from adapterlab.zeroshot import zero_shot_servable

        self.folder, self.pair_field, self.engine = SHARED_DATA / dataset, DATASETS[dataset], engine
        self.rows = read_pool(self.folder, text_pair_field=self.pair_field, limit=size)
        self.truth = [json.loads(line)["label"] for line in (self.folder / "train.jsonl").open()][:size]
        self.classifier = zero_shot_servable(engine.backbone, self.rows.label_names, self.rows.label_descriptions)
        self._embedded = None

    def embedded(self):
        from adapterlab.selection import embed_and_guess

        if self._embedded is None:
            self._embedded = embed_and_guess(self.engine, self.classifier, self.rows, show_progress=True)
        return self._embedded


def picks(cell: dict, pool: PoolOfDataset) -> list[int]:
    from adapterlab.selection import choose_rows

    count = cell["k"] * len(pool.rows.label_names)
    if cell["arm"] == "random pool draw":
        return random.Random(cell["seed"]).sample(range(len(pool.rows)), count)
    vectors, scores = pool.embedded()
    return choose_rows(vectors, scores, cell["k"], cell["seed"])


def labelled_file(cell: dict, pool: PoolOfDataset, chosen: list[int], work: Path) -> Path:
    """The file `adapterlab select` writes, then labelled as a person would (from the data here)."""
    from adapterlab.selection import Selection, write_for_labelling

    names = pool.rows.label_names
    file = work / "to-label" / f"{cell['dataset']}-{cell['arm'].replace(' ', '-')}-k{cell['k']}-s{cell['seed']}.jsonl"
    write_for_labelling(file, pool.rows, Selection(chosen, ["-"] * len(chosen)))
    rows = [json.loads(line) for line in file.read_text().splitlines()]
    file.write_text("".join(json.dumps({**row, "label": names[pool.truth[row["pool_index"]]]}) + "\n" for row in rows))
    return file


def train_cell(cell: dict, pool: PoolOfDataset, work: Path) -> dict:
    from adapterlab.recipe import load_recipe
    from adapterlab.training import train

    overrides = [f"task={cell['dataset']}", f"data.seed={cell['seed']}", f"training.seed={cell['seed']}",
                 f"data.test_limit={cell['test_limit']}", f"output.store={work / 'adapters'}",
                 f"output.name={cell['arm'].replace(' ', '-')}-k{cell['k']}-s{cell['seed']}"]
    if pool.pair_field:
        overrides.append(f"data.text_pair_field={pool.pair_field}")
    extra = {}
    if cell["arm"] == "random k-shot":
        overrides += [f"data.path={pool.folder}", f"data.k={cell['k']}"]
    else:
        chosen = picks(cell, pool)
        file = labelled_file(cell, pool, chosen, work)
        overrides += [f"data.path={file}", "data.k=null", f"data.test_path={pool.folder / 'test.jsonl'}",
                      f"data.labels={json.dumps(pool.rows.label_names)}"]
        counts = Counter(pool.truth[i] for i in chosen)
        extra = {"pool_indices": chosen, "classes_covered": len(counts), "smallest_class_rows":
                 min(counts.get(label, 0) for label in range(len(pool.rows.label_names)))}
    result = train(load_recipe(ROOT / cell["recipe"], overrides), show_progress=False)
    return {"accuracy": result.metrics["accuracy"], "macro_f1": result.metrics["macro_f1"],
            "train_seconds": round(result.train_seconds, 1), **extra}


def zero_shot_cell(cell: dict, pool: PoolOfDataset, scorer) -> dict:
    """The zero-shot classifier's test metrics, from `scorer`: an engine in float32, as the trained cells are
    scored (the pool's engine may run in bf16, which moves a baseline by rounding alone)."""
    from adapterlab.recipe import DataConfig
    from adapterlab.zeroshot import evaluate_zero_shot

    data = DataConfig(path=str(pool.folder), text_pair_field=pool.pair_field, k=None)
    metrics = evaluate_zero_shot(scorer, data, limit=cell["test_limit"])
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
            "dtype": str(scorer.backbone.dtype).removeprefix("torch.")}


def summarize(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """dataset → arm → mean and std of accuracy and macro-F1 over the seeds (and the picks' class cover)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["arm"]), []).append(row)
    table: dict[str, dict[str, dict]] = {}
    for (dataset, arm), group in groups.items():
        stats = {"seeds": len(group)}
        for metric in ("accuracy", "macro_f1", "classes_covered", "smallest_class_rows"):
            values = [row[metric] for row in group if metric in row]
            if values:
                stats[metric] = statistics.fmean(values)
                stats[f"{metric}_std"] = sample_std(values)
        table.setdefault(dataset, {})[arm] = stats
    return table


def paired_gains(rows: list[dict], arm: str, against: str) -> list[float]:
    """Accuracy of `arm` minus `against`, cell by cell where both ran (same dataset and seed)."""
    other = {(r["dataset"], r["seed"]): r["accuracy"] for r in rows if r["arm"] == against}
    return [r["accuracy"] - other[(r["dataset"], r["seed"])] for r in rows
            if r["arm"] == arm and (r["dataset"], r["seed"]) in other]


def cells_cpus(rows: list[dict]) -> str:
    """The CPUs the cells ran on, each with its datasets: a report can gather cells of several sessions."""
    datasets: dict[str, list[str]] = {}
    for row in rows:
        cpu = describe_cell_cpu(row)
        if row["dataset"] not in datasets.setdefault(cpu, []):
            datasets[cpu].append(row["dataset"])
    return "; ".join(f"{cpu} for {', '.join(names)}" for cpu, names in datasets.items())


def write_report(rows: list[dict], out: Path, cpu: dict, args) -> dict:
    table = summarize(rows)
    versus_pool, versus_kshot = paired_gains(rows, "selected", "random pool draw"), paired_gains(rows, "selected", "random k-shot")
    report = {"benchmark": "selection", "backbone": "minilm", "recipe": args.recipe, "k": args.k,
              "pool": args.pool, "test_limit": args.test_limit, "cpu": cpu, "table": table,
              "selected_minus_random_pool_draw": _gain(versus_pool), "selected_minus_random_k_shot": _gain(versus_kshot)}
    (out / "selection.json").write_text(json.dumps(report, indent=2))
    lines = [f"{args.recipe}, k={args.k} rows per label, pool: first {args.pool} train rows, first {args.test_limit} "
             f"test rows; CPU: {cells_cpus(rows)}; "
             "accuracy, mean ± std over seeds (seeds); selected picks: classes covered by true labels, fewest rows of a class.",
             "", "| dataset | zero-shot | random k-shot (balanced by true labels) | random pool draw | selected "
             "| selected − pool draw | selected picks: classes, fewest |", "|---|---|---|---|---|---|---|"]
    for dataset in DATASETS:
        arms = table.get(dataset)
        if not arms:
            continue
        gain = paired_gains([r for r in rows if r["dataset"] == dataset], "selected", "random pool draw")
        picked = arms.get("selected", {})
        cover = (f"{picked['classes_covered']:.1f}, {picked['smallest_class_rows']:.1f}" if "classes_covered" in picked
                 else "-")
        lines.append(f"| {dataset} | " + " | ".join(_shown(arms.get(arm)) for arm in ARMS) +
                     f" | {_signed(gain)} | {cover} |")
    (out / "selection.md").write_text("\n".join(lines) + "\n")
    plot(table, out)
    return report


def _gain(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"cells": len(values), "mean": statistics.fmean(values), "wins": sum(v > 0 for v in values),
            "losses": sum(v < 0 for v in values)}


def _shown(stats: dict | None) -> str:
    if not stats:
        return "-"
    spread = f" ± {stats['accuracy_std']:.3f}" if stats["seeds"] > 1 else ""
    return f"{stats['accuracy']:.3f}{spread} ({stats['seeds']})"


def _signed(values: list[float]) -> str:
    return f"{statistics.fmean(values):+.3f} ({sum(v > 0 for v in values)}/{len(values)} better)" if values else "-"


def plot(table: dict, out: Path) -> None:
    """Accuracy per dataset: the three training arms as bars (mean ± std), zero-shot as a black tick."""
    datasets = [d for d in DATASETS if d in table]
    figure, axis = pyplot().subplots(figsize=(max(6, 1.3 * len(datasets)), 3.8))
    width = 0.27
    for offset, arm in enumerate(ARMS[1:]):
        xs = [i + (offset - 1) * width for i, d in enumerate(datasets) if arm in table[d]]
        stats = [table[d][arm] for d in datasets if arm in table[d]]
        axis.bar(xs, [s["accuracy"] for s in stats], width, yerr=[s["accuracy_std"] for s in stats], capsize=2, label=arm)
    for i, d in enumerate(datasets):
        if "zero-shot" in table[d]:
            axis.hlines(table[d]["zero-shot"]["accuracy"], i - 1.5 * width, i + 1.5 * width, colors="black",
                        label="zero-shot" if i == 0 else None)
    axis.set_xticks(range(len(datasets)), datasets)
    axis.set(ylabel="accuracy", title="Training on the rows `adapterlab select` picks vs random rows (MiniLM, LoRA)")
    axis.legend(fontsize=8)
    save_figure(figure, out / "selection.png")


def main(argv=None) -> int:
    from adapterlab.engine import Engine
    from adapterlab.precision import cpu_capability

    args = parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    cells_file = out / "cells.jsonl"
    done = read_jsonl(cells_file)
    todo = [cell for cell in grid(args) if key(cell) not in {key(row) for row in done}]
    cpu = cpu_capability()
    engine, pools = Engine("minilm"), {}
    scorer = Engine.for_comparison("minilm") if any(cell["arm"] == "zero-shot" for cell in todo) else None
    for cell in tqdm(todo, desc="selection cells"):
        if cell["dataset"] not in pools:
            pools[cell["dataset"]] = PoolOfDataset(cell["dataset"], args.pool, engine)
        pool = pools[cell["dataset"]]
        metrics = zero_shot_cell(cell, pool, scorer) if cell["arm"] == "zero-shot" else train_cell(cell, pool, work)
        row = {**cell, **metrics, **cell_cpu(cpu), "load_average": os.getloadavg()[0]}
        append_jsonl(cells_file, row)
        done.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "pool_indices"}), file=sys.stderr)
        write_report(same_settings(done, args), out, cpu, args)
    report = write_report(same_settings(done, args), out, cpu, args)
    print(json.dumps({"table": report["table"], "selected_minus_random_pool_draw": report["selected_minus_random_pool_draw"],
                      "selected_minus_random_k_shot": report["selected_minus_random_k_shot"]}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
