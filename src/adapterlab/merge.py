"""Merging one adapter into its backbone (a standalone model; an encoder's is also a sentence-transformers
folder), and combining several LoRA adapters into a new one with peft's `add_weighted_adapter` (linear,
ties, dare_linear, dare_ties, svd, ...)."""

from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTuner

from adapterlab.backbones import Backbone, load_backbone
from adapterlab.backbones.sentence_folders import SENTENCE_POOLING, SentenceSettings
from adapterlab.engine import Engine
from adapterlab.generative import GenerativeModel
from adapterlab.heads import ClassifierHead, build_head
from adapterlab.loading import add_stored, load_adapter, peft_model_of
from adapterlab.model import AdapterModel
from adapterlab.names import check_name
from adapterlab.store import (AdapterCard, StoredAdapter, StoreError, read_adapter, read_card, read_merged, resolve,
                              save_adapter, save_merged)

EQUAL_RANKS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def merge_adapter(store: str | Path, reference: str, output: str | Path, base_model: str | None = None) -> Path:
    """Fold the adapter into the backbone's weights and write a standalone model folder (`write_merged`);
    `load_merged` reads it back."""
    if Path(output).exists():
        raise StoreError(f"{output} exists; merged models are written to a new folder")
    folder = resolve(store, reference)
    return write_merged(folder, load_backbone(read_card(folder).backbone), output, base_model)


def write_merged(folder: Path, backbone: Backbone, output: str | Path, base_model: str | None = None) -> Path:
    """The adapter in `folder` folded into `backbone`'s weights, in the new folder `output`: HF files,
    head.safetensors, card.json and a model card naming `base_model` (default: the backbone's); for an
    encoder's classifier also the files that make sentence-transformers embed texts as its head pools them."""
    model, card = load_adapter(folder, backbone)
    if not isinstance(model.peft_model.base_model, BaseTuner):
        raise StoreError(f"adapter {card.task}/{card.name} ({card.method}) adds no weight updates and cannot be "
                         "merged; serve it through the engine instead")
    merged_card = card.model_copy(update={"merged_from": f"{card.task}/{card.name}"})
    return save_merged(model.peft_model.merge_and_unload(), backbone.tokenizer, model.head, merged_card, output,
                       base_model or backbone.base_model, sentence_settings(model),
                       min(model.prompt.max_length, backbone.max_tokens))


def sentence_settings(model: AdapterModel | GenerativeModel) -> SentenceSettings | None:
    """What a sentence-transformers folder of the merged model must do for an encoder's classifier head
    to read its embeddings: pool as the head pools, give unit vectors where the head reads them (a
    cosine classifier, or one on normalised states), put the head's text prompt first. None for others."""
    head = model.head
    if model.backbone.kind != "encoder" or not isinstance(head, ClassifierHead):
        return None
    return SentenceSettings(SENTENCE_POOLING[head.pooling], head.normalize or head.cosine_scale is not None,
                            model.prompt.text_prompt)


def load_merged(path: str | Path) -> AdapterModel:
    """A merged model folder as a classifier: the folder is the backbone, the head comes with it."""
    backbone, stored = read_merged(path)
    recipe = stored.recipe
    model = AdapterModel(backbone, backbone.model, stored.head, stored.card.labels, recipe.head,
                         recipe.training.inference_max_length, label_descriptions=stored.card.label_descriptions)
    return model.eval()


