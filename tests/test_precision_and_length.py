"""Two training settings that must not leak into serving: mixed precision (autocast while training,
full precision after) and the training length of inputs (serving reads `eval_max_length` tokens)."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from adapterlab import precision
from adapterlab.engine import Engine
from adapterlab.model import parameter_counts
from adapterlab.precision import cpu_capability, mixed_precision_for, resolve_dtype
from adapterlab.recipe import apply_override, validate_recipe
from adapterlab.store import read_card, save_adapter
from adapterlab.training import train
from adapterlab.training.builders import setup
from adapterlab.training.loop import fit
from adapterlab.training.result import make_card
from conftest import tiny_recipe

LONG = "a long and winding review that goes on about the plot, the actors, the music and the ending " * 5


def record_inputs(model) -> list[tuple[torch.dtype, int]]:
    """(dtype, tokens) of every output of the backbone's first attention query layer, from now on."""
    seen = []
    query = next(m for n, m in model.peft_model.named_modules()
                 if n.endswith("layer.0.attention.self.query.base_layer"))
    query.register_forward_hook(lambda module, args, output: seen.append((output.dtype, output.shape[1])))
    return seen


def test_bf16_autocasts_training_only_and_is_written_in_the_card(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    recipe = validate_recipe(tiny_recipe(tiny_bert, tmp_path, training={"mixed_precision": "bf16"}))
    accelerator, task, model = setup(recipe)
    seen = record_inputs(model)
    fit(model, task.train, recipe, accelerator, show_progress=False)
    assert seen and all(dtype == torch.bfloat16 for dtype, _ in seen)
    seen.clear()
    model.scores(task.test.texts[:4])
    assert seen and all(dtype == torch.float32 for dtype, _ in seen)
    assert all(p.dtype == torch.float32 for p in model.parameters())

    # Accelerate fixes its state per process: a later run in the same process gets its own setting.
    bf16 = train(recipe, show_progress=False)
    default = train(recipe.model_copy(update={"training": recipe.training.model_copy(update={"mixed_precision": None}),
                                              "output": recipe.output.model_copy(update={"name": "plain"})}),
                    show_progress=False)
    assert read_card(bf16.adapter_path).recipe["training"]["mixed_precision"] == "bf16"
    assert read_card(default.adapter_path).recipe["training"]["mixed_precision"] == "no"


def test_auto_precision_follows_the_hardware_and_is_written_in_the_card(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    recipe = validate_recipe(tiny_recipe(tiny_bert, tmp_path))
    assert recipe.training.mixed_precision == "auto"  # the default
    expected = mixed_precision_for(torch.device("cpu"))
    assert expected == ("bf16" if cpu_capability()["fast_bf16"] else "no")
    accelerator, task, model = setup(recipe)
    seen = record_inputs(model)
    fit(model, task.train, recipe, accelerator, show_progress=False)
    assert seen and all(dtype == {"bf16": torch.bfloat16, "no": torch.float32}[expected] for dtype, _ in seen)
    result = train(recipe, show_progress=False)
    assert read_card(result.adapter_path).recipe["training"]["mixed_precision"] == expected


@pytest.mark.parametrize("device, capability, expected", [
    ("cpu", {"fast_bf16": True}, "bf16"), ("cpu", {"fast_bf16": False}, "no"),
    ("cuda", True, "bf16"), ("cuda", False, "fp16"), ("mps", None, "no")])
def test_auto_precision_rule(device, capability, expected, monkeypatch):
    monkeypatch.setattr(precision, "cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: capability)
    assert mixed_precision_for(torch.device(device)) == expected
    assert resolve_dtype("auto", torch.device(device)) == {"bf16": torch.bfloat16, "fp16": torch.float16,
                                                           "no": torch.float32}[expected]


def test_a_cpu_whose_onednn_is_held_to_avx2_trains_in_full_precision():
    """oneDNN held to AVX2 computes bf16 as slowly as an AVX2-only CPU (on any CPU): auto must not pick it.
    Set before torch starts, hence a fresh interpreter."""
    probe = ("import json, torch; from adapterlab.precision import cpu_capability, mixed_precision_for; "
             "print(json.dumps([cpu_capability(), mixed_precision_for(torch.device('cpu'))]))")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    capability, chosen = json.loads(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                                                   text=True, check=True).stdout.splitlines()[-1])
    assert capability["onednn_bf16"] is False and capability["fast_bf16"] is False
    assert chosen == "no"


def test_without_torchs_private_checks_a_timed_product_decides(monkeypatch):
    """torch answers bf16 support through private functions only: where a release drops them, the CPU's
    flags and a timed bf16 matrix product give the same kind of answer (here, the same answer)."""
    expected = cpu_capability()
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, name)
    monkeypatch.setattr(torch.ops, "mkldnn", types.SimpleNamespace())  # no _is_mkldnn_bf16_supported
    precision.bf16_matmul_is_fast.cache_clear()
    probed = cpu_capability()
    assert set(probed) == set(expected) and probed["cpu"] == expected["cpu"] and probed["isa"] == expected["isa"]
    assert all(isinstance(probed[key], bool) for key in ("avx512_bf16", "amx", "onednn_bf16", "fast_bf16"))
    assert probed["fast_bf16"] == precision.bf16_matmul_is_fast() == expected["fast_bf16"]
    if Path("/proc/cpuinfo").is_file():  # the flags stand in for torch's checks
        assert (probed["avx512_bf16"], probed["amx"]) == (expected["avx512_bf16"], expected["amx"])


def test_yaml_no_is_read_as_no(tiny_bert, tmp_path):
    raw = tiny_recipe(tiny_bert, tmp_path)
    apply_override(raw, "training.mixed_precision=no")  # YAML's false
    assert validate_recipe(raw).training.mixed_precision == "no"


def test_training_reads_max_length_tokens_and_serving_eval_max_length(tiny_bert, tmp_path):
    recipe = validate_recipe(tiny_recipe(tiny_bert, tmp_path, training={"max_length": 8, "eval_max_length": 64}))
    accelerator, task, model = setup(recipe)
    seen = record_inputs(model)
    fit(model, task.train, recipe, accelerator, show_progress=False)
    assert seen and max(tokens for _, tokens in seen) == 8
    seen.clear()
    scores = model.scores([LONG])
    assert seen[-1][1] == 64
    truncated = model.scores([model.backbone.tokenizer.convert_tokens_to_string(
        model.backbone.tokenizer.tokenize(LONG)[:6])])  # the 8 tokens training would read
    assert not torch.allclose(scores, truncated, atol=1e-4)  # so that agreeing with the engine means something

    folder, _ = save_adapter(model, make_card(recipe, task, model, *parameter_counts(model), 0.0, {}), tmp_path)
    served = Engine(tiny_bert, tmp_path, dtype="float32").predict(str(folder), [LONG])[0]
    assert torch.allclose(torch.tensor([list(served.scores.values())]), scores, atol=1e-5)
