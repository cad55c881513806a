"""One few-shot classifier: setup → fit → evaluate → save. With `training.select`, a cross-validation on
the k-shot rows chooses the recipe's settings (select.py) or among whole recipes (tiers.py) first, and
may keep the adapter at its untrained start (the fallback)."""

import time
from dataclasses import dataclass

from accelerate import Accelerator

from adapterlab.data import TaskData
from adapterlab.model import AdapterModel
from adapterlab.recipe import AUTO_SOURCE, Recipe
from adapterlab.training.builders import load_data, logged_parameter_counts, new_accelerator, new_model
from adapterlab.training.library import named_source_record
from adapterlab.training.loop import fit
from adapterlab.training.result import TrainResult, save_run
from adapterlab.training.select import Selection, choose_source, chosen_settings, falls_back
from adapterlab.training.tiers import TierChoice, choose_candidate


@dataclass
class KShotStart:
    """A k-shot run before it trains: its recipe (with the chosen settings, or the chosen candidate), the
    fresh adapter, and the selection that chose them (None without `training.select`)."""

    recipe: Recipe
    accelerator: Accelerator
    task: TaskData
    model: AdapterModel
    counts: tuple[int, int]  # (trainable, total) parameters
    selection: Selection | TierChoice | None  # a grid's or the candidates': each records itself for the card
    fell_back: bool  # the selection keeps the adapter untrained, at its zero-shot start
    library: dict | None  # the card's init_from: the stored adapter it starts from, and how it was chosen

    def finish(self, model: AdapterModel, train_seconds: float, self_training: dict | None = None) -> TrainResult:
        """Stores the trained `model` with the card's records of the selection and of its start."""
        selection = self.selection.record(self.fell_back, train_seconds) if self.selection else None
        return save_run(model, self.recipe, self.task, self.accelerator, self.counts, train_seconds, selection,
                        self_training, self.library)


def start_k_shot(recipe: Recipe, show_progress: bool, resume: bool) -> KShotStart:
    """The Accelerator, the k-shot rows, the stored adapter to start from (`training.init_from: auto` adds
    it to the selection's grid), the settings or the candidate `training.select` chooses, and the fresh adapter."""
    accelerator, task = new_accelerator(recipe.training), load_data(recipe)
    choice = choose_source(recipe, task, accelerator, show_progress) if recipe.training.init_from == AUTO_SOURCE else None
    if choice:
        recipe = choice.recipe(recipe)
    select, tiers, selection = recipe.training.select, None, None
    if select and select.candidates:
        tiers = choose_candidate(recipe, task, accelerator, show_progress)
        recipe, selection = tiers.chosen.recipe, tiers.chosen.selection
    elif select:
        selection = chosen_settings(recipe, task, accelerator, show_progress, resume)
        recipe = recipe.with_settings(selection.chosen.settings)
    model = new_model(recipe, task, accelerator)
    counts = logged_parameter_counts(model, accelerator)
    fell_back = falls_back(selection, model, task.train, recipe, accelerator, select.fallback) if select else False
    library = choice.record(recipe.training.init_from) if choice else named_source_record(recipe, task)
    return KShotStart(recipe, accelerator, task, model, counts, tiers or selection, fell_back, library)


def train_single(recipe: Recipe, show_progress: bool = True, resume: bool = False) -> TrainResult:
    """Train the recipe's adapter on its k-shot rows (unless the selection fell back), score and store it."""
    start = start_k_shot(recipe, show_progress, resume)
    started = time.perf_counter()
    if not start.fell_back:  # fallen back, the adapter stays at its start: it answers as its zero-shot classifier
        fit(start.model, start.task.train, start.recipe, start.accelerator, show_progress, resume)
    return start.finish(start.model, time.perf_counter() - started)
