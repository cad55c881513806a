"""What a training run ends with: the test metrics, the adapter's card (the recipe as it ran), the adapter
in the store, and the `TrainResult` it reports. Only the main process writes."""

from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator

from adapterlab.data import TaskData
from adapterlab.generative import GenerativeModel
from adapterlab.heads import pooling_of
from adapterlab.prompts import text_prompt_of
from adapterlab.model import AdapterModel
from adapterlab.recipe import Recipe
from adapterlab.store import AdapterCard, save_adapter
from adapterlab.training.checkpoint import checkpoint_folder, remove_checkpoint
from adapterlab.training.library import with_source_method
from adapterlab.training.loop import evaluate, ties_labels


@dataclass
class TrainResult:
    adapter_path: Path | None  # None on processes other than the main one
    trainable_params: int
    total_params: int
    adapter_bytes: int
    train_seconds: float
    metrics: dict[str, float]

    def as_dict(self) -> dict:
        return {"adapter_path": str(self.adapter_path) if self.adapter_path else None,
                "trainable_params": self.trainable_params, "total_params": self.total_params,
                "adapter_bytes": self.adapter_bytes, "train_seconds": round(self.train_seconds, 3),
                "metrics": self.metrics}


def save_run(model: AdapterModel | GenerativeModel, recipe: Recipe, task: TaskData, accelerator: Accelerator,
             counts: tuple[int, int], train_seconds: float, selection: dict | None = None,
             self_training: dict | None = None, init_from: dict | None = None) -> TrainResult:
    """Scores the trained `model` on the test rows and stores it with its card; the run's checkpoint goes.
    `counts`: (trainable, total) parameters; `selection`, `self_training`, `init_from`: the card's records."""
    trainable, total = counts
    model = accelerator.unwrap_model(model)
    metrics = evaluate(model, task.test, recipe) if task.test is not None else {}
    path, size = None, 0
    if accelerator.is_main_process:
        card = make_card(resolved_recipe(recipe, model, accelerator), task, model, trainable, total, train_seconds,
                         metrics, selection, self_training, init_from)
        path, card = save_adapter(model, card, recipe.output.store, overwrite=recipe.output.overwrite)
        size = card.adapter_bytes
        remove_checkpoint(checkpoint_folder(recipe))  # the run is complete: nothing left to resume
    accelerator.wait_for_everyone()
    return TrainResult(path, trainable, total, size, train_seconds, metrics)


def make_card(recipe: Recipe, task: TaskData, model: AdapterModel | GenerativeModel, trainable: int, total: int,
              train_seconds: float, metrics: dict[str, float], selection: dict | None = None,
              self_training: dict | None = None, init_from: dict | None = None) -> AdapterCard:
    return AdapterCard(
        task=recipe.task, name=recipe.adapter_name, kind="generate" if recipe.generates else "classify",
        labels=task.label_names,
        label_descriptions=task.label_descriptions, backbone=recipe.backbone,
        backbone_fingerprint=model.backbone.fingerprint, method=recipe.method.name, k=recipe.data.k,
        seed=recipe.data.seed, recipe=recipe.model_dump(mode="json"), settings_digest=recipe.settings_digest,
        metrics=metrics,
        trainable_params=trainable, backbone_params=total - trainable,
        train_seconds=round(train_seconds, 3), selection=selection, self_training=self_training, init_from=init_from)


def resolved_recipe(recipe: Recipe, model: AdapterModel | GenerativeModel, accelerator: Accelerator) -> Recipe:
    """The recipe as it ran: settings left to the backbone (the chat template, a sentence-transformers
    folder's pooling, normalisation and prompt), the task (tie_labels auto, the LLM prompt written from
    the labels) or the hardware and launcher
    (mixed precision) written out, and a source adapter's method settings (`training.init_from`)."""
    recipe = with_source_method(recipe)
    backbone = model.backbone
    head = recipe.head.model_copy(update={
        "chat": model.chat, "template": model.template, "tie_labels": ties_labels(model), "pooling": pooling_of(recipe.head, backbone),
        "text_prompt": text_prompt_of(recipe.head, backbone), "normalize": getattr(model.head, "normalize", None)})
    training = recipe.training.model_copy(update={"mixed_precision": str(accelerator.mixed_precision)})
    return recipe.model_copy(update={"head": head, "training": training})
