"""Few-shot peer comparison: adapterlab's LoRA adapter against SetFit on the same k-shot rows and seeds.

For each dataset × seed at k examples per class:
  - zero-shot and adapterlab LoRA come from adapterlab's own sweep (`adapterlab.sweep`): the datasets
    and the LoRA recipe of recipes/sweeps/minilm-single-text.yaml, narrowed to --datasets, --k,
    --seeds and --test-limit; train seconds are the seconds in `fit` (backbone already loaded);
  - adapterlab CV (`--methods ... adapterlab-cv`): the same recipe choosing its settings by
    cross-validation on the k-shot rows (recipes/sst2-lora-minilm-tied-cv.yaml, `training.select`): its
    test accuracy beside the card's cv_accuracy (how well the estimate predicts), its worst seed against
    zero-shot (the floor), and its train seconds counting the selection;
  - SetFit (optional extra `pip install -e .[compare]`) trains on exactly the rows the adapter trained
    on (the sweep cell's own recipe, checked against the stored adapter's card), with SetFit's defaults
    (SETFIT_SETTINGS below; --setfit-num-iterations for fewer pairs), and is evaluated on the same test
    rows; train seconds are the seconds in `Trainer.train()` (pair generation, contrastive body phase,
    logistic-regression head).
--backbone mpnet runs it all on all-mpnet-base-v2 (110M parameters; its folder is made once from PyPI, about
400 MB) instead of MiniLM: the recipes as written but for their backbone, SetFit on that body. Each backbone
keeps its own cells and report (mpnet's files are named fewshot-mpnet*), so no report mixes the two.
Every finished cell is kept (the sweep's results.jsonl, fewshot-setfit.jsonl), so a rerun skips it.
Prints one JSON object on stdout (last line) and writes fewshot.json, fewshot.md and fewshot.png to --out
(on a CPU without fast bf16, to --out/no-fast-bf16: time ratios compare within one kind of CPU);
progress goes to stderr.

    .venv/bin/python benchmarks/fewshot.py                      # 7 datasets × seeds 0 1 2, k=16, 1,000 test rows
    .venv/bin/python benchmarks/fewshot.py --datasets sst2 --seeds 0 --test-limit 200 --out /tmp/fewshot
    .venv/bin/python benchmarks/fewshot.py --methods setfit --setfit-time-limit 900
    .venv/bin/python benchmarks/fewshot.py --methods setfit --datasets banking77 --setfit-num-iterations 20
    .venv-compare/bin/python benchmarks/fewshot.py --backbone mpnet --methods zeroshot adapterlab setfit
"""

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from _common import (BACKBONES, PAIR_FIELDS, SHARED_DATA, append_jsonl, backbone_path, cell_cpu, describe_cpu,
                     fewshot_files, git_commit, of_backbone, plot_accuracy_bars, read_jsonl, sample_std)

ROOT = Path(__file__).resolve().parents[1]
SWEEP_FILE = ROOT / "recipes" / "sweeps" / "minilm-single-text.yaml"
ADAPTER_METHOD = "lora"                 # the sweep method adapterlab is represented by
CV_METHOD, CV_RECIPE = "lora-cv", ROOT / "recipes" / "sst2-lora-minilm-tied-cv.yaml"
METHODS = ("zeroshot", "adapterlab", "adapterlab-cv", "setfit")
SWEEP_METHODS = {"zeroshot": "zeroshot", "adapterlab": ADAPTER_METHOD, "adapterlab-cv": CV_METHOD}
# The pair tasks of the shared data beside the shipped sweep's single-text ones (SetFit reads a pair as one
# text: the two joined by its tokenizer's separator).
PAIR_DATASETS = {name: {"path": str(SHARED_DATA / name), "text_pair_field": field} for name, field in PAIR_FIELDS.items()}
TARGETS = {"backbone": "minilm", "k": 16, "seeds": [0, 1, 2],
           "datasets": ["sst2", "sst5", "imdb", "mpqa", "agnews", "emotion", "banking77"],
           "cv_datasets": ["sst2", "sst5", "imdb", "mpqa", "agnews", "emotion", "banking77", "rte", "cb"],
           "margin_points_min": 5.0, "time_ratio_max": 0.3}
