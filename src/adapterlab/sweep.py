"""Sweeps: datasets × methods × k × seeds in one command, resumable, with a table and plots.

A sweep file names a backbone, datasets (data sections), methods (recipe files, `zeroshot`, or
`incontext`: the bare backbone shown `shots` of each cell's k-shot rows per class), the k values (null:
the whole train split, as library adapters train) and the seeds. Its recipes classify (the report's
score: accuracy) or generate (BLEU; zero-shot and in-context prompt the bare backbone with the first
recipe's template); `metric` picks another score. Each finished cell is appended to results.jsonl at
once, with a digest of the settings it ran under, its date and commit, so an interrupted sweep resumes
where it stopped and a cell whose recipe has changed since runs again (a change of code does not: the
sweep warns of cells kept from another commit); the report (CSV, JSON, markdown with mean ± std over
seeds and where the cells were measured, PNG plots) is rebuilt after every run from the cells of the
sweep as it now stands. Cells run one after another in this process, or through another runner
(`ray_sweep.on_ray`: as tasks on a Ray cluster); the factory (`factory_sweep`) is a sweep of one cell per
task folder.
"""

import csv
import functools
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tqdm.auto import tqdm

from adapterlab.errors import AdapterlabError
from adapterlab.metrics import BUILTIN, GENERATION
from adapterlab.names import json_digest
from adapterlab.precision import cpu_capability
from adapterlab.provenance import git_commit
from adapterlab.recipe import DataConfig, Recipe, load_recipe
from adapterlab.store import read_card

log = logging.getLogger("adapterlab")

ZERO_SHOT = "zeroshot"
IN_CONTEXT = "incontext"
PROMPTING = (ZERO_SHOT, IN_CONTEXT)  # methods that train nothing: the bare backbone, prompted


class SweepError(AdapterlabError):
    """A sweep file that cannot be read or does not fit the schema."""