def combine_adapters(store: str | Path, references: list[str], weights: list[float], combination: str,
                     name: str, task: str | None = None, density: float | None = None,
                     report_rows: int | None = 200) -> tuple[Path, dict]:
    """A new adapter from weighted parents, with a report of each parent task's accuracy before and
    after. Refused when it cannot be right: other backbones, other label sets, unequal ranks."""
    check_name(name, "adapter name")
    if task is not None:
        check_name(task, "task")
    folders = [resolve(store, reference) for reference in references]
    cards = [read_card(folder) for folder in folders]
    _check_combinable(cards, weights)  # before the backbone loads
    backbone = load_backbone(cards[0].backbone)
    parents = [read_adapter(folder, backbone) for folder in folders]
    _check_ranks(parents, combination)
    peft_model = peft_model_of(parents[0], backbone, "parent0")
    if not isinstance(peft_model.base_model, BaseTuner) or not hasattr(peft_model.base_model, "add_weighted_adapter"):
        raise StoreError(f"{cards[0].method} adapters cannot be combined (only LoRA-style weight updates can)")
    for i, parent in enumerate(parents[1:], 1):
        add_stored(peft_model, parent, f"parent{i}")
    names = [f"parent{i}" for i in range(len(parents))]
    options = {"density": density} if density is not None else {}
    peft_model.base_model.add_weighted_adapter(names, weights, "default", combination_type=combination, **options)
    peft_model.set_adapter("default")
    for parent in names:
        peft_model.delete_adapter(parent)

    combined = peft_model.peft_config["default"]
    recipe = parents[0].recipe.model_copy(update={"task": task or cards[0].task, "method": parents[0].recipe.method
                                                  .model_copy(update={"r": combined.r, "alpha": combined.lora_alpha})})
    head = build_head(recipe.head, backbone, cards[0].labels, cards[0].labels, _combined_head(parents, weights))
    model = AdapterModel(backbone, peft_model, head, cards[0].labels, recipe.head, recipe.training.inference_max_length,
                         label_descriptions=cards[0].label_descriptions)
    trainable = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    card = AdapterCard(
        task=recipe.task, name=name, labels=cards[0].labels, label_descriptions=cards[0].label_descriptions,
        backbone=cards[0].backbone, backbone_fingerprint=cards[0].backbone_fingerprint, method=cards[0].method,
        k=None, seed=cards[0].seed, recipe=recipe.model_dump(mode="json"), trainable_params=trainable,
        backbone_params=cards[0].backbone_params,
        parents=[{"adapter": f"{c.task}/{c.name}", "weight": w} for c, w in zip(cards, weights)],
        combination={"type": combination, "density": density})
    path, card = save_adapter(model, card, store)
    return path, _report(store, path, folders, cards, report_rows)


def _check_combinable(cards: list[AdapterCard], weights: list[float]) -> None:
    ensembles = [f"{card.task}/{card.name}" for card in cards if card.members is not None]
    if ensembles:
        raise StoreError(f"{', '.join(ensembles)}: an ensemble cannot be combined (it holds several adapters); "
                         "combine its members (members/<i> folders) instead")
    if len(cards) < 2:
        raise StoreError("combining needs at least two adapters")
    if len(weights) != len(cards):
        raise StoreError(f"{len(cards)} adapters but {len(weights)} weights")
    if len({c.backbone_fingerprint for c in cards}) > 1:
        raise StoreError("adapters trained on different backbones cannot be combined: "
                         + ", ".join(f"{c.task}/{c.name} on {c.backbone}" for c in cards))
    if len({tuple(c.labels) for c in cards}) > 1:
        raise StoreError("adapters with different label sets cannot share one head: "
                         + "; ".join(f"{c.task}/{c.name}: {', '.join(c.labels)}" for c in cards))
    if len({c.method for c in cards}) > 1:
        raise StoreError("adapters of different methods cannot be combined: "
                         + ", ".join(f"{c.task}/{c.name}: {c.method}" for c in cards))


def _check_ranks(parents: list[StoredAdapter], combination: str) -> None:
    ranks = {parent.adapter_config.get("r") for parent in parents}
    if combination in EQUAL_RANKS and len(ranks) > 1:
        raise StoreError(f"combination {combination!r} needs equal LoRA ranks, got "
                         + ", ".join(f"{p.card.task}/{p.card.name}: r={p.adapter_config.get('r')}" for p in parents)
                         + "; use 'svd' or 'cat'")


def _combined_head(parents: list[StoredAdapter], weights: list[float]) -> dict[str, torch.Tensor]:
    """The parents' heads, averaged with the combination weights (same labels, same shapes)."""
    heads = [parent.head.state_dict() for parent in parents]
    total = sum(weights)
    return {key: sum(w * head[key] for w, head in zip(weights, heads)) / total for key in heads[0]}


def _report(store, combined: Path, folders: list[Path], cards: list[AdapterCard], rows: int | None) -> dict:
    """Each parent task's test accuracy with its own adapter and with the combination, side by side
    (`Engine.for_comparison`)."""
    engine = Engine.for_comparison(cards[0].backbone, store)
    parents = []
    for folder, card in zip(folders, cards):
        data = card.recipe["data"]["path"]
        before = engine.evaluate(str(folder), data, limit=rows)["accuracy"]
        after = engine.evaluate(str(combined), data, limit=rows)["accuracy"]
        parents.append({"adapter": f"{card.task}/{card.name}", "data": data, "accuracy_before": before,
                        "accuracy_after": after})
    return {"combined": str(combined), "parents": parents}