# SetFit as its authors ship it: every method setting is SetFit's default; only the logistics differ
# (no checkpoints, no experiment trackers, a temporary output folder, the cell's seed). Where the default
# pairs would run for hours (banking77: 1.5 M pairs), --setfit-num-iterations sets the SetFit paper's
# pair count instead; each cell records its num_iterations and the report names them.
SETFIT_SETTINGS = {
    "body": "the sweep's backbone folder (adapterlab.backbones.resolve_path), all layers trained",
    "head": "sklearn LogisticRegression() (SetFit's default head)",
    "loss": "CosineSimilarityLoss on generated pairs", "sampling_strategy": "oversampling",
    "num_iterations": None, "batch_size": 16, "num_epochs": 1, "body_learning_rate": 2e-5,
    "warmup_proportion": 0.1,
    "max_length": "the body's max_seq_length (256 for all-MiniLM-L6-v2, 384 for all-mpnet-base-v2)",
    "seed": "the cell's seed (also the k-shot draw's)", "save_strategy": "no", "report_to": "none",
    "text_pairs": "a pair's two texts joined by the body's separator token, read as one text",
}


def parse_args(argv=None) -> argparse.Namespace:
    shipped = yaml.safe_load(SWEEP_FILE.read_text())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(shipped["datasets"]),
                        choices=[*shipped["datasets"], *PAIR_DATASETS])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="k-shot draw and training seeds")
    parser.add_argument("--k", type=int, default=16, help="training examples per class")
    parser.add_argument("--test-limit", type=int, default=1000, help="first N test rows (0: the whole test split)")
    parser.add_argument("--backbone", choices=BACKBONES, default="minilm",
                        help="the backbone of every cell (mpnet: all-mpnet-base-v2, made once from PyPI)")
    parser.add_argument("--methods", nargs="+", default=["zeroshot", "adapterlab", "setfit"], choices=METHODS,
                        help="cells to run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results folder")
    parser.add_argument("--setfit-time-limit", type=float, default=0,
                        help="stop a SetFit cell after this many seconds and record it as a timeout (0: no limit)")
    parser.add_argument("--setfit-num-iterations", type=int, default=None,
                        help="SetFit pairs per training row and kind (the SetFit paper's setting is 20) instead of "
                             "SetFit's default, every pair: for many-class datasets, where that default runs for hours")
    return parser.parse_args(argv)


def build_sweep(datasets: list[str], seeds: list[int], k: int, test_limit: int | None, out: Path,
                backbone: str = "minilm"):
    """The shipped MiniLM sweep narrowed to these datasets, zero-shot, LoRA and LoRA with CV, one k, these
    seeds, on `backbone` (one of BACKBONES). Its folder is named by the backbone and the test limit, so
    cells of another backbone or evaluated on other test rows never mix."""
    from adapterlab.sweep import ZERO_SHOT, Sweep

    shipped = yaml.safe_load(SWEEP_FILE.read_text())
    known = {**shipped["datasets"], **PAIR_DATASETS}
    data = {name: {**known[name], "path": str((ROOT / known[name]["path"]).resolve())} for name in datasets}
    methods = {ZERO_SHOT: ZERO_SHOT, ADAPTER_METHOD: str(ROOT / shipped["methods"][ADAPTER_METHOD]),
               CV_METHOD: str(CV_RECIPE)}
    return Sweep(name=fewshot_files(backbone, test_limit)["sweep"], backbone=backbone_path(backbone),
                 datasets=data, methods=methods, k=[k], seeds=seeds, test_limit=test_limit, output=str(out))


def run_sweep_cells(sweep, methods: list[str]) -> None:
    """Run the sweep's cells of the chosen methods (zero-shot, adapterlab, adapterlab-cv); finished ones
    are skipped."""
    from adapterlab.sweep import run_sweep

    wanted = {SWEEP_METHODS[method] for method in methods if method in SWEEP_METHODS}
    if wanted:
        run_sweep(sweep.model_copy(update={"methods": {m: r for m, r in sweep.methods.items() if m in wanted}}))


def sweep_rows(sweep) -> list[dict]:
    """Finished sweep cells of this comparison (its datasets, k and seeds, under the current recipe)."""
    from adapterlab.sweep import finished_cells

    return finished_cells(sweep)


# --- SetFit cells -----------------------------------------------------------------------------------------

