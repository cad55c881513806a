"""Choosing among whole recipes (`training.select.candidates`): the recipe as written and each candidate
file, all with the recipe's task, data and output, cross-validated on the same folds of the k-shot rows,
each on its own backbone. They run cheapest first within `training.budget_seconds`. The cheapest trains
unless a costlier one beats it clearly on the held-out rows: an LLM recipe where it wins by more than a few
dozen rows' chance, a MiniLM one elsewhere."""

import logging
import time
from dataclasses import dataclass

from accelerate import Accelerator
from tqdm.auto import tqdm

from adapterlab.backbones import weight_bytes
from adapterlab.data import TaskData
from adapterlab.recipe import Recipe, candidate_recipes
from adapterlab.training.builders import frozen_backbone
from adapterlab.training.loop import schedule
from adapterlab.training.select import FALLBACK_P_VALUE, FoldTrainer, Folds, PointResult, Selection, fold_steps, sign_test

log = logging.getLogger("adapterlab")

AS_WRITTEN = "as written"  # how the card names the recipe itself among the candidates
# How sure the held-out rows must make a costlier candidate's lead over the cheapest: the bar of a fallback.
# Two folds of 32-96 rows move a path's estimate by several points, so without it the costlier path took
# near ties it then lost on the test rows (emotion by 10 points).
SWITCH_P_VALUE = FALLBACK_P_VALUE


@dataclass
class Candidate:
    """A recipe offered to the selection, and what its cross-validation found."""

    name: str  # its file, as the recipe names it, or AS_WRITTEN
    recipe: Recipe  # with the selecting recipe's task, data and output; no selection
    relative_cost: float  # backbone weight bytes × tokens its folds train on: the order, cheapest first
    selection: Selection | None = None  # None: skipped by the budget
    estimate: float | None = None  # seconds: its backbone's load plus its first fold's × folds (None: never started)
    seconds: float = 0.0  # spent on it, skipped or not

    @property
    def right(self) -> list[int]:
        """The held-out rows it got right."""
        return self.selection.chosen.right

    def record(self, p_value: float | None) -> dict:
        """Its row in the card; `p_value`: its lead over the cheapest by chance (None: the cheapest, or skipped)."""
        accuracy = self.selection.accuracy(self.selection.chosen.correct) if self.selection else None
        return {"recipe": self.name, "backbone": self.recipe.backbone, "method": self.recipe.method.name,
                "head": self.recipe.head.type, "skipped": self.selection is None,
                "cv_accuracy": None if accuracy is None else round(accuracy, 4),
                "p_value_over_cheapest": None if p_value is None else round(p_value, 4),
                "seconds": round(self.seconds, 3),
                "estimate_seconds": None if self.estimate is None else round(self.estimate, 3)}


@dataclass
class TierChoice:
    """Every candidate, cheapest first, and the one that trains."""

    candidates: list[Candidate]
    budget: float | None
    seconds: float

    @property
    def cheapest(self) -> Candidate:
        return self.candidates[0]  # it always runs

    def p_value_over_cheapest(self, candidate: Candidate) -> float | None:
        """The sign test of `candidate`'s lead over the cheapest on the held-out rows where they disagree."""
        if candidate is self.cheapest or candidate.selection is None:
            return None
        return sign_test(candidate.right, self.cheapest.right)

    @property
    def chosen(self) -> Candidate:
        """The cheapest, unless costlier ones beat it clearly (p-value under SWITCH_P_VALUE): then the best
        held-out accuracy among those (ties: the cheaper)."""
        clear = [c for c in self.candidates[1:]
                 if c.selection and self.p_value_over_cheapest(c) < SWITCH_P_VALUE]
        return max(clear, key=lambda c: c.selection.chosen.correct) if clear else self.cheapest

    def record(self, fell_back: bool, train_seconds: float) -> dict:
        """The card's selection: the chosen candidate's estimate beside its zero-shot start (its fallback), and
        every candidate's estimate, seconds and whether the budget skipped it."""
        chosen = self.chosen.selection.record(fell_back, train_seconds)
        return {**{key: value for key, value in chosen.items() if key not in ("grid", "points", "steps_ratio")},
                "chosen": self.chosen.name, "candidates": [c.record(self.p_value_over_cheapest(c)) for c in self.candidates],
                "budget_seconds": self.budget, "seconds": round(self.seconds, 3),
                "trainings": sum(c.selection.trainings for c in self.candidates if c.selection),
                "time_ratio": None if fell_back else round(self.seconds / train_seconds, 3)}


