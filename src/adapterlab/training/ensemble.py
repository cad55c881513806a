"""Training an ensemble (`training.ensemble: N`): N adapters on the same k-shot rows, with training seeds
seed, seed+1, ..., stored as one adapter that answers with the mean of its members' label probabilities.

Few-shot adapters vary a lot from seed to seed; the mean of several varies less. Each member is trained
exactly as `single.train_single` trains a single adapter with its seed (member 0 is that adapter), and is
stored as a complete adapter folder inside the ensemble's (`store.save_ensemble`); the engine serves the
members' rows in the same backbone passes (`mixed_batch`).
"""

import logging
import time

import torch
from accelerate import Accelerator

from adapterlab.data import TaskData
from adapterlab.errors import AdapterlabError
from adapterlab.metrics import classification_metrics
from adapterlab.model import AdapterModel, parameter_counts
from adapterlab.recipe import Recipe
from adapterlab.store import AdapterCard, save_ensemble
from adapterlab.training.builders import load_data, new_accelerator, new_model
from adapterlab.training.loop import fit
from adapterlab.training.result import TrainResult, make_card, resolved_recipe

log = logging.getLogger("adapterlab")


def member_recipes(recipe: Recipe) -> list[Recipe]:
    """Each member's recipe: the ensemble's with its own training seed, a single adapter."""
    seed, name = recipe.training.seed, recipe.adapter_name
    return [recipe.with_settings({"training.seed": seed + i, "training.ensemble": 1, "output.name": f"{name}.member{i}"})
            for i in range(recipe.training.ensemble)]


def train_ensemble(recipe: Recipe, show_progress: bool = True, resume: bool = False) -> TrainResult:
    """Train the members one after another on the same k-shot rows, score each and their mean on the
    test rows, and store them as one adapter."""
    if resume:
        raise AdapterlabError("an ensemble trains its members without checkpoints: --resume has nothing to continue")
    accelerator, task = new_accelerator(recipe.training), load_data(recipe)
    members: list[tuple[AdapterModel, AdapterCard]] = []
    test_probabilities = []
    for member_recipe in member_recipes(recipe):
        model = new_model(member_recipe, task, accelerator)
        trainable, total = parameter_counts(model)
        started = time.perf_counter()
        fit(model, task.train, member_recipe, accelerator, show_progress)
        seconds = time.perf_counter() - started
        model = accelerator.unwrap_model(model)
        metrics = {}
        if task.test is not None:
            test_probabilities.append(model.scores(task.test.texts, task.test.text_pairs,
                                                   batch_size=recipe.training.eval_batch_size))
            metrics = _metrics(test_probabilities[-1], task, recipe)
        if accelerator.is_main_process:
            log.info("member %d of %d (training seed %d): %.1fs; %s", len(members) + 1, recipe.training.ensemble,
                     member_recipe.training.seed, seconds, metrics)
        card = make_card(resolved_recipe(member_recipe, model, accelerator), task, model, trainable, total, seconds,
                         metrics)
        members.append((model, card))
        accelerator.free_memory()  # drops the prepared model and optimizer; the trained model is kept above
    metrics = _metrics(torch.stack(test_probabilities).mean(0), task, recipe) if test_probabilities else {}
    card = ensemble_card(recipe, task, members, metrics, accelerator)
    path = None
    if accelerator.is_main_process:
        path, card = save_ensemble(members, card, recipe.output.store, overwrite=recipe.output.overwrite)
    accelerator.wait_for_everyone()
    return TrainResult(path, card.trainable_params, card.trainable_params + card.backbone_params, card.adapter_bytes,
                       card.train_seconds, metrics)


def ensemble_card(recipe: Recipe, task: TaskData, members: list[tuple[AdapterModel, AdapterCard]], metrics: dict,
                  accelerator: Accelerator) -> AdapterCard:
    """The ensemble's card: its recipe as it ran, its own test metrics, the members' summed parameters and
    seconds, and one entry per member (seed, train_seconds, metrics)."""
    first_model, first = members[0]
    trainable = sum(card.trainable_params for _, card in members)
    seconds = sum(card.train_seconds for _, card in members)
    card = make_card(resolved_recipe(recipe, first_model, accelerator), task, first_model, trainable,
                     first.backbone_params + trainable, seconds, metrics)
    entries = [{"seed": member.recipe["training"]["seed"], "train_seconds": member.train_seconds,
                "metrics": member.metrics} for _, member in members]
    return card.model_copy(update={"members": entries})


def _metrics(probabilities: torch.Tensor, task: TaskData, recipe: Recipe) -> dict[str, float]:
    return classification_metrics(probabilities.argmax(-1).tolist(), task.test.labels, len(task.label_names),
                                  tuple(recipe.training.metrics))