def setfit_task(sweep, dataset: str, seed: int):
    """The k-shot rows and test rows of the sweep's LoRA cell (dataset, k, seed): its own recipe's data
    section, so SetFit and the adapter see the same rows. When that adapter is in the sweep's store,
    the rows are checked against the data section its card recorded."""
    from adapterlab.data import load_task
    from adapterlab.recipe import DataConfig
    from adapterlab.store import StoreError, read_card
    from adapterlab.sweep import cell_recipe

    folder = Path(sweep.output) / sweep.name
    cell = {"dataset": dataset, "method": ADAPTER_METHOD, "k": sweep.k[0], "seed": seed}
    recipe = cell_recipe(sweep, cell, folder)
    task = load_task(recipe.data)
    try:
        card = read_card(Path(recipe.output.store) / dataset / recipe.adapter_name)
    except StoreError:
        return task  # the adapter has not been trained (yet): the recipe is the one it will use
    trained = load_task(DataConfig.model_validate(card.recipe["data"]))
    if not (same_rows(task.train, trained.train) and same_rows(task.test, trained.test)):
        raise RuntimeError(f"{dataset} seed {seed}: SetFit's rows differ from those adapter {card.name} trained on")
    return task


def same_rows(a, b) -> bool:
    return (a.texts, a.labels, a.text_pairs) == (b.texts, b.labels, b.text_pairs)