class Sweep(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Names the output folder.")
    backbone: str = Field(description="Every recipe runs on this backbone.")
    datasets: dict[str, dict] = Field(description="Dataset name → data section (path, fields, labels).")
    methods: dict[str, str] = Field(description="Method name → recipe file, 'zeroshot' or 'incontext'.")
    k: list[Annotated[int, Field(gt=0)] | None] = Field(
        description="Examples per class; null: the whole train split (library adapters).", min_length=1)
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    test_limit: int | None = Field(None, gt=0, description="Evaluate on the first N test rows.")
    shots: int = Field(4, gt=0, description="In-context cells: demonstrations (per class when classifying), the "
                       "first of the cell's k-shot rows (at most k): the rows its adapters train on.")
    overrides: list[str] = Field([], description="--set overrides applied to every recipe.")
    output: str = Field("results/sweeps", description="Results go to OUTPUT/NAME/.")
    cpus_per_cell: float = Field(1, ge=0, description="CPUs each cell's Ray task asks for (sweeps on Ray).")
    gpus_per_cell: float = Field(0, ge=0, description="GPUs each cell's Ray task asks for (sweeps on Ray).")
    metric: str | None = Field(None, description="The score the report summarizes: default accuracy for "
                               "classification recipes, bleu for generation ones; or another metric every cell "
                               "reports (macro_f1; chrf, rouge_l, slot_f1 and the recipes' training.metrics).")


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
        sweep = Sweep.model_validate(raw)
    except FileNotFoundError:
        raise SweepError(f"sweep file not found: {path}") from None
    except yaml.YAMLError as error:
        raise SweepError(f"{path}: malformed YAML: {str(error).splitlines()[0]}") from None
    except ValidationError as error:
        problems = ["{}: {}".format(".".join(map(str, e["loc"])),
                                    "unknown key" if e["type"] == "extra_forbidden" else e["msg"])
                    for e in error.errors()]
        raise SweepError(f"{path}: {'; '.join(problems)}") from None
    for method, recipe in sweep.methods.items():
        if recipe not in PROMPTING and not Path(recipe).is_file():
            raise SweepError(f"{path}: method {method!r}: recipe not found: {recipe}")
    generates = prompt_recipe(sweep) is not None
    metric = main_metric(sweep)
    if metric not in BUILTIN or (metric in GENERATION) != generates:
        known = ["bleu", *(m for m in GENERATION if m != "bleu")] if generates else ["accuracy", "macro_f1"]
        raise SweepError(f"{path}: metric {metric!r}: the cells of this sweep report {', '.join(known)}")
    return sweep


def prompt_recipe(sweep: Sweep) -> str | None:
    """A generation sweep's first recipe file (its zero-shot cells prompt with its head); None when the
    recipes classify. One sweep does not mix the two: their scores do not compare."""
    kinds = {file: load_recipe(file).head.type == "generate" for file in sweep.methods.values() if file not in PROMPTING}
    if len(set(kinds.values())) > 1:
        raise SweepError(f"sweep {sweep.name!r} mixes generation and classification recipes: give each its own sweep")
    return next((file for file, generates in kinds.items() if generates), None)


def main_metric(sweep: Sweep) -> str:
    return sweep.metric or ("bleu" if prompt_recipe(sweep) else "accuracy")


def factory_sweep(recipe: str | Path, folders: list[Path], name: str, output: str,
                  overrides: list[str] = ()) -> Sweep:
    """The adapter factory: a sweep that trains `recipe` once on each task folder (a dataset named after
    its folder, at the recipe's k and seed), so it runs, resumes and reports as a sweep does."""
    recipe_settings = load_recipe(recipe, list(overrides))
    missing = [str(folder) for folder in folders if not Path(folder).is_dir()]
    if missing:
        raise SweepError(f"task folders not found: {', '.join(missing)}")
    if len({Path(folder).name for folder in folders}) < len(folders):
        raise SweepError("task folders name the tasks: give folders of distinct names")
    return Sweep(name=name, backbone=recipe_settings.backbone, output=output, overrides=list(overrides),
                 datasets={Path(folder).name: {"path": str(Path(folder).resolve())} for folder in folders},
                 methods={recipe_settings.method.name: str(recipe)}, k=[recipe_settings.data.k],
                 seeds=[recipe_settings.data.seed])


def cells(sweep: Sweep) -> list[dict]:
    """Every run of the sweep; zero-shot runs once per dataset (k 0, no training seed); in-context per
    k and seed (its demonstrations are that draw's rows)."""
    grid = []
    for dataset in sweep.datasets:
        for method, recipe in sweep.methods.items():
            if recipe == ZERO_SHOT:
                grid.append({"dataset": dataset, "method": method, "k": 0, "seed": 0})
                continue
            grid += [{"dataset": dataset, "method": method, "k": k, "seed": seed}
                     for k in sweep.k for seed in sweep.seeds]
    return [{**cell, "settings": _settings_digest(sweep, cell)} for cell in grid]


def _settings_digest(sweep: Sweep, cell: dict) -> str:
    """What a cell's result depends on, hashed: the settings its recipe gives, but `output` (zero-shot:
    the backbone, the data section and the test rows; in-context: and the shots). Not where the data lies, so that a moved checkout
    keeps its cells; not the defaults, so that a new recipe field does not make every cell stale."""
    if sweep.methods[cell["method"]] in PROMPTING:
        settings = {"backbone": sweep.backbone, "data": sweep.datasets[cell["dataset"]], "test_limit": sweep.test_limit}
        if sweep.methods[cell["method"]] == IN_CONTEXT:
            settings["shots"] = sweep.shots
        if prompt_recipe(sweep):  # the prompt comes from a recipe's head
            settings["head"] = cell_recipe(sweep, cell, Path(sweep.output)).head.model_dump(mode="json")
    else:
        settings = cell_recipe(sweep, cell, Path(sweep.output)).written_settings({"output": True})
    settings["data"] = {key: value for key, value in settings["data"].items() if key != "path"}
    return json_digest(settings, 16)


def finished_cells(sweep: Sweep, grid: list[dict] | None = None) -> list[dict]:
    """The rows of results.jsonl that are cells of the sweep as it now stands (rows of cells since
    removed, or run under other settings, stay in the file and out of the report); `grid`: the
    sweep's cells when already computed (their digests load every recipe)."""
    wanted = {_key(cell) for cell in grid or cells(sweep)}
    return [row for row in read_results(Path(sweep.output) / sweep.name / "results.jsonl") if _key(row) in wanted]


@dataclass
class CellFailure:
    """A cell a runner gave up on, and why."""

    cell: dict
    reason: str


Runner = Callable[[Sweep, list[dict], Path], Iterator["dict | CellFailure"]]


def run_sweep(sweep: Sweep, show_progress: bool = True, runner: Runner | None = None) -> Path:
    """Run the cells not yet in results.jsonl, then write the report; returns the output folder.
    `runner` runs cells and yields their result rows as they finish (default: one after another in
    this process; `ray_sweep.on_ray`: as Ray tasks). Cells it gave up on are reported after the report
    is written, and run again by the next run."""
    folder = Path(sweep.output) / sweep.name
    folder.mkdir(parents=True, exist_ok=True)
    results_file = folder / "results.jsonl"
    done = {_key(row) for row in read_results(results_file)}
    grid = cells(sweep)
    todo = [cell for cell in grid if _key(cell) not in done]
    warn_of_other_code(finished_cells(sweep, grid))
    failures = []
    with closing((runner or run_here)(sweep, todo, folder)) as finished, \
            tqdm(total=len(todo), desc=f"sweep {sweep.name}", disable=not show_progress) as progress:
        for row in finished:
            if isinstance(row, CellFailure):
                failures.append(row)
            else:
                append_result(results_file, row)
            progress.update()
    write_report(finished_cells(sweep, grid), folder, main_metric(sweep))
    if failures:
        raise SweepError(f"{len(failures)} cells failed (run the sweep again to retry them): " + "; ".join(
            f"{f.cell['dataset']}/{f.cell['method']}/k{k_shown(f.cell['k'])}/s{f.cell['seed']}: {f.reason}"
            for f in failures))
    return folder


def warn_of_other_code(kept: list[dict]) -> None:
    """Kept cells are keyed by their settings, not by the code: say when some were measured at another commit."""
    now = git_commit()
    others = sorted({row["commit"] for row in kept if row.get("commit") not in (None, "unknown", now)})
    if others and now != "unknown":
        log.warning("%d kept cells were measured at commit %s, this code is %s: they are not run again (only a "
                    "change of their settings does); remove their rows from results.jsonl to measure them anew",
                    sum(row.get("commit") in others for row in kept), ", ".join(others), now)


def run_here(sweep: Sweep, todo: list[dict], folder: Path) -> Iterator[dict]:
    """The cells one after another in this process."""
    for cell in todo:
        yield run_cell(sweep, cell, folder)


def run_cell(sweep: Sweep, cell: dict, folder: Path) -> dict:
    """A cell's result row: the cell, its metrics and training time, the CPU it ran on (timings compare
    only between cells of the same kind of CPU), the date and the commit."""
    if sweep.methods[cell["method"]] in PROMPTING:
        engine = _engine(sweep.backbone)
        metrics, seconds = _prompting(engine, sweep, cell, folder), 0.0
        metrics["dtype"] = str(engine.backbone.dtype).removeprefix("torch.")
    else:
        metrics, seconds = _train(sweep, cell, folder)
    cpu = cpu_capability()
    return {**cell, **metrics, "train_seconds": seconds, "cpu": cpu["cpu"], "fast_bf16": cpu["fast_bf16"],
            "isa": cpu["isa"], "date": time.strftime("%Y-%m-%d"), "commit": git_commit()}


def append_result(results_file: Path, row: dict) -> None:
    with open(results_file, "a") as handle:  # one line per finished cell: resumable
        handle.write(json.dumps(row) + "\n")


def _key(row: dict) -> tuple:
    return row["dataset"], row["method"], row["k"], row["seed"], row.get("settings")


def read_results(file: Path) -> list[dict]:
    if not file.exists():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


@functools.lru_cache(maxsize=1)  # the prompting cells of a sweep share one backbone
def _engine(backbone: str):
    """Scoring as the trained cells are scored (`Engine.for_comparison`)."""
    from adapterlab.engine import Engine

    return Engine.for_comparison(backbone)


def _prompting(engine, sweep: Sweep, cell: dict, folder: Path) -> dict:
    """A zero-shot or in-context cell's metrics (in-context: shown the first `shots` of the k-shot rows)."""
    from adapterlab.baselines import evaluate_prompting
    from adapterlab.zeroshot import ZeroShotConfig, evaluate_zero_shot

    shots = min(sweep.shots, cell["k"] or sweep.shots) if sweep.methods[cell["method"]] == IN_CONTEXT else 0
    if prompt_recipe(sweep):
        return {**evaluate_prompting(engine, cell_recipe(sweep, cell, folder), shots), **({"shots": shots} if shots else {})}
    data = DataConfig.model_validate({**sweep.datasets[cell["dataset"]], "k": None})
    config = ZeroShotConfig(shots=shots, seed=cell["seed"], pool=cell["k"] or None)
    metrics = evaluate_zero_shot(engine, data, config, limit=sweep.test_limit)
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], **({"shots": shots} if shots else {})}


