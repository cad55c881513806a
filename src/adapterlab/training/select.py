"""Choosing a recipe's settings by cross-validation on its k-shot rows alone (`training.select`): the
stratified folds and their trainings through the loop (`Folds`, `FoldTrainer`: tiers.py cross-validates
whole recipes with them too), the grid's (`select_settings`), the choice, the comparison
with the adapter's untrained start (the fallback), and the record the card keeps. `choose_source`
prepares the choice of a stored adapter to start from (`training.init_from: auto`) as one more grid key."""

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from adapterlab.backbones import Backbone, fingerprint, resolve_path
from adapterlab.data import Split, TaskData
from adapterlab.errors import AdapterlabError
from adapterlab.model import AdapterModel
from adapterlab.recipe import Recipe
from adapterlab.training.builders import new_model
from adapterlab.training.library import candidates, label_map
from adapterlab.training.checkpoint import checkpoint_folder, read_selection, run_identity, save_selection
from adapterlab.training.loop import fit, frozen_stem_states, schedule

log = logging.getLogger("adapterlab")

PROTOTYPE_WEIGHT = "head.prototype_weight"  # applied after training: the points differing in it share trainings
# How sure the held-out rows must make a fallback: the folds train on part of the rows, so their estimate
# trails the final run's, and with 16 rows a class one row is several points.
FALLBACK_P_VALUE = 0.05


class SelectionError(AdapterlabError):
    """A selection that cannot run on this task's rows, or would cost more than its max_cost."""


def stratified_folds(labels: list[int], folds: int, seed: int, names: list[str]) -> list[list[int]]:
    """`folds` disjoint parts of the row indices: each class's rows, shuffled with `seed`, dealt over
    the parts in turn (continuing from class to class), so that every part holds out every class and
    part sizes differ by at most one row."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    rng = random.Random(seed)
    parts: list[list[int]] = [[] for _ in range(folds)]
    dealt = 0
    for label in sorted(by_class):
        rows = by_class[label]
        if len(rows) < folds:
            raise SelectionError(f"class {names[label]!r} has {len(rows)} training rows, fewer than "
                                 f"training.select.folds {folds}: some fold would not hold it out")
        rng.shuffle(rows)
        for row in rows:
            parts[dealt % folds].append(row)
            dealt += 1
    return parts


def sign_test(leader_right, other_right) -> float:
    """A one-sided sign test on the held-out rows where two predictors disagree (each given by the rows it got
    right): how likely the leader's lead on them, or more, is if neither were better."""
    leader, other = set(leader_right), set(other_right)
    wins, losses = len(leader - other), len(other - leader)
    disagreements = wins + losses
    return sum(math.comb(disagreements, i) for i in range(wins, disagreements + 1)) / 2 ** disagreements


def trainings(points: list[dict]) -> dict[tuple, list[dict]]:
    """Grid points grouped by what their training needs: all settings but the prototype weight."""
    groups: dict[tuple, list[dict]] = {}
    for point in points:
        key = tuple((name, value) for name, value in point.items() if name != PROTOTYPE_WEIGHT)
        groups.setdefault(key, []).append(point)
    return groups


@dataclass
class PointResult:
    settings: dict
    steps: int  # optimizer steps of its trainings over all folds
    right: list[int] = field(default_factory=list)  # the held-out rows it got right, over all folds

    @property
    def correct(self) -> int:  # each row is held out once
        return len(self.right)


