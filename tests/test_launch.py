"""The same recipe under `accelerate launch`, as a user would start it (a real subprocess): a
classification recipe on a tiny BERT and a generation recipe on a tiny chat Llama."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from adapterlab.engine import Engine
from adapterlab.store import verify
from conftest import ROOT, shared, tiny_recipe

GENERATE = {"task": "e2e", "head": {"type": "generate", "template": "Describe: {text}", "max_new_tokens": 4},
            "data": {"path": shared("e2e"), "text_field": "mr", "target_field": "ref", "k": 4, "test_limit": 2}}


@pytest.mark.parametrize("kind", ["classify", "generate"])
def test_accelerate_launch_runs_the_recipe_unchanged(tiny_bert, tiny_llama, tmp_path, kind):
    backbone, sections = (tiny_bert, {}) if kind == "classify" else (tiny_llama, GENERATE)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(backbone, tmp_path / "store", **sections)))
    accelerate = Path(sys.executable).with_name("accelerate")
    done = subprocess.run([str(accelerate), "launch", "--config_file", str(ROOT / "accelerate_configs/cpu.yaml"),
                           "-m", "adapterlab", "train", str(recipe), "--json", "--quiet"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert verify(out["adapter_path"]) == []
    data, limit, metric = ("demo:sentiment", None, "accuracy") if kind == "classify" else (shared("e2e"), 2, "bleu")
    served = Engine(backbone, tmp_path / "store", dtype="float32").evaluate(out["adapter_path"], data, limit=limit)
    assert out["metrics"][metric] == pytest.approx(served[metric])  # the launched run evaluated what the engine serves