def cell_recipe(sweep: Sweep, cell: dict, folder: Path) -> Recipe:
    """The recipe a training cell runs: its method's recipe on the cell's dataset, k and seed (a
    generation sweep's prompting cell: its prompt recipe on the dataset, at the cell's k and seed). Its
    adapter is named as a default name is, with the sweep's name of the method: METHOD-kK-sSEED-DIGEST."""
    data = sweep.datasets[cell["dataset"]]
    file = sweep.methods[cell["method"]]
    overrides = [f"data.{key}={json.dumps(value)}" for key, value in data.items()] + [
        f"task={cell['dataset']}", f"backbone={sweep.backbone}", f"data.k={cell['k'] or 'null'}",
        f"data.seed={cell['seed']}", f"training.seed={cell['seed']}", f"output.store={folder / 'adapters'}",
        *sweep.overrides]
    if sweep.test_limit:
        overrides.append(f"data.test_limit={sweep.test_limit}")
    recipe = load_recipe(prompt_recipe(sweep) if file in PROMPTING else file, overrides)
    name = f"{cell['method']}-k{k_shown(cell['k'])}-s{cell['seed']}-{recipe.settings_digest}"
    return recipe.with_settings({"output.name": name})


def _train(sweep: Sweep, cell: dict, folder: Path) -> tuple[dict, float]:
    from adapterlab.training import train

    result = train(cell_recipe(sweep, cell, folder), show_progress=False)
    card = read_card(result.adapter_path)
    row = {**result.metrics, "mixed_precision": card.recipe["training"]["mixed_precision"],
           "adapter": f"{card.task}/{card.name}"}
    if not card.selection:
        return row, result.train_seconds
    # training.select: its estimate beside the test metrics; the selection's seconds count as training time
    selection = card.selection
    row |= {key: selection[key] for key in ("cv_accuracy", "zero_shot_cv_accuracy", "below_zero_shot", "p_value",
                                            "fell_back", "chosen")}
    row |= {"fit_seconds": result.train_seconds, "select_seconds": selection["seconds"]}
    return row, result.train_seconds + selection["seconds"]