@dataclass
class Selection:
    """The outcome of a cross-validation: every grid point's held-out accuracy, and what it cost."""

    folds: int
    grid: dict[str, list]
    rows: int
    points: list[PointResult]
    trainings: int
    cost: float  # its optimizer steps over those of one run of the recipe as written
    seconds: float = 0.0
    zero_shot_right: list[int] | None = None  # the rows the adapter's untrained start gets right

    @property
    def chosen(self) -> PointResult:
        """The best held-out accuracy; ties go to fewer steps, then to the first written."""
        return min(self.points, key=lambda point: (-point.correct, point.steps))

    def state(self) -> dict:
        """Plain JSON, kept with a run's checkpoints (`from_state` reads it back)."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "Selection":
        return cls(**{**state, "points": [PointResult(**point) for point in state["points"]]})

    def accuracy(self, correct: int) -> float:
        return correct / self.rows

    @property
    def zero_shot_correct(self) -> int | None:
        return None if self.zero_shot_right is None else len(self.zero_shot_right)

    @property
    def below_zero_shot(self) -> bool:
        return self.zero_shot_right is not None and self.chosen.correct < self.zero_shot_correct

    @property
    def below_zero_shot_p_value(self) -> float:
        """How likely the zero-shot start's lead over the chosen point is by chance (`sign_test`)."""
        return sign_test(self.zero_shot_right or (), self.chosen.right)

    @property
    def clearly_below_zero_shot(self) -> bool:
        """Below its zero-shot start by more than the held-out rows' chance: what a fallback needs."""
        return self.below_zero_shot and self.below_zero_shot_p_value < FALLBACK_P_VALUE

    def record(self, fell_back: bool, train_seconds: float) -> dict:
        """What the card keeps: the choice and its estimate beside the zero-shot one, every point, the cost."""
        return {
            "method": "cv", "folds": self.folds, "rows": self.rows, "grid": self.grid,
            "chosen": self.chosen.settings, "cv_accuracy": round(self.accuracy(self.chosen.correct), 4),
            "zero_shot_cv_accuracy": round(self.accuracy(self.zero_shot_correct), 4),
            "below_zero_shot": self.below_zero_shot, "p_value": round(self.below_zero_shot_p_value, 4),
            "fell_back": fell_back,
            "points": [{"settings": p.settings, "cv_accuracy": round(self.accuracy(p.correct), 4)} for p in self.points],
            "trainings": self.trainings, "seconds": round(self.seconds, 3), "steps_ratio": round(self.cost, 3),
            # against the final run of the chosen settings; none when it fell back and nothing trained
            "time_ratio": None if fell_back else round(self.seconds / train_seconds, 3),
        }


def chosen_settings(recipe: Recipe, task: TaskData, accelerator: Accelerator, show_progress: bool,
                    resume: bool) -> Selection:
    """`select_settings`, or with `resume` the choice an interrupted run of this recipe made; a run that
    checkpoints keeps its choice beside its checkpoints."""
    folder = checkpoint_folder(recipe)
    identity = run_identity(recipe, fingerprint(resolve_path(recipe.backbone)), accelerator.num_processes)
    saved = read_selection(folder, identity) if resume else None
    if saved:
        selection = Selection.from_state(saved)
        if accelerator.is_main_process:
            log.info("resuming with the settings the interrupted run chose: %s", selection.chosen.settings)
        return selection
    selection = select_settings(recipe, task, accelerator, show_progress)
    if recipe.training.checkpoint_every and accelerator.is_main_process:
        save_selection(folder, selection.state(), identity)
    return selection


@dataclass
class Folds:
    """The k-shot rows cut into stratified parts (`stratified_folds`): each part is held out once, and a
    fold trains on the rows of the others."""

    held_out: list[list[int]]
    kept: list[list[int]]

    @classmethod
    def of(cls, task: TaskData, folds: int, seed: int) -> "Folds":
        held_out = stratified_folds(task.train.labels, folds, seed, task.label_names)
        return cls(held_out, [[i for part in held_out if part is not out for i in part] for out in held_out])

    def recipes(self, trial: Recipe, rows: int) -> list[Recipe]:
        """The trial as each fold trains it (`_fold_recipe`)."""
        return [_fold_recipe(trial, len(kept), rows) for kept in self.kept]


class FoldTrainer:
    """Trains trials fold by fold on one backbone: loaded once, each fold's adapter built on it and taken
    out of it again, and every k-shot row's frozen stem states computed once per way of reading the rows
    (the folds' rows are among them)."""

    def __init__(self, task: TaskData, accelerator: Accelerator, backbone: Backbone | None = None):
        self.task, self.accelerator, self.backbone = task, accelerator, backbone
        self.stems: dict[tuple, list | None] = {}

    def train_and_score(self, fold: Recipe, kept: list[int], held_out: list[int], group: list[PointResult]) -> None:
        """Trains `fold` on the `kept` rows and adds to each point of `group` the `held_out` rows it gets right."""
        rows = self.task.train
        model = new_model(fold, self.task, self.accelerator, self.backbone)
        reading = (fold.training.max_length, model.template, model.chat, model.text_prompt, model.stem_layers)
        if reading not in self.stems:
            self.stems[reading] = frozen_stem_states(model, rows, fold.training)
        stem = self.stems[reading]
        fit(model, rows.select(kept), fold, self.accelerator, show_progress=False,
            stem=[stem[i] for i in kept] if stem else None, settle=False)
        if model.tied:  # each prototype weight settles the same trained label vectors anew
            weights = [result.settings.get(PROTOTYPE_WEIGHT, fold.head.prototype_weight) for result in group]
            right = right_per_prototype_weight(model, rows.select(kept), rows.select(held_out), weights)
        else:
            right = [right_rows(model, rows.select(held_out), fold)] * len(group)
        for result, positions in zip(group, right):
            result.right += [held_out[i] for i in positions]
        self.accelerator.free_memory()  # drops the prepared model before the next fold's
        self.backbone = model.release_backbone()