def setfit_pairs(labels: list[int], num_iterations: int | None = None) -> int:
    """Pairs SetFit's sampler makes from these labels: with `num_iterations`, that many positive and
    negative pairs per row; by default ("oversampling"), every pair with replacement, the rarer kind
    (positive or negative) repeated up to the other's count."""
    if num_iterations:
        return 2 * num_iterations * len(labels)
    counts = [labels.count(label) for label in sorted(set(labels))]
    positive = sum(n * (n + 1) // 2 for n in counts)
    negative = (sum(counts) ** 2 - sum(n * n for n in counts)) // 2
    return 2 * max(positive, negative)


def train_setfit(task, body: str, seed: int, time_limit: float = 0, num_iterations: int | None = None) -> dict:
    """Train SetFit with its defaults (or `num_iterations`) on the task's k-shot rows; evaluate on its
    test rows. A run that passes `time_limit` seconds stops early and comes back as a timeout with an
    estimate of its length."""
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    from adapterlab.metrics import classification_metrics

    model = SetFitModel.from_pretrained(body)
    pairs = setfit_pairs(task.train.labels, num_iterations)
    clock = _Clock(time_limit)
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(output_dir=output_dir, seed=seed, save_strategy="no", report_to="none",
                                 num_iterations=num_iterations)
        trainer = Trainer(model=model, args=args, callbacks=[clock.callback()],
                          train_dataset=Dataset.from_dict({"text": setfit_texts(model, task.train),
                                                           "label": task.train.labels}))
        load, started, cpu = os.getloadavg()[0], time.perf_counter(), time.process_time()
        trainer.train()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    cell = {"num_iterations": num_iterations, "train_rows": len(task.train), "test_rows": len(task.test),
            "pairs": pairs, "steps": math.ceil(pairs / SETFIT_SETTINGS["batch_size"]),
            "train_seconds": round(seconds, 3), "train_cpu_seconds": round(cpu, 1),
            "load_average_at_start": round(load, 2), **_machine()}
    if clock.stopped_at:
        done, total = clock.stopped_at
        return {**cell, "status": "timeout", "time_limit": time_limit, "steps_done": done,
                "estimated_train_seconds": round(seconds * total / done)}
    predictions = model.predict(setfit_texts(model, task.test), batch_size=64, as_numpy=True).tolist()
    metrics = classification_metrics([int(p) for p in predictions], task.test.labels, len(task.label_names))
    return {**cell, "status": "ok", "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}


def setfit_texts(model, rows) -> list[str]:
    """SetFit reads one text a row: a pair's two texts joined by the body's separator token, which its
    tokenizer reads back as the separator (as a BERT reads a pair)."""
    if rows.text_pairs is None:
        return rows.texts
    separator = model.model_body.tokenizer.sep_token
    return [f"{text} {separator} {pair}" for text, pair in zip(rows.texts, rows.text_pairs)]


class _Clock:
    """A trainer callback that stops the contrastive phase once `limit` seconds have passed."""

    def __init__(self, limit: float):
        self.limit, self.started, self.stopped_at = limit, None, None

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class StopAfter(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                clock.started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if clock.limit and time.perf_counter() - clock.started > clock.limit and not clock.stopped_at:
                    clock.stopped_at = (state.global_step, state.max_steps)
                    control.should_training_stop = True
                return control

        return StopAfter()


def _machine() -> dict:
    """The CPU a cell ran on: time ratios compare cells of one kind of CPU only."""
    from adapterlab.precision import cpu_capability

    cpu = cpu_capability()
    return {**cell_cpu(cpu), "isa": cpu["isa"], "onednn_bf16": cpu["onednn_bf16"]}


def run_setfit(sweep, out: Path, time_limit: float, num_iterations: int | None = None,
               backbone: str = "minilm") -> None:
    """Train the SetFit cells of `backbone` not yet in its SetFit cells file under these settings (timeouts
    under a longer limit count as done); each cell records its backbone."""
    import setfit

    from adapterlab.backbones import resolve_path

    file = out / fewshot_files(backbone)["setfit"]
    done = {_setfit_key(r) for r in of_backbone(read_jsonl(file), backbone)
            if r.get("num_iterations") == num_iterations
            and (r["status"] == "ok" or (time_limit and r.get("time_limit", math.inf) >= time_limit))}
    todo = [(d, s) for d in sweep.datasets for s in sweep.seeds
            if (d, sweep.k[0], s, sweep.test_limit) not in done]
    body = str(resolve_path(sweep.backbone))
    for dataset, seed in tqdm(todo, desc="setfit"):
        result = train_setfit(setfit_task(sweep, dataset, seed), body, seed, time_limit, num_iterations)
        row = {"dataset": dataset, "method": "setfit", "backbone": backbone, "k": sweep.k[0], "seed": seed,
               "test_limit": sweep.test_limit, **result, "setfit_version": setfit.__version__}
        print(json.dumps(row), file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        append_jsonl(file, row)


def _setfit_key(row: dict) -> tuple:
    return row["dataset"], row["k"], row["seed"], row["test_limit"]


def setfit_rows(sweep, out: Path, backbone: str = "minilm") -> list[dict]:
    """SetFit cells of this comparison on `backbone`; of two runs of a cell, a finished one before a
    timeout (e.g. a run with fewer pairs where the default ran out of time), then the later one."""
    rows = [r for r in of_backbone(read_jsonl(out / fewshot_files(backbone)["setfit"]), backbone)
            if r["dataset"] in sweep.datasets and r["k"] == sweep.k[0] and r["seed"] in sweep.seeds
            and r["test_limit"] == sweep.test_limit]
    chosen = {}
    for row in sorted(rows, key=lambda r: r["status"] == "ok"):  # stable: file order within each status
        chosen[_setfit_key(row)] = row
    return list(chosen.values())


# --- the comparison table ---------------------------------------------------------------------------------

def build_report(zero_shot: dict[str, float], adapter: list[dict], setfit: list[dict], datasets: list[str],
                 seeds: list[int], k: int, cv: list[dict] = ()) -> dict:
    """Per dataset: zero-shot accuracy, each method's mean ± std over seeds, per-seed figures and train
    seconds, the time ratio; then the means over the datasets both methods finished, and the targets.
    With `cv` (the cells of the recipe choosing its settings by cross-validation) the same for it, its
    estimate beside its test accuracy and its worst seed beside zero-shot."""
    table = {}
    for dataset in datasets:
        entry = {"zero_shot": zero_shot.get(dataset),
                 "adapterlab": method_stats([r for r in adapter if r["dataset"] == dataset]),
                 "setfit": method_stats([r for r in setfit if r["dataset"] == dataset and r["status"] == "ok"])}
        iterations = sorted({r["num_iterations"] for r in setfit if r["dataset"] == dataset and r["status"] == "ok"
                             and r.get("num_iterations")})
        if iterations:  # not SetFit's default sampling
            entry["setfit_num_iterations"] = iterations
        timeouts = [r for r in setfit if r["dataset"] == dataset and r["status"] == "timeout"]
        if timeouts:
            entry["setfit_timeouts"] = {str(r["seed"]): {key: r[key] for key in (
                "time_limit", "steps_done", "steps", "estimated_train_seconds")} for r in timeouts}
        if entry["adapterlab"] and entry["setfit"]:
            entry["time_ratio"] = _time_ratio(entry["adapterlab"], entry["setfit"])
        if cv:
            entry["adapterlab_cv"] = cv_stats([r for r in cv if r["dataset"] == dataset], entry["zero_shot"])
            if entry["adapterlab_cv"] and entry["setfit"]:
                entry["cv_time_ratio"] = _time_ratio(entry["adapterlab_cv"], entry["setfit"])
        table[dataset] = entry
    summary = summarize(table)
    return {"datasets": table, "summary": summary, "targets": check_targets(table, summary, datasets, seeds, k)}


def _time_ratio(method: dict, setfit: dict) -> float:
    return round(method["train_seconds_mean"] / setfit["train_seconds_mean"], 4)


def method_stats(rows: list[dict]) -> dict | None:
    if not rows:
        return None
    rows = sorted(rows, key=lambda r: r["seed"])
    accuracies, seconds = [r["accuracy"] for r in rows], [r["train_seconds"] for r in rows]
    return {"accuracy_mean": round(statistics.fmean(accuracies), 4),
            "accuracy_std": round(sample_std(accuracies), 4),
            "train_seconds_mean": round(statistics.fmean(seconds), 3),
            "per_seed": {str(r["seed"]): {"accuracy": round(r["accuracy"], 4),
                                          "train_seconds": round(r["train_seconds"], 3)} for r in rows}}


def cv_stats(rows: list[dict], zero_shot: float | None) -> dict | None:
    """`method_stats` of the cells that chose their settings by cross-validation, with the estimate
    (cv_accuracy) beside the test accuracy per seed, the mean distance between them, and the floor: the
    worst seed's test accuracy beside zero-shot, the seeds below it, and those the card flagged."""
    stats = method_stats(rows)
    if not stats:
        return None
    for row in rows:
        stats["per_seed"][str(row["seed"])] |= {key: row[key] for key in ("cv_accuracy", "chosen", "below_zero_shot",
                                                                          "fell_back")}
    accuracies = [r["accuracy"] for r in rows]
    return {**stats, "cv_accuracy_mean": round(statistics.fmean(r["cv_accuracy"] for r in rows), 4),
            "cv_error_points_mean": round(100 * statistics.fmean(abs(r["cv_accuracy"] - r["accuracy"])
                                                                 for r in rows), 2),
            "worst_seed_accuracy": round(min(accuracies), 4),
            "seeds_below_zero_shot": sorted(r["seed"] for r in rows
                                            if zero_shot is not None and r["accuracy"] < zero_shot),
            "seeds_flagged_below_zero_shot": sorted(r["seed"] for r in rows if r["below_zero_shot"]),
            "seeds_fell_back": sorted(r["seed"] for r in rows if r["fell_back"])}


def summarize(table: dict) -> dict:
    """Means over the datasets where both methods have results (and zero-shot over those too); where
    SetFit ran with other than its default pairs somewhere, the margin over its default runs alone too;
    the same for adapterlab CV over the datasets where it and SetFit finished."""
    compared = [d for d, e in table.items() if e["adapterlab"] and e["setfit"]]
    summary = {"compared_datasets": compared}
    if compared:
        adapter = statistics.fmean(table[d]["adapterlab"]["accuracy_mean"] for d in compared)
        setfit = statistics.fmean(table[d]["setfit"]["accuracy_mean"] for d in compared)
        zero = [table[d]["zero_shot"] for d in compared if table[d]["zero_shot"] is not None]
        summary |= {"adapterlab_accuracy_mean": round(adapter, 4), "setfit_accuracy_mean": round(setfit, 4),
                    "zero_shot_accuracy_mean": round(statistics.fmean(zero), 4) if len(zero) == len(compared) else None,
                    "margin_points": round(100 * (adapter - setfit), 2),
                    "time_ratio_mean": round(statistics.fmean(table[d]["time_ratio"] for d in compared), 4)}
        defaults = [d for d in compared if "setfit_num_iterations" not in table[d]]
        if defaults and defaults != compared:
            summary["setfit_defaults_datasets"] = defaults
            summary["margin_points_setfit_defaults"] = round(100 * statistics.fmean(
                table[d]["adapterlab"]["accuracy_mean"] - table[d]["setfit"]["accuracy_mean"] for d in defaults), 2)
    with_cv = [d for d, e in table.items() if e.get("adapterlab_cv") and e["setfit"]]
    if with_cv:
        cv = [table[d]["adapterlab_cv"] for d in with_cv]
        summary["cv"] = {
            "compared_datasets": with_cv, "accuracy_mean": round(statistics.fmean(c["accuracy_mean"] for c in cv), 4),
            "cv_accuracy_mean": round(statistics.fmean(c["cv_accuracy_mean"] for c in cv), 4),
            "cv_error_points_mean": round(statistics.fmean(c["cv_error_points_mean"] for c in cv), 2),
            "margin_points": round(100 * statistics.fmean(
                table[d]["adapterlab_cv"]["accuracy_mean"] - table[d]["setfit"]["accuracy_mean"] for d in with_cv), 2),
            "time_ratio_mean": round(statistics.fmean(table[d]["cv_time_ratio"] for d in with_cv), 4)}
    return summary


def check_targets(table: dict, summary: dict, datasets: list[str], seeds: list[int], k: int) -> dict:
    """The three targets on what was measured (pass None: nothing to judge yet), and whether the
    measurement covers the target setting (every target dataset, seeds 0/1/2, k=16, all cells finished;
    more datasets may be measured beside them)."""
    judged = [d for d, e in table.items() if e["adapterlab"] and e["zero_shot"] is not None]
    below = [d for d in judged if table[d]["adapterlab"]["accuracy_mean"] < table[d]["zero_shot"]]
    setting = k == TARGETS["k"] and sorted(seeds) == TARGETS["seeds"]
    complete = setting and _finished(table, TARGETS["datasets"], ("adapterlab", "setfit"), seeds)
    margin, ratio = summary.get("margin_points"), summary.get("time_ratio_mean")
    checks = {
        "accuracy_margin": {"rule": f"mean over datasets: adapterlab ≥ SetFit + {TARGETS['margin_points_min']:g}"
                                    " points", "value": margin,
                            "pass": None if margin is None else margin >= TARGETS["margin_points_min"]},
        "not_below_zero_shot": {"rule": "adapterlab's mean ≥ zero-shot on every dataset", "below": below,
                                "pass": not below if judged else None},
        "time_ratio": {"rule": f"adapterlab train seconds ≤ {TARGETS['time_ratio_max']:g} × SetFit's (mean of "
                               "per-dataset ratios)", "value": ratio,
                       "pass": None if ratio is None else ratio <= TARGETS["time_ratio_max"]},
    }
    passed = all(check["pass"] is True for check in checks.values())
    targets = {**checks, "complete": complete, "meets_targets": complete and passed}
    if "cv" in summary or any(e.get("adapterlab_cv") for e in table.values()):
        targets["cv"] = _cv_targets(table, summary.get("cv", {}), setting and _finished(
            table, TARGETS["cv_datasets"], ("adapterlab_cv", "setfit"), seeds))
    return targets


def _finished(table: dict, datasets: list[str], methods: tuple[str, ...], seeds: list[int]) -> bool:
    """Whether every one of `datasets` has its zero-shot cell and every seed of `methods`."""
    return all(d in table and table[d]["zero_shot"] is not None and all(
        table[d].get(m) and len(table[d][m]["per_seed"]) == len(seeds) for m in methods) for d in datasets)


def _cv_targets(table: dict, cv: dict, complete: bool) -> dict:
    """The targets for the recipe choosing its settings by CV: the margin and time ratio of the k-only
    report, and every dataset's worst seed at or above zero-shot."""
    judged = [d for d, e in table.items() if e.get("adapterlab_cv") and e["zero_shot"] is not None]
    below = [d for d in judged if table[d]["adapterlab_cv"]["seeds_below_zero_shot"]]
    margin, ratio = cv.get("margin_points"), cv.get("time_ratio_mean")
    checks = {
        "accuracy_margin": {"rule": f"mean over datasets: adapterlab CV ≥ SetFit + {TARGETS['margin_points_min']:g}"
                                    " points", "value": margin,
                            "pass": None if margin is None else margin >= TARGETS["margin_points_min"]},
        "worst_seed_not_below_zero_shot": {"rule": "every seed of adapterlab CV ≥ zero-shot on every dataset",
                                           "below": below, "pass": not below if judged else None},
        "time_ratio": {"rule": f"adapterlab CV train seconds, selection included, ≤ {TARGETS['time_ratio_max']:g}"
                               " × SetFit's (mean of per-dataset ratios)", "value": ratio,
                       "pass": None if ratio is None else ratio <= TARGETS["time_ratio_max"]},
    }
    passed = all(check["pass"] is True for check in checks.values())
    return {**checks, "complete": complete, "meets_targets": complete and passed}


def markdown(report: dict) -> str:
    lines = ["| dataset | zero-shot | adapterlab LoRA | SetFit | adapterlab train s | SetFit train s | time ratio |",
             "|---|---|---|---|---|---|---|"]
    for dataset, e in report["datasets"].items():
        setfit = _stat(e['setfit']) + (f" (num_iterations={e['setfit_num_iterations'][0]})"
                                       if e.get("setfit_num_iterations") else "")
        lines.append(f"| {dataset} | {_pct(e['zero_shot'])} | {_stat(e['adapterlab'])} | {setfit} | "
                     f"{_secs(e['adapterlab'])} | {_secs(e['setfit'], e.get('setfit_timeouts'))} | "
                     f"{_ratio(e.get('time_ratio'))} |")
    s = report["summary"]
    if s["compared_datasets"]:
        lines.append(f"| mean of {len(s['compared_datasets'])} | {_pct(s['zero_shot_accuracy_mean'])} | "
                     f"{_pct(s['adapterlab_accuracy_mean'])} | {_pct(s['setfit_accuracy_mean'])} | | | "
                     f"{_ratio(s['time_ratio_mean'])} |")
    lines.append("")
    lines += [f"- {name}: {check['rule']}: **{VERDICTS[check['pass']]}**"
              + (f" ({check['value']})" if check.get("value") is not None else "")
              + (f" (below: {', '.join(check['below'])})" if check.get("below") else "")
              for name, check in report["targets"].items() if isinstance(check, dict) and "rule" in check]
    lines.append(f"- measured on the whole target setting: {'yes' if report['targets']['complete'] else 'no'}")
    if "margin_points_setfit_defaults" in s:
        defaults = ", ".join(s["setfit_defaults_datasets"])
        lines.append(f"- over the datasets where SetFit ran with its default pairs ({defaults}) the margin is "
                     f"{s['margin_points_setfit_defaults']} points")
    if "cv" in report["targets"]:
        lines += ["", *cv_markdown(report)]
    return "\n".join(lines) + "\n"


def cv_markdown(report: dict) -> list[str]:
    """The recipe that chose its settings by cross-validation: test accuracy beside the estimate, the
    worst seed beside zero-shot, time with the selection."""
    lines = ["| dataset | zero-shot | adapterlab CV | its cv_accuracy | mean abs(cv - test) | worst seed | "
             "flagged / fell back (seeds) | train s (select + fit) | time ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for dataset, e in report["datasets"].items():
        cv = e.get("adapterlab_cv")
        if not cv:
            lines.append(f"| {dataset} | {_pct(e['zero_shot'])} | - | - | - | - | - | - | - |")
            continue
        flagged = ", ".join(map(str, cv["seeds_flagged_below_zero_shot"])) or "none"
        fell_back = ", ".join(map(str, cv["seeds_fell_back"])) or "none"
        lines.append(f"| {dataset} | {_pct(e['zero_shot'])} | {_stat(cv)} | {_pct(cv['cv_accuracy_mean'])} | "
                     f"{cv['cv_error_points_mean']:.1f} | {_pct(cv['worst_seed_accuracy'])} | "
                     f"{flagged} / {fell_back} | {_secs(cv)} | {_ratio(e.get('cv_time_ratio'))} |")
    summary = report["summary"].get("cv")
    if summary:
        lines.append(f"| mean of {len(summary['compared_datasets'])} | | {_pct(summary['accuracy_mean'])} | "
                     f"{_pct(summary['cv_accuracy_mean'])} | {summary['cv_error_points_mean']:.1f} | | | | "
                     f"{_ratio(summary['time_ratio_mean'])} |")
    lines.append("")
    targets = report["targets"]["cv"]
    lines += [f"- CV {name}: {check['rule']}: **{VERDICTS[check['pass']]}**"
              + (f" ({check['value']})" if check.get("value") is not None else "")
              + (f" (below: {', '.join(check['below'])})" if check.get("below") else "")
              for name, check in targets.items() if isinstance(check, dict)]
    lines.append(f"- CV measured on the whole target setting: {'yes' if targets['complete'] else 'no'}")
    return lines


VERDICTS = {True: "pass", False: "fail", None: "not measured"}


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _stat(stats) -> str:
    if not stats:
        return "-"
    if len(stats["per_seed"]) == 1:  # no spread to show: say which seed it is
        return f"{100 * stats['accuracy_mean']:.1f} (seed {next(iter(stats['per_seed']))})"
    return f"{100 * stats['accuracy_mean']:.1f} ± {100 * stats['accuracy_std']:.1f}"


def _secs(stats, timeouts=None) -> str:
    if stats:
        return f"{stats['train_seconds_mean']:.1f}"
    if timeouts:
        return "> " + ", ".join(f"{t['time_limit']:g} (est. {t['estimated_train_seconds']:g})"
                                for t in timeouts.values())
    return "-"


def plot(report: dict, file: Path, k: int) -> None:
    """Grouped bars per dataset: zero-shot, adapterlab and SetFit, with ±std error bars over seeds."""
    datasets = list(report["datasets"])
    entries = [report["datasets"][d] for d in datasets]
    methods = [("adapterlab LoRA", "adapterlab"), ("SetFit", "setfit")]
    if "cv" in report["targets"]:
        methods.insert(1, ("adapterlab LoRA, CV", "adapterlab_cv"))
    bars = [("zero-shot", [e["zero_shot"] or 0 for e in entries], [0] * len(entries))]
    bars += [(label, [e[m]["accuracy_mean"] if e.get(m) else 0 for e in entries],
              [e[m]["accuracy_std"] if e.get(m) else 0 for e in entries]) for label, m in methods]
    plot_accuracy_bars(file, datasets, bars, k)


def results_folder(out: Path) -> Path:
    """Where this CPU's cells live: time ratios compare within one kind of CPU, so cells measured where
    bf16 is slow (AVX2 alone, or oneDNN held to AVX2; `auto` trains in full precision there) are kept
    apart from the fast-bf16 ones, which keep the folder itself."""
    from adapterlab.precision import cpu_capability

    return out if cpu_capability()["fast_bf16"] else out / "no-fast-bf16"


def main(argv=None) -> dict:
    from adapterlab.precision import cpu_capability

    options = parse_args(argv)
    test_limit = options.test_limit or None
    options.out = results_folder(options.out)
    options.out.mkdir(parents=True, exist_ok=True)
    sweep = build_sweep(options.datasets, options.seeds, options.k, test_limit, options.out, options.backbone)
    run_sweep_cells(sweep, options.methods)
    if "setfit" in options.methods:
        run_setfit(sweep, options.out, options.setfit_time_limit, options.setfit_num_iterations, options.backbone)
    rows = sweep_rows(sweep)
    zero_shot = {r["dataset"]: r["accuracy"] for r in rows if r["method"] == "zeroshot"}
    report = build_report(zero_shot, [r for r in rows if r["method"] == ADAPTER_METHOD],
                          setfit_rows(sweep, options.out, options.backbone), options.datasets, options.seeds,
                          options.k, [r for r in rows if r["method"] == CV_METHOD])
    result = {"benchmark": "fewshot", "backbone": options.backbone, "k": options.k, "seeds": options.seeds,
              "test_limit": test_limit, **report, "setfit_settings": SETFIT_SETTINGS, "target_setting": TARGETS,
              "adapter_recipe": str(Path(sweep.methods[ADAPTER_METHOD]).relative_to(ROOT)),
              "cv_recipe": str(CV_RECIPE.relative_to(ROOT)), "cpu": cpu_capability(), "cpu_count": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d"), "commit": git_commit()}
    files = options.out / fewshot_files(options.backbone)["report"]
    files.with_suffix(".json").write_text(json.dumps(result, indent=2))
    heading = (f"Backbone {options.backbone}, k={options.k}, seeds {options.seeds}, {test_limit or 'all'} test "
               f"rows; CPU: {describe_cpu(result['cpu'])}; written {result['date']} at commit {result['commit']} "
               "from the kept cells.\n\n")
    files.with_suffix(".md").write_text(heading + markdown(report))
    plot(report, files.with_suffix(".png"), options.k)
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with contextlib.redirect_stdout(sys.stderr):  # the trainers print their logs on stdout
        result = main()
    print(json.dumps(result))
