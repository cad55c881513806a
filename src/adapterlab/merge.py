"""Merging one adapter into its backbone (a standalone model), and combining several LoRA adapters
into a new one with peft's `add_weighted_adapter` (linear, ties, dare_linear, dare_ties, svd, ...)."""

import json
import shutil
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner
from safetensors.torch import load_file, save_file

from adapterlab.backbones import load_backbone
from adapterlab.engine import Engine
from adapterlab.heads import build_head
from adapterlab.model import AdapterModel
from adapterlab.names import check_name
from adapterlab.recipe import Recipe
from adapterlab.store import AdapterCard, StoreError, load_adapter, read_adapter, read_card, resolve, save_adapter

EQUAL_RANKS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def merge_adapter(store: str | Path, reference: str, output: str | Path) -> Path:
    """Fold the adapter into the backbone's weights and write a standalone model folder (HF files,
    head.safetensors, card.json); `load_merged` reads it back."""
    output = Path(output)
    if output.exists():
        raise StoreError(f"{output} exists; merged models are written to a new folder")
    folder = resolve(store, reference)
    card = read_card(folder)
    model, card = load_adapter(folder, load_backbone(card.backbone))
    if not isinstance(model.peft_model.base_model, BaseTuner):
        raise StoreError(f"adapter {card.task}/{card.name} ({card.method}) adds no weight updates and cannot be "
                         "merged; serve it through the engine instead")
    merged = model.peft_model.merge_and_unload()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.saving-"))
    try:
        merged.save_pretrained(staging)
        model.backbone.tokenizer.save_pretrained(staging)
        save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, staging / "head.safetensors")
        merged_card = card.model_copy(update={"merged_from": f"{card.task}/{card.name}"})
        (staging / "card.json").write_text(merged_card.model_dump_json(indent=2))
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def load_merged(path: str | Path) -> AdapterModel:
    """A merged model folder as a classifier: the folder is the backbone, the head comes with it."""
    path = Path(path)
    card = read_card(path)
    recipe = Recipe.model_validate(card.recipe)
    backbone = load_backbone(str(path))
    head = build_head(recipe.head.model_copy(update={"init": "random"}), backbone, card.labels, card.labels)
    head.load_state_dict(load_file(path / "head.safetensors"))
    model = AdapterModel(backbone, backbone.model, head, card.labels, recipe.head, recipe.training.inference_max_length)
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
    ensembles = [f"{card.task}/{card.name}" for card in cards if card.members is not None]
    if ensembles:
        raise StoreError(f"{', '.join(ensembles)}: an ensemble cannot be combined (it holds several adapters); "
                         "combine its members (members/<i> folders) instead")
    configs = [json.loads((folder / "adapter_config.json").read_text()) for folder in folders]
    _check_combinable(cards, configs, weights, combination)
    backbone = load_backbone(cards[0].backbone)
    for folder in folders:  # checked as the engine checks them, before peft reads them
        read_adapter(folder, backbone)
    peft_model = PeftModel.from_pretrained(backbone.model, str(folders[0]), adapter_name="parent0")
    if not isinstance(peft_model.base_model, BaseTuner) or not hasattr(peft_model.base_model, "add_weighted_adapter"):
        raise StoreError(f"{cards[0].method} adapters cannot be combined (only LoRA-style weight updates can)")
    for i, folder in enumerate(folders[1:], 1):
        peft_model.load_adapter(str(folder), adapter_name=f"parent{i}")
    parents = [f"parent{i}" for i in range(len(folders))]
    options = {"density": density} if density is not None else {}
    peft_model.base_model.add_weighted_adapter(parents, weights, "default", combination_type=combination, **options)
    peft_model.set_adapter("default")
    for parent in parents:
        peft_model.delete_adapter(parent)

    head = _combined_head(folders, weights)
    recipe = Recipe.model_validate(cards[0].recipe)
    combined = peft_model.peft_config["default"]
    recipe = recipe.model_copy(update={"task": task or cards[0].task, "method": recipe.method.model_copy(
        update={"r": combined.r, "alpha": combined.lora_alpha})})
    model = AdapterModel(backbone, peft_model, build_head(recipe.head.model_copy(update={"init": "random"}),
                                                          backbone, cards[0].labels, cards[0].labels),
                         cards[0].labels, recipe.head, recipe.training.inference_max_length)
    model.head.load_state_dict(head)
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


def _check_combinable(cards, configs, weights, combination) -> None:
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
    if len({config.get("peft_type") for config in configs}) > 1:
        raise StoreError("adapters of different methods cannot be combined: "
                         + ", ".join(f"{c.task}/{c.name}: {c.method}" for c in cards))
    ranks = {config.get("r") for config in configs}
    if combination in EQUAL_RANKS and len(ranks) > 1:
        raise StoreError(f"combination {combination!r} needs equal LoRA ranks, got "
                         + ", ".join(f"{c.task}/{c.name}: r={config.get('r')}" for c, config in zip(cards, configs))
                         + "; use 'svd' or 'cat'")


def _combined_head(folders: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """The parents' heads, averaged with the combination weights (same labels, same shapes)."""
    heads = [load_file(folder / "head.safetensors") for folder in folders]
    total = sum(weights)
    return {key: sum(w * head[key] for w, head in zip(weights, heads)) / total for key in heads[0]}


def _report(store, combined: Path, folders: list[Path], cards: list[AdapterCard], rows: int | None) -> dict:
    """Each parent task's test accuracy with its own adapter and with the combination, in full precision
    (the reference: `auto` serves in bf16 on some CPUs, and a near tie may turn there)."""
    engine = Engine(cards[0].backbone, store, dtype="float32")
    parents = []
    for folder, card in zip(folders, cards):
        data = card.recipe["data"]["path"]
        before = engine.evaluate(str(folder), data, limit=rows)["accuracy"]
        after = engine.evaluate(str(combined), data, limit=rows)["accuracy"]
        parents.append({"adapter": f"{card.task}/{card.name}", "data": data, "accuracy_before": before,
                        "accuracy_after": after})
    return {"combined": str(combined), "parents": parents}
