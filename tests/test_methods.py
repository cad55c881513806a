"""Every registered PEFT method on a tiny random BERT: builds, runs, trains only its own weights."""

import peft
import pytest
import torch
import transformers

from adapterlab.backbones import load_backbone
from adapterlab.methods import METHODS, method_module
from adapterlab.model import build_adapter_model, parameter_counts
from adapterlab.recipe import validate_recipe
from adapterlab.errors import AdapterlabError
from conftest import tiny_recipe


def test_pins_under_which_prefix_tuning_works_on_bert():
    # transformers 5.24 + peft 0.21.2 breaks prefix-tuning on BERT; the next test would catch it.
    assert transformers.__version__ == "5.22.2" and peft.__version__ == "0.21.2"


@pytest.mark.parametrize("name", METHODS)
def test_method_builds_runs_and_freezes_the_backbone(tiny_bert, tmp_path, name):
    recipe = validate_recipe(tiny_recipe(tiny_bert, tmp_path, method={"name": name}))
    backbone = load_backbone(tiny_bert)
    bare = sum(p.numel() for p in backbone.model.parameters())
    model = build_adapter_model(recipe, backbone, ["neg", "pos"], ["bad", "good"])
    trainable, total = parameter_counts(model)
    assert total - trainable == bare  # every backbone weight frozen, every added weight trainable
    batch = model.tokenize(["a fine day", "rain again and again"])
    logits = model(**batch)
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    logits.sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and trained == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("head.") or "lora_" in n or "prompt_encoder" in n for n in trained)


def test_lora_targets_follow_the_architecture(tiny_bert, tmp_path):
    recipe = validate_recipe(tiny_recipe(tiny_bert, tmp_path))
    model = build_adapter_model(recipe, load_backbone(tiny_bert), ["neg", "pos"], ["bad", "good"])
    adapted = {n.split(".")[-4] for n, _ in model.peft_model.named_parameters() if "lora_A" in n}
    assert adapted == {"query", "value"}


def test_head_starts_as_the_zero_shot_classifier(tiny_bert, tmp_path):
    recipe = validate_recipe(tiny_recipe(tiny_bert, tmp_path))
    model = build_adapter_model(recipe, load_backbone(tiny_bert), ["neg", "pos"], ["bad", "good"])
    from adapterlab.heads import label_embeddings
    expected = torch.nn.functional.normalize(label_embeddings(model.backbone, ["bad", "good"],
                                                              recipe.head.label_templates), dim=-1)
    assert torch.allclose(torch.nn.functional.normalize(model.head.linear.weight, dim=-1), expected, atol=1e-5)


def test_unknown_method_is_named():
    with pytest.raises(AdapterlabError, match="unknown method 'ia3'; known: lora, prefix_tuning"):
        method_module("ia3")


@pytest.mark.parametrize("method", [{"name": "lora"}, {"name": "lora", "target_modules": "all-linear"},
                                    {"name": "lora", "target_modules": ["dense"]},
                                    {"name": "prefix_tuning"}, {"name": "prefix_tuning", "projection": True}])
def test_every_trainable_parameter_reaches_the_loss(tiny_bert, tmp_path, method):
    # DDP (find_unused_parameters=False) fails at the second step on a trainable parameter without a
    # gradient: BERT's pooler, which the heads never read, must not get LoRA weights (peft issue 951).
    recipe = validate_recipe(tiny_recipe(tiny_bert, tmp_path, method=method))
    model = build_adapter_model(recipe, load_backbone(tiny_bert), ["neg", "pos"], ["bad", "good"]).train()
    model(**model.tokenize(["a fine day", "rain again and again"])).sum().backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
