"""A generation recipe's run (`head.type: generate`): few-shot supervised fine-tuning of an LLM's adapter
on the k (input, completion) pairs, scored by its greedy completions on the test pairs, then stored."""

import time

from adapterlab.recipe import Recipe
from adapterlab.training.builders import load_data, logged_parameter_counts, new_accelerator, new_model
from adapterlab.training.loop import fit
from adapterlab.training.result import TrainResult, save_run


def train_generation(recipe: Recipe, show_progress: bool = True, resume: bool = False) -> TrainResult:
    accelerator, task = new_accelerator(recipe.training), load_data(recipe)
    model = new_model(recipe, task, accelerator)
    counts = logged_parameter_counts(model, accelerator)
    started = time.perf_counter()
    fit(model, task.train, recipe, accelerator, show_progress, resume)
    return save_run(model, recipe, task, accelerator, counts, time.perf_counter() - started)