def choose_candidate(recipe: Recipe, task: TaskData, accelerator: Accelerator, show_progress: bool) -> TierChoice:
    """Cross-validates the recipe as written and its candidates, cheapest first, on the same folds of the
    k-shot rows (the test rows are never read). The cheapest always runs; with a budget, a later one is
    skipped when its estimate would take the selection past it, or when the budget is spent."""
    select, budget = recipe.training.select, recipe.training.budget_seconds
    parts = Folds.of(task, select.folds, recipe.data.seed)
    offered = [(AS_WRITTEN, recipe.with_settings({"training.select": None, "training.budget_seconds": None})),
               *zip(select.candidates, candidate_recipes(recipe))]
    candidates = sorted((Candidate(name, offer, relative_cost(offer, parts, task, accelerator))
                         for name, offer in offered), key=lambda candidate: candidate.relative_cost)
    progress = tqdm(total=len(candidates) * select.folds, desc=f"candidates {recipe.task}",
                    disable=not (show_progress and accelerator.is_main_process))
    started = time.perf_counter()
    for index, candidate in enumerate(candidates):
        left = None if index == 0 or budget is None else budget - (time.perf_counter() - started)
        if left is not None and left <= 0:
            log.info("candidate %s skipped: the budget of %.0f s is spent", candidate.name, budget)
            continue
        cross_validate(candidate, parts, task, accelerator, left, progress)
    progress.close()
    choice = TierChoice(candidates, budget, time.perf_counter() - started)
    if accelerator.is_main_process:
        log.info("candidates: %s; chose %s", ", ".join(_summary(c) for c in candidates), choice.chosen.name)
    return choice


def cross_validate(candidate: Candidate, parts: Folds, task: TaskData, accelerator: Accelerator,
                   budget_left: float | None, progress: tqdm) -> None:
    """The candidate's folds on its own backbone, loaded once, into `candidate`; after the first fold it
    stops, skipped, if its estimate is over `budget_left` seconds."""
    started = time.perf_counter()
    trial = candidate.recipe.with_settings({"training.checkpoint_every": None})
    folds = parts.recipes(trial, len(task.train))
    point = PointResult({}, fold_steps(parts, folds, accelerator))
    trainer = FoldTrainer(task, accelerator, frozen_backbone(trial, accelerator))
    loaded = time.perf_counter() - started
    for index, (fold, kept, held_out) in enumerate(zip(folds, parts.kept, parts.held_out)):
        trainer.train_and_score(fold, kept, held_out, [point])
        progress.update(1)
        if index == 0:
            candidate.estimate = estimate_seconds(loaded, time.perf_counter() - started - loaded, len(folds))
            if budget_left is not None and candidate.estimate > budget_left:
                candidate.seconds = time.perf_counter() - started
                log.info("candidate %s skipped: it would take about %.0f s, %.0f s of the budget are left",
                         candidate.name, candidate.estimate, budget_left)
                return
    candidate.seconds = time.perf_counter() - started
    cost = point.steps / schedule(len(task.train), trial.training, accelerator.num_processes)[0]
    candidate.selection = Selection(len(folds), {}, len(task.train), [point], len(folds), cost, candidate.seconds)


def estimate_seconds(load: float, first_fold: float, folds: int) -> float:
    """A candidate's whole cross-validation, from its backbone's load and its first fold."""
    return load + first_fold * folds


def relative_cost(recipe: Recipe, parts: Folds, task: TaskData, accelerator: Accelerator) -> float:
    """What orders the candidates before any runs: the backbone's weight bytes times the tokens its folds
    train on (optimizer steps × rows a step × tokens a row)."""
    training = recipe.training
    steps = fold_steps(parts, parts.recipes(recipe, len(task.train)), accelerator)
    return weight_bytes(recipe.backbone) * steps * training.batch_size * training.grad_accum * training.max_length


def _summary(candidate: Candidate) -> str:
    if candidate.selection is None:
        return f"{candidate.name} skipped"
    selection = candidate.selection
    return f"{candidate.name} {selection.accuracy(selection.chosen.correct):.3f} in {candidate.seconds:.1f} s"