def summarize(rows: list[dict], metric: str = "accuracy") -> list[dict]:
    """Mean and standard deviation of `metric` over seeds for each dataset × method × k (as
    METRIC_mean, METRIC_std; `score_mean`/`score_std` too, whatever the metric)."""
    missing = [row for row in rows if metric not in row]
    if missing:
        raise SweepError(f"cell {missing[0]['dataset']}/{missing[0]['method']} reports no {metric!r} "
                         f"(it reports {', '.join(key for key in missing[0] if key in BUILTIN)})")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["method"], row["k"]), []).append(row)
    summary = []
    for (dataset, method, k), group in sorted(groups.items(), key=lambda item: (*item[0][:2], _k_order(item[0][2]))):
        scores = [row[metric] for row in group]
        mean, std = statistics.fmean(scores), statistics.stdev(scores) if len(scores) > 1 else 0.0
        summary.append({"dataset": dataset, "method": method, "k": k, "seeds": len(group), "metric": metric,
                        f"{metric}_mean": mean, f"{metric}_std": std, "score_mean": mean, "score_std": std,
                        "train_seconds_mean": statistics.fmean(row["train_seconds"] for row in group)})
    return summary


def k_shown(k: int | None) -> str:
    """A cell's k in names and tables: 'all' for the whole train split."""
    return "all" if k is None else str(k)


def _k_order(k: int | None) -> float:
    """The whole split (None) after every k."""
    return math.inf if k is None else k


def _shown(metric: str, value: float) -> str:
    """BLEU and chrF are on 0-100 already; shares (accuracy, F1, ROUGE-L) shown as percentages."""
    return f"{value:.1f}" if metric in ("bleu", "chrf") else f"{100 * value:.1f}"


