"""Training skips an encoder's frozen lower layers: their states for a row are computed once."""

import torch

from adapterlab.backbones import load_backbone
from adapterlab.data import load_task
from adapterlab.model import build_adapter_model
from adapterlab.recipe import TrainingConfig, validate_recipe
from adapterlab.train import _batch, _stem_states
from conftest import tiny_recipe


def adapter_model(tiny_bert, tmp_path, method):
    recipe = validate_recipe(tiny_recipe(tiny_bert, tmp_path, method=method))
    task = load_task(recipe.data)
    return build_adapter_model(recipe, load_backbone(tiny_bert), task.label_names, task.label_descriptions), task


def test_lora_on_top_layers_starts_from_cached_states(tiny_bert, tmp_path):
    model, task = adapter_model(tiny_bert, tmp_path, {"name": "lora", "r": 4, "layers": [1]})
    assert model.stem_layers == 1
    with torch.no_grad():  # make the adapter do something, so that equal outputs mean something
        for name, p in model.peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    stem = _stem_states(model, task.train, TrainingConfig(eval_batch_size=3))
    indices = [5, 0, 3, 7]  # rows of different lengths, in a batch of their own
    batch = _batch(model, task.train, indices, stem, max_length=128)
    batch.pop("labels")
    model.eval()  # the stem runs without dropout: compare without dropout anywhere
    from_stem = model(**batch)
    batch.pop("stem_states")
    full = model(**batch)
    assert torch.allclose(from_stem, full, atol=1e-5)
    from_stem.sum().backward()
    stem_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    full.sum().backward()
    full_grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(stem_grads, full_grads))


def test_no_stem_when_every_layer_or_the_prefix_trains(tiny_bert, tmp_path):
    assert adapter_model(tiny_bert, tmp_path, {"name": "lora", "r": 4})[0].stem_layers == 0
    assert adapter_model(tiny_bert, tmp_path, {"name": "prefix_tuning", "num_virtual_tokens": 4})[0].stem_layers == 0
