"""The same recipe under `accelerate launch`, as a user would start it (a real subprocess)."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from adapterlab.engine import Engine
from adapterlab.store import verify
from conftest import ROOT, tiny_recipe


def test_accelerate_launch_runs_the_recipe_unchanged(tiny_bert, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_bert, tmp_path / "store")))
    accelerate = Path(sys.executable).with_name("accelerate")
    done = subprocess.run([str(accelerate), "launch", "--config_file", str(ROOT / "accelerate_configs/cpu.yaml"),
                           "-m", "adapterlab", "train", str(recipe), "--json", "--quiet"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert verify(out["adapter_path"]) == []
    served = Engine(tiny_bert, tmp_path / "store", dtype="float32").evaluate(out["adapter_path"], "demo:sentiment")
    assert out["metrics"]["accuracy"] == served["accuracy"]  # the launched run evaluated what the engine serves