def select_settings(recipe: Recipe, task: TaskData, accelerator: Accelerator, show_progress: bool) -> Selection:
    """Cross-validates the grid of `training.select` on the k-shot rows (`task.train`; the test rows are
    never read): each training on folds-1 parts, scored on the part left out, every part in turn."""
    select, rows = recipe.training.select, task.train
    parts = Folds.of(task, select.folds, recipe.data.seed)
    groups = list(trainings(select.points).values())
    trials = [recipe.with_settings({**points[0], "training.select": None, "training.checkpoint_every": None})
              for points in groups]
    folds = [parts.recipes(trial, len(rows)) for trial in trials]
    steps = [fold_steps(parts, trial_folds, accelerator) for trial_folds in folds]
    cost = sum(steps) / schedule(len(rows), recipe.training, accelerator.num_processes)[0]
    if cost > select.max_cost:
        raise SelectionError(f"training.select would train {cost:.2f}x the optimizer steps of one run of this recipe "
                             f"({len(trials)} trainings x {select.folds} folds), over its max_cost {select.max_cost}: "
                             "fewer folds, grid values or epochs")
    results = [[PointResult(point, trial_steps) for point in points] for points, trial_steps in zip(groups, steps)]
    progress = tqdm(total=len(trials) * select.folds, desc=f"select {recipe.task}",
                    disable=not (show_progress and accelerator.is_main_process))
    started = time.perf_counter()
    trainer = FoldTrainer(task, accelerator)
    for trial_folds, group in zip(folds, results):
        for fold, kept, held_out in zip(trial_folds, parts.kept, parts.held_out):
            trainer.train_and_score(fold, kept, held_out, group)
            progress.update(1)
    progress.close()
    return Selection(select.folds, select.grid, len(rows), [r for group in results for r in group],
                     len(trials) * select.folds, cost, time.perf_counter() - started)


def fold_steps(parts: Folds, fold_recipes: list[Recipe], accelerator: Accelerator) -> int:
    """The optimizer steps of a trial's trainings over all its folds."""
    return sum(schedule(len(kept), fold.training, accelerator.num_processes)[0]
               for kept, fold in zip(parts.kept, fold_recipes))


def _fold_recipe(trial: Recipe, kept: int, rows: int) -> Recipe:
    """A trial as one fold trains it: a user's `training.max_steps` shrinks with the share of the rows the
    fold keeps, as a number of epochs does by itself, so each fold passes over its rows as often as the
    final run will over all of them."""
    if not trial.training.max_steps:
        return trial
    return trial.with_settings({"training.max_steps": max(1, round(trial.training.max_steps * kept / rows))})


def falls_back(selection: Selection, start: AdapterModel, rows: Split, recipe: Recipe, accelerator: Accelerator,
               fallback: str) -> bool:
    """Scores the untrained `start` on every k-shot row (the rows the folds held out, one by one) into
    `selection`; whether the run stores that start untrained (`fallback` zero_shot) instead of training."""
    selection.zero_shot_right = right_rows(start, rows, recipe)
    fall_back = selection.clearly_below_zero_shot and fallback == "zero_shot"
    if selection.below_zero_shot and accelerator.is_main_process:
        log.warning("cross-validation puts the adapter below its zero-shot start (%d against %d of %d rows, "
                    "p=%.3f)%s", selection.chosen.correct, selection.zero_shot_correct, selection.rows,
                    selection.below_zero_shot_p_value,
                    ": storing the start untrained (fallback zero_shot)" if fall_back else "")
    return fall_back


def right_rows(model: AdapterModel, rows: Split, recipe: Recipe) -> list[int]:
    """The positions of `rows` the model labels right, through the scoring path that `evaluate` uses."""
    predictions = model.scores(rows.texts, rows.text_pairs, batch_size=recipe.training.eval_batch_size).argmax(-1)
    return (predictions == torch.tensor(rows.labels)).nonzero().flatten().tolist()


