"""The adapter library: a new classifier starts from a stored one of the same backbone and method
(`training.init_from`). Related tasks transfer: a LoRA trained on one sentiment dataset already
separates the sentiment of another. The source lends its adapter weights, and its head rows when it
knows every label of the new task by name; otherwise the new head starts from the task's label
descriptions embedded through the source's adapted backbone. Choosing a source (`init_from: auto`)
is a selection like the others (`select.choose_source`)."""

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import set_peft_model_state_dict

from adapterlab.backbones import Backbone
from adapterlab.data import TaskData
from adapterlab.errors import AdapterlabError
from adapterlab.heads import ClassifierHead, label_embeddings
from adapterlab.model import AdapterModel
from adapterlab.prompts import text_prompt_of
from adapterlab.recipe import AUTO_SOURCE, Recipe
from adapterlab.store import AdapterCard, adapter_folders, read_adapter, read_card, resolve


class LibraryError(AdapterlabError):
    """A source adapter that cannot start this recipe's adapter."""


@dataclass
class Source:
    """A stored adapter named as a start."""

    reference: str  # as the recipe or the selection named it
    folder: Path
    card: AdapterCard


def label_key(label: str) -> str:
    """A label as names are compared: case, '_' and '-' do not count ('Not_Entailment' = 'not entailment')."""
    return " ".join(label.replace("_", " ").replace("-", " ").lower().split())


def label_map(task_labels: list[str], source_labels: list[str]) -> list[int] | None:
    """For each task label, the index of the source's label of the same name; None unless every task
    label has one (a source may know more labels than the task)."""
    index = {label_key(label): i for i, label in enumerate(source_labels)}
    mapping = [index.get(label_key(label)) for label in task_labels]
    return None if None in mapping else mapping


def find_source(recipe: Recipe) -> Source:
    """The stored adapter `training.init_from` names (TASK/NAME in output.store, or a folder), checked to
    be able to start this recipe's adapter."""
    reference = recipe.training.init_from
    if reference == AUTO_SOURCE:  # a run resolves it first (select.choose_source)
        raise LibraryError("training.init_from auto names no adapter yet: the run chooses one (adapterlab train)")
    folder = resolve(recipe.output.store, reference)
    card = read_card(folder)
    where = f"training.init_from {reference}"
    if card.kind != "classify" or card.members is not None:
        raise LibraryError(f"{where}: a classifier starts from a single classification adapter, not from "
                           f"{'an ensemble' if card.members is not None else 'a generative adapter'}")
    if card.method != recipe.method.name:
        raise LibraryError(f"{where} is a {card.method} adapter; this recipe trains {recipe.method.name} "
                           f"(set method.name: {card.method})")
    return Source(reference, folder, card)


def with_source_method(recipe: Recipe) -> Recipe:
    """The recipe with its source's method settings (rank, targets, layers...): the start has the source's
    shapes, and the card records what ran. Unchanged without a named source."""
    if recipe.training.init_from in (None, AUTO_SOURCE):
        return recipe
    method = Recipe.model_validate(find_source(recipe).card.recipe).method
    return recipe.model_copy(update={"method": method})


def start_from_source(model: AdapterModel, recipe: Recipe, task: TaskData, backbone: Backbone) -> bool:
    """Puts the named source into the fresh `model` (built with `with_source_method`'s recipe): its adapter
    tensors, read through the store's checks; its head rows when it knows every label of the task and
    its head is of the same kind, else (with head.init label_descriptions) head rows from the task's
    descriptions embedded through the source. Returns whether the head rows came from the source."""
    source = find_source(recipe)
    stored = read_adapter(source.folder, backbone)
    loaded = set_peft_model_state_dict(model.peft_model, stored.tensors)
    if loaded.unexpected_keys:
        raise LibraryError(f"training.init_from {source.reference}: tensors that do not fit this recipe's "
                           f"adapter: {', '.join(sorted(loaded.unexpected_keys)[:3])}")
    head = model.head
    if not isinstance(head, ClassifierHead):  # an LLM's label words carry no weights
        return False
    mapping = label_map(task.label_names, stored.card.labels)
    same_kind = isinstance(stored.head, ClassifierHead) and (stored.head.pooling, stored.head.cosine_scale,
                                                             stored.head.normalize) == (head.pooling, head.cosine_scale,
                                                                                        head.normalize)
    with torch.no_grad():
        if mapping is not None and same_kind:
            head.linear.weight.copy_(stored.head.linear.weight[mapping])
            head.linear.bias.copy_(stored.head.linear.bias[mapping])
            return True
        if recipe.head.init == "label_descriptions":
            was_training = model.training
            model.eval()  # no dropout in the descriptions' embeddings
            head.init_from(label_embeddings(backbone, task.label_descriptions, recipe.head.label_templates,
                                            head.pooling, text_prompt_of(recipe.head, backbone), model.peft_model))
            model.train(was_training)
    return False


def candidates(recipe: Recipe, fingerprint: str) -> list[Source]:
    """The store's adapters that could start this recipe's: single classifiers of the same backbone
    (fingerprint) and method, of other tasks (an adapter of this task may have seen its rows)."""
    found = []
    for folder in adapter_folders(recipe.output.store):
        try:
            card = read_card(folder)
        except AdapterlabError:  # a broken folder is no candidate; `adapterlab adapters verify` names it
            continue
        if (card.backbone_fingerprint == fingerprint and card.kind == "classify" and card.members is None
                and card.method == recipe.method.name and card.task != recipe.task):
            found.append(Source(f"{folder.parent.name}/{folder.name}", folder, card))
    return found


def named_source_record(recipe: Recipe, task: TaskData) -> dict | None:
    """The card's init_from for a source the recipe names (None without one)."""
    if recipe.training.init_from is None:
        return None
    source = find_source(recipe)
    return {"mode": "named", "source": source.reference,
            "labels_matched": label_map(task.label_names, source.card.labels) is not None}
