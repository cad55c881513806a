"""Does unlabeled text help? The recommended MiniLM recipe (recipes/sst2-lora-minilm-tied.yaml) trained on
k labelled rows per class (the plain adapter) against the same recipe self-trained on those rows plus N
unlabeled rows of the train split (`data.unlabeled: train`, the k-shot rows excluded; `training.self_train`),
beside SetFit's accuracy on the same cells (benchmarks/results/fewshot-setfit.jsonl).

A reported setting of its own, "k labelled + N unlabeled", never mixed into the k-only table. Same rows as
the few-shot report: its sweep trains a cell with data.seed = training.seed = the seed, so the k-shot draw
here (load_task with the dataset folder, k and seed) is the one SetFit trained on, and the first
--test-limit test rows are the ones it was scored on. The plain adapter is the self-training's teacher
(`self_train.teachers`): it labels the unlabeled rows, so the k-shot run is not repeated. Train seconds:
the plain run's `fit`; for self-training, that plus the pseudo-labelling and the retraining. Each finished cell is appended to
--out/unlabeled.jsonl and skipped on a rerun (remove a line to redo it); unlabeled.md holds every setting's
cells (a table each), unlabeled.png this run's setting. Prints one JSON object (last line). Waits while
/tmp/quiet exists (someone is timing).

    .venv/bin/python benchmarks/unlabeled.py --datasets sst2 mpqa agnews emotion --seeds 0 1 2
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

from _common import (PAIR_FIELDS, SHARED_DATA, append_jsonl, describe_cpu, fewshot_files, of_backbone, pyplot,
                     read_jsonl, save_figure, wait_for_quiet)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "sst2-lora-minilm-tied.yaml"
SETFIT_CELLS = ROOT / "benchmarks" / "results" / fewshot_files("minilm")["setfit"]  # the recipe's backbone
SELF_TRAIN = "{rounds: 1, threshold: 0.0, keep_fraction: 0.2, balance: true, labelled_share: 0.5, steps: 1.0}"
CELLS = "unlabeled.jsonl"
SKIPPED = {"e2e": "a generation task: self-training keeps pseudo-labels by class probability"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["sst2", "mpqa", "agnews", "emotion"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="k-shot draw and training seeds")
    parser.add_argument("--k", type=int, default=16, help="labelled examples per class")
    parser.add_argument("--unlabeled", type=int, default=500, help="unlabeled train rows (drawn with the seed)")
    parser.add_argument("--test-limit", type=int, default=1000, help="first N test rows")
    parser.add_argument("--self-train", default=SELF_TRAIN, help="the training.self_train section, as --set writes it")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results folder")
    return parser.parse_args(argv)


def run_cell(dataset: str, seed: int, args) -> dict:
    from adapterlab.precision import cpu_capability
    from adapterlab.recipe import load_recipe
    from adapterlab.store import read_card
    from adapterlab.training import train

    common = [f"task={dataset}", f"data.path={SHARED_DATA / dataset}", f"data.k={args.k}", f"data.seed={seed}",
              f"training.seed={seed}", f"data.test_limit={args.test_limit}",
              f"output.store={args.out / 'unlabeled-adapters'}"]
    if dataset in PAIR_FIELDS:
        common.append(f"data.text_pair_field={PAIR_FIELDS[dataset]}")
    plain = plain_adapter(load_recipe(RECIPE, [*common, f"output.name=plain-k{args.k}-s{seed}"]))
    # the plain adapter labels the unlabeled rows (a teacher): the self-trained run repeats no k-shot run
    teacher = {**yaml.safe_load(args.self_train), "teachers": [f"{dataset}/plain-k{args.k}-s{seed}"]}
    self_trained = train(load_recipe(RECIPE, [
        *common, "data.unlabeled=train", f"data.unlabeled_rows={args.unlabeled}", f"training.self_train={json.dumps(teacher)}",
        f"output.name=self-k{args.k}-u{args.unlabeled}-s{seed}"]), show_progress=False)
    record = read_card(self_trained.adapter_path).self_training
    teacher_accuracy, pseudo_accuracy = pseudo_label_quality(load_recipe(RECIPE, [
        *common, "data.unlabeled=train", f"data.unlabeled_rows={args.unlabeled}", f"training.self_train={json.dumps(teacher)}"]))
    setfit = setfit_cell(dataset, seed, args.k, args.test_limit)
    return {"dataset": dataset, "seed": seed, "k": args.k, "unlabeled": args.unlabeled, "test_limit": args.test_limit,
            "self_train": args.self_train, "setting": record["setting"],
            "plain_accuracy": round(plain.metrics["accuracy"], 4), "plain_train_seconds": round(plain.train_seconds, 3),
            "self_trained_accuracy": round(self_trained.metrics["accuracy"], 4),
            # what k + N costs in all: the plain run that labels, then the pseudo-labelling and retraining
            "self_trained_train_seconds": round(plain.train_seconds + self_trained.train_seconds, 3),
            "setfit_accuracy": setfit and round(setfit["accuracy"], 4),
            "setfit_train_seconds": setfit and setfit["train_seconds"],
            "kept_per_class": [r["kept_per_class"] for r in record["rounds"]],
            "teacher_accuracy_on_unlabeled": teacher_accuracy, "pseudo_label_accuracy": pseudo_accuracy,
            "mean_confidence": [r["mean_confidence"] for r in record["rounds"]],
            "retrain_steps": [r["steps"] for r in record["rounds"]],
            "score_seconds": [r["score_seconds"] for r in record["rounds"]],
            "load_average": round(os.getloadavg()[0], 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cpu": cpu_capability()}


def pseudo_label_quality(recipe) -> tuple[float, float]:
    """The benchmark's look at the labels self-training dropped: the teacher's accuracy on the unlabeled
    rows, and that of the pseudo-labels it kept (the same selection, recomputed from the same scores)."""
    from adapterlab.data import load_task, read_unlabeled
    from adapterlab.training.self_training import pseudo_labels, teacher_scores

    every = load_task(recipe.data.model_copy(update={"k": None, "test_limit": 1}))
    truth = {}  # by the text and its pair: a premise can come with several hypotheses
    for row, label in zip(zip(every.train.texts, every.train.text_pairs or every.train.texts), every.train.labels):
        truth.setdefault(row, label)
    pool = read_unlabeled(recipe.data)
    labels = [truth[row] for row in zip(pool.texts, pool.text_pairs or pool.texts)]
    probabilities = teacher_scores(recipe, pool, every.label_names, show_progress=False)
    kept = pseudo_labels(probabilities, recipe.training.self_train)
    teacher = sum(int(p) == y for p, y in zip(probabilities.argmax(-1), labels)) / len(labels)
    pseudo = sum(label == labels[i] for i, label in zip(kept.indices, kept.labels)) / max(1, len(kept.indices))
    return round(teacher, 4), round(pseudo, 4)


def plain_adapter(recipe):
    """The plain adapter's test metrics and train seconds: from its card when an earlier, interrupted run of
    this benchmark stored it (same recipe, name and store), else trained now."""
    from adapterlab.store import read_card
    from adapterlab.training import TrainResult, train

    folder = Path(recipe.output.store) / recipe.task / recipe.adapter_name
    if (folder / "card.json").is_file():
        card = read_card(folder)
        return TrainResult(folder, card.trainable_params, card.trainable_params + card.backbone_params,
                           card.adapter_bytes, card.train_seconds, card.metrics)
    return train(recipe, show_progress=False)


def setfit_cell(dataset: str, seed: int, k: int, test_limit: int) -> dict | None:
    """SetFit's finished cell of the few-shot report on the same k-shot and test rows, if it ran."""
    for cell in of_backbone(read_jsonl(SETFIT_CELLS), "minilm"):
        if (cell["dataset"], cell["seed"], cell["k"], cell["test_limit"], cell["status"]) == (dataset, seed, k, test_limit, "ok"):
            return cell
    return None


