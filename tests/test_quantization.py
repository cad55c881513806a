"""8-bit and 4-bit MiniLM backbones (bitsandbytes on the CPU): LoRA learns on them (it beats the
zero-shot classifier it started from, on the quantized backbone), and the adapter serves on the
full-precision backbone (same fingerprint) within 10 points."""

import pytest

from adapterlab.backbones import load_backbone
from adapterlab.data import load_task
from adapterlab.engine import Engine
from adapterlab.recipe import QuantizationConfig, load_recipe
from adapterlab.store import read_card
from adapterlab.training import train
from conftest import ROOT, assert_beats_its_start, shared

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_lora_on_a_quantized_backbone_serves_in_full_precision(mode, tmp_path):
    quantized = load_backbone("minilm", QuantizationConfig(mode=mode))
    full = load_backbone("minilm")
    layer = quantized.model.encoder.layer[0].attention.self.query
    assert type(layer).__name__ == {"8bit": "Linear8bitLt", "4bit": "Linear4bit"}[mode]
    assert quantized.model.get_memory_footprint() < 0.75 * full.model.get_memory_footprint()
    assert quantized.fingerprint == full.fingerprint

    recipe = load_recipe(ROOT / "recipes/sst2-lora-minilm.yaml", [
        f"quantization.mode={mode}", f"data.path={shared('agnews')}", "data.k=8", "data.test_limit=200",
        f"output.store={tmp_path}"])
    result = train(recipe, show_progress=False)
    assert read_card(result.adapter_path).recipe["quantization"]["mode"] == mode
    assert_beats_its_start(Engine(quantized, tmp_path), str(result.adapter_path), load_task(recipe.data).test)
    served = Engine(full, tmp_path).evaluate(str(result.adapter_path), shared("agnews"), limit=200)  # full precision
    assert abs(served["accuracy"] - result.metrics["accuracy"]) <= 0.1


def test_a_generative_adapter_learns_on_an_8bit_llm(tiny_llama, tmp_path):
    """head.type generate on an 8-bit decoder: the completion loss on its training rows falls below
    where it started (the bare backbone), read back through the store on the 8-bit backbone. (A random
    2-layer model's frozen output layer keeps the loss near ln(vocabulary): 10.8 falls to about 10.5.)"""
    import torch

    from adapterlab.loading import load_adapter
    from adapterlab.recipe import validate_recipe
    from adapterlab.training.builders import setup
    from conftest import tiny_recipe

    recipe = validate_recipe(tiny_recipe(tiny_llama, tmp_path, task="e2e", quantization={"mode": "8bit"}, head={
        "type": "generate", "template": "Describe: {text}", "max_new_tokens": 4},
        data={"path": shared("e2e"), "text_field": "mr", "target_field": "ref", "k": 4, "test_limit": 1},
        training={"max_steps": 30, "batch_size": 4, "lr": 0.05, "mixed_precision": "no"}))
    _, task, start = setup(recipe)
    assert type(start.backbone.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear8bitLt"
    rows = list(range(len(task.train)))
    with torch.no_grad():
        before = start(**start.batch(task.train, rows, 128)).item()
    result = train(recipe, show_progress=False)
    trained, card = load_adapter(result.adapter_path, load_backbone(tiny_llama, QuantizationConfig(mode="8bit")))
    with torch.no_grad():
        after = trained(**trained.batch(task.train, rows, 128)).item()
    assert card.kind == "generate" and after < before - 0.15, (before, after)