def right_per_prototype_weight(model: AdapterModel, kept: Split, held_out: Split,
                               weights: list[float]) -> list[list[int]]:
    """`right_rows` on the held-out rows under each prototype weight, every row embedded once for all the
    weights: a tied head scores unit vectors by cosine, and only its rows change from weight to weight."""
    kept_vectors = model.text_vectors(kept.texts, kept.text_pairs)
    held_out_vectors = model.text_vectors(held_out.texts, held_out.text_pairs)
    labels = torch.tensor(held_out.labels)
    right = []
    for weight in weights:
        model.settle_label_vectors(kept, weight, kept_vectors)
        predictions = model.head.scores_of_unit_vectors(held_out_vectors).argmax(-1).cpu()
        right.append((predictions == labels).nonzero().flatten().tolist())
    return right


def sources_to_try(candidates: list[dict], zero_shot_accuracy: float, count: int) -> list[str]:
    """The sources worth a cross-validation: those that start above the zero-shot classifier, related
    tasks first (a source that knows every label by name: a sentiment adapter for a sentiment task), each
    group best start first, `count` of them. 32 k-shot rows rank starts too noisily to let an unrelated
    task's adapter displace a related one that also starts above zero-shot."""
    above = [c for c in candidates if c["start_accuracy"] > zero_shot_accuracy]
    ranked = sorted(above, key=lambda c: (not c["labels_matched"], -c["start_accuracy"]))  # stable: store order
    return [c["adapter"] for c in ranked[:count]]


@dataclass
class SourceChoice:
    """What `init_from: auto` found in the store: each candidate's start accuracy on the k-shot rows beside
    the zero-shot start's, and the sources the cross-validation tries beside none."""

    zero_shot_accuracy: float
    candidates: list[dict]  # {"adapter", "start_accuracy", "labels_matched"}, in the store's order
    tried: list[str]
    seconds: float

    def recipe(self, recipe: Recipe) -> Recipe:
        """`recipe` with its selection also trying the kept sources and none (none comes first: ties go to
        it); with no source kept, a fresh adapter and no added selection."""
        if not self.tried:
            return recipe.with_settings({"training.init_from": None})
        values = [None, *self.tried]
        select = recipe.training.select
        if select is None:  # one training of the recipe, in folds, per value (2 folds of half the rows each)
            select = {"folds": 2, "grid": {"training.init_from": values}, "max_cost": 1.5 * len(values)}
        else:
            select = {**select.model_dump(), "grid": {**select.grid, "training.init_from": values}}
        return recipe.with_settings({"training.init_from": None, "training.select": select})

    def record(self, chosen: str | None) -> dict:
        """The card's init_from: the source the run started from (None: a fresh adapter) and how it was found."""
        return {"mode": "auto", "source": chosen, "zero_shot_start_accuracy": round(self.zero_shot_accuracy, 4),
                "candidates": self.candidates, "tried": [None, *self.tried] if self.tried else [],
                "seconds": round(self.seconds, 3)}


def choose_source(recipe: Recipe, task: TaskData, accelerator: Accelerator, show_progress: bool) -> SourceChoice:
    """Every stored adapter that could start this recipe's (`library.candidates`) scored as a start on the
    k-shot rows; those `sources_to_try` keeps go to the cross-validation with none. Scoring a start trains
    nothing: a source whose adapted backbone only hurts this task is left out before any training."""
    started = time.perf_counter()
    fresh = recipe.with_settings({"training.init_from": None, "training.select": None})
    found = candidates(recipe, fingerprint(resolve_path(recipe.backbone)))
    model = new_model(fresh, task, accelerator)
    zero_shot = len(right_rows(model, task.train, fresh))
    backbone = model.release_backbone()
    scored = []
    for source in tqdm(found, desc=f"library {recipe.task}", disable=not (show_progress and accelerator.is_main_process)):
        trial = fresh.with_settings({"training.init_from": source.reference})
        model = new_model(trial, task, accelerator, backbone)
        right = len(right_rows(model, task.train, trial))
        backbone = model.release_backbone()
        scored.append({"adapter": source.reference, "start_accuracy": round(right / len(task.train), 4),
                       "labels_matched": label_map(task.label_names, source.card.labels) is not None})
    zero_shot_accuracy = round(zero_shot / len(task.train), 4)  # rounded as the candidates are: a tie stays one
    tried = sources_to_try(scored, zero_shot_accuracy, recipe.training.init_candidates)
    if accelerator.is_main_process:
        log.info("library: %d candidates (zero-shot start %.3f on the k-shot rows); cross-validating %s",
                 len(scored), zero_shot_accuracy, ["none", *tried] if tried else "none")
    return SourceChoice(zero_shot_accuracy, scored, tried, time.perf_counter() - started)