def report_accuracy(cell: dict) -> float | None:
    """The recipe's accuracy on the cell in the few-shot report, where it ran the same k and test rows."""
    report = json.loads((ROOT / "benchmarks" / "results" / "fewshot.json").read_text())
    if (report["k"], report["test_limit"]) != (cell["k"], cell["test_limit"]):
        return None
    per_seed = report["datasets"].get(cell["dataset"], {}).get("adapterlab", {}).get("per_seed", {})
    return per_seed.get(str(cell["seed"]), {}).get("accuracy")


def by_dataset(cells: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for cell in cells:
        groups.setdefault(cell["dataset"], []).append(cell)
    return groups


def _mean(cells: list[dict], key: str) -> float | None:
    values = [c[key] for c in cells if c[key] is not None]
    return statistics.mean(values) if values else None


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def markdown(cells: list[dict]) -> str:
    """One table per setting (N unlabeled rows and the self_train section), each with its own tally."""
    settings: dict[tuple, list[dict]] = {}
    for cell in cells:
        settings.setdefault((cell["unlabeled"], cell["self_train"]), []).append(cell)
    return "\n".join(_setting_table(group) for group in settings.values())


def _setting_table(cells: list[dict]) -> str:
    lines = [f"### k={cells[0]['k']} + {cells[0]['unlabeled']} unlabeled, self_train {cells[0]['self_train']}", "",
             "| dataset | seeds | setting | plain adapter | k + N self-trained | difference (points) | SetFit (k only) "
             "| plain s | self-trained s | SetFit s | pseudo-labels kept per class | teacher on the N / kept pseudo-labels right |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for dataset, group in by_dataset(cells).items():
        gain = _mean(group, "self_trained_accuracy") - _mean(group, "plain_accuracy")
        kept = "; ".join(_kept(c["kept_per_class"][0]) for c in group)
        lines.append(f"| {dataset} | {', '.join(str(c['seed']) for c in group)} | {group[0]['setting'].split(' + ')[1]} "
                     f"| {_pct(_mean(group, 'plain_accuracy'))} | {_pct(_mean(group, 'self_trained_accuracy'))} "
                     f"| {100 * gain:+.1f} | {_pct(_mean(group, 'setfit_accuracy'))} "
                     f"| {_mean(group, 'plain_train_seconds'):.0f} | {_mean(group, 'self_trained_train_seconds'):.0f} "
                     f"| {_seconds(_mean(group, 'setfit_train_seconds'))} | {kept} | {_quality(group)} |")
    same = [c for c in cells if report_accuracy(c) is not None]
    lines.append(f"\nThe plain adapter reproduces the few-shot report's accuracy (benchmarks/results/fewshot.json) in "
                 f"{sum(report_accuracy(c) == c['plain_accuracy'] for c in same)} of {len(same)} cells it has: the same "
                 "k-shot and test rows.")
    wins = sum(c["self_trained_accuracy"] > c["plain_accuracy"] for c in cells)
    losses = sum(c["self_trained_accuracy"] < c["plain_accuracy"] for c in cells)
    cpus = sorted({describe_cpu(c["cpu"]) for c in cells})
    lines.append(f"{len(cells)} cells: self-training better than the plain adapter in {wins}, worse in {losses}. "
                 f"Accuracy on the first {cells[0]['test_limit']} test rows (mean over the seeds listed); SetFit's "
                 f"cells come from the few-shot report (same k-shot and test rows). CPU: {'; '.join(cpus)} "
                 "(each cell's load_average says whether other jobs shared it). Seconds: "
                 "plain and self-trained ran here side by side (self-trained: the plain run that labels, then the "
                 "pseudo-labelling and retraining); SetFit's are the few-shot report's, from another run and load: "
                 "compare plain with self-trained, not with SetFit.")
    return "\n".join(lines) + "\n"


def _kept(per_class: dict) -> str:
    """A seed's pseudo-labels kept per class: every count for a few classes, "77 × 5" for many equal ones."""
    counts = list(per_class.values())
    if len(counts) <= 6:
        return ", ".join(str(n) for n in counts)
    return f"{len(counts)} × {counts[0]}" if len(set(counts)) == 1 else f"{min(counts)}–{max(counts)} over {len(counts)}"


def _quality(cells: list[dict]) -> str:
    measured = [c for c in cells if c.get("pseudo_label_accuracy") is not None]
    if not measured:
        return ""
    return (f"{_pct(_mean(measured, 'teacher_accuracy_on_unlabeled'))} / {_pct(_mean(measured, 'pseudo_label_accuracy'))}"
            f"{f' ({len(measured)} seeds)' if len(measured) < len(cells) else ''}")


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def plot(cells: list[dict], file: Path) -> None:
    groups = by_dataset(cells)
    names = list(groups)
    series = [("plain adapter (k)", "plain_accuracy"), (f"self-trained (k + {cells[0]['unlabeled']} unlabeled)",
                                                       "self_trained_accuracy"), ("SetFit (k)", "setfit_accuracy")]
    fig, ax = pyplot().subplots(figsize=(1.8 + 1.6 * len(names), 4))
    width = 0.8 / len(series)
    for i, (label, key) in enumerate(series):
        values = [100 * (_mean(groups[n], key) or 0) for n in names]
        ax.bar([x + i * width for x in range(len(names))], values, width, label=label)
    ticks = [f"{n}\n(seeds {', '.join(str(c['seed']) for c in groups[n])})" for n in names]
    ax.set_xticks([x + width for x in range(len(names))], ticks)
    ax.set_ylabel(f"accuracy, first {cells[0]['test_limit']} test rows (%)")
    ax.set_title(f"MiniLM, k={cells[0]['k']}: unlabeled text through self-training")
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, file, dpi=120)


def main(argv=None) -> dict:
    from adapterlab.precision import cpu_capability

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    file = args.out / CELLS
    key = lambda c: (c["dataset"], c["seed"], c["k"], c["unlabeled"], c["test_limit"], c["self_train"])
    skipped = {d: SKIPPED[d] for d in args.datasets if d in SKIPPED}
    for seed in args.seeds:  # every dataset's first seed before any second: a partial run covers the datasets
        for dataset in (d for d in args.datasets if d not in SKIPPED):
            done = {key(c) for c in read_jsonl(file)}
            if (dataset, seed, args.k, args.unlabeled, args.test_limit, args.self_train) in done:
                continue
            wait_for_quiet()
            cell = run_cell(dataset, seed, args)
            append_jsonl(file, cell)
            print(json.dumps(cell), file=sys.stderr)
    setting = (args.k, args.unlabeled, args.test_limit, args.self_train)
    every = [c for c in read_jsonl(file) if (c["k"], c["test_limit"]) == (args.k, args.test_limit)]
    cells, cpu = [c for c in every if key(c)[2:] == setting], cpu_capability()
    if cells:  # the table holds every setting's cells; the plot and the summary this run's
        (args.out / "unlabeled.md").write_text(markdown(every))
        plot(cells, args.out / "unlabeled.png")
    summary = {"benchmark": "unlabeled", "cells": len(cells), "cpu": cpu, "skipped": skipped,
               "datasets": {d: {"seeds": [c["seed"] for c in g], "plain": _mean(g, "plain_accuracy"),
                                "self_trained": _mean(g, "self_trained_accuracy"), "setfit": _mean(g, "setfit_accuracy")}
                            for d, g in by_dataset(cells).items()}}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