def write_report(rows: list[dict], folder: Path, metric: str = "accuracy") -> None:
    """results.csv (every run), summary.json and summary.md (mean ± std of `metric`), and the PNG plots."""
    if not rows:
        return
    with open(folder / "results.csv", "w", newline="") as handle:
        columns = list(dict.fromkeys(key for row in rows for key in row))  # zero-shot cells have fewer
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    summary = summarize(rows, metric)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [provenance_line(rows), "", f"| dataset | method | k | {metric} (mean ± std) | seeds | train s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {s['dataset']} | {s['method']} | {k_shown(s['k']) if s['k'] != 0 else '-'} | "
              f"{_shown(metric, s['score_mean'])} ± {_shown(metric, s['score_std'])} | {s['seeds']} | "
              f"{s['train_seconds_mean']:.1f} |" for s in summary]
    (folder / "summary.md").write_text("\n".join(lines) + "\n")
    plot(summary, folder)


def provenance_line(rows: list[dict]) -> str:
    """Where the cells were measured: their dates, CPUs and commits (cells kept from before rows carried a
    date and commit are counted as such)."""
    def listed(key: str) -> str:
        values = sorted({str(row[key]) for row in rows if row.get(key)})
        missing = sum(not row.get(key) for row in rows)
        return ", ".join(values + ([f"{missing} cells unrecorded"] if missing else [])) or "unrecorded"

    cpus = sorted({f"{row['cpu']} ({'fast bf16' if row.get('fast_bf16') else 'no fast bf16'})"
                   for row in rows if row.get("cpu")})
    return (f"{len(rows)} cells measured on {', '.join(cpus) or 'an unrecorded CPU'}; dates: {listed('date')}; "
            f"commits: {listed('commit')}.")


def plot(summary: list[dict], folder: Path) -> None:
    """accuracy_vs_k.png: a panel per dataset, a line with a ±std band per method, zero-shot dashed.
    methods.png: each method's score at the largest k, per dataset, against zero-shot. (The score is
    the summary's metric; the file names stay for every metric.)"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({s["dataset"] for s in summary})
    label = f"test {summary[0]['metric'].replace('_', ' ')}"
    methods = sorted({s["method"] for s in summary if s["k"] != 0})
    ks = sorted({s["k"] for s in summary if s["k"] != 0}, key=_k_order)
    numeric = [k for k in ks if k is not None]  # the whole split sits one doubling right of the largest k
    position = {k: k for k in numeric} | {None: 2 * max(numeric, default=1)}
    figure, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.6), squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        for method in methods:
            points = sorted((position[s["k"]], s["score_mean"], s["score_std"]) for s in summary
                            if s["dataset"] == dataset and s["method"] == method)
            xs, means, stds = zip(*points)
            axis.plot(xs, means, marker="o", label=method)
            axis.fill_between(xs, [m - d for m, d in zip(means, stds)], [m + d for m, d in zip(means, stds)], alpha=0.2)
        for s in summary:
            if s["dataset"] == dataset and s["k"] == 0:
                axis.axhline(s["score_mean"], linestyle="--", color="grey", label=f"{s['method']} (no training)")
        axis.set(title=dataset, xlabel="k (training examples; per class when classifying)", ylabel=label, xscale="log")
        axis.minorticks_off()
        axis.set_xticks([position[k] for k in ks], labels=[k_shown(k) for k in ks])
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(folder / "accuracy_vs_k.png", dpi=110)
    plt.close(figure)

    if not ks:  # zero-shot cells only: no method to set against them
        return
    largest = ks[-1]
    figure, axis = plt.subplots(figsize=(1.6 + 1.4 * len(datasets), 3.6))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        values = [next((s for s in summary if s["dataset"] == d and s["method"] == method and s["k"] == largest), None)
                  for d in datasets]
        axis.bar([j + i * width for j in range(len(datasets))], [v["score_mean"] if v else 0 for v in values],
                 width, yerr=[v["score_std"] if v else 0 for v in values], label=f"{method} (k={k_shown(largest)})")
    for j, dataset in enumerate(datasets):
        for s in summary:
            if s["dataset"] == dataset and s["k"] == 0:
                axis.hlines(s["score_mean"], j - width / 2, j + len(methods) * width - width / 2, colors="black",
                            linestyles="--", label="zero-shot" if j == 0 else None)
    axis.set_xticks([j + (len(methods) - 1) * width / 2 for j in range(len(datasets))], labels=datasets)
    axis.set(ylabel=label, title="methods against zero-shot")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(folder / "methods.png", dpi=110)
    plt.close(figure)
