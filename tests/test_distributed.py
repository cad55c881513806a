"""Real 2-process data-parallel trainings through `accelerate launch` and MPI (Debian's openmpi-bin; .ci/run
installs it): the MiniLM LoRA recipe against the same training in one process, a tiny BERT's stored adapter
against what each rank trained, and a checkpoint resumed."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapterlab.backbones import load_backbone
from adapterlab.loading import load_adapter
from conftest import ROOT, shared

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs MPI (apt-get install openmpi-bin)")]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
MPI_AS_ROOT = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}

# Trains like `adapterlab train`, with dropout off (so that one and two processes can agree exactly),
# and has every rank dump its final adapter and head weights.
SCRIPT = """
import sys, torch
from safetensors.torch import save_file
from adapterlab.recipe import load_recipe
from adapterlab.training.builders import setup
from adapterlab.training.loop import fit
recipe = load_recipe(sys.argv[1], sys.argv[3:])
accelerator, task, model = setup(recipe)
for module in model.modules():
    if isinstance(module, torch.nn.Dropout):
        module.p = 0.0
fit(model, task.train, recipe, accelerator, show_progress=False)
state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
save_file(state, f"{sys.argv[2]}/rank{accelerator.process_index}-of-{accelerator.num_processes}.safetensors")
"""


def overrides(batch_size: int, store: Path) -> list[str]:
    # Full precision: under bf16 autocast (auto, on CPUs with fast bf16) a batch of 4 and one of 8 round
    # differently, and the comparison is of data parallelism, not of rounding.
    return [f"data.path={shared('agnews')}", "data.k=8", "data.test_limit=50", "training.max_steps=6",
            "training.mixed_precision=no",
            f"training.batch_size={batch_size}", "method.dropout=0", "head.dropout=0", f"output.store={store}"]


def launch(config: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([ACCELERATE, "launch", "--config_file", str(ROOT / "accelerate_configs" / config), *args],
                          capture_output=True, text=True, timeout=900, cwd=ROOT, env={**os.environ, **MPI_AS_ROOT})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_processes_train_one_adapter_like_one_process(tmp_path):
    recipe = str(ROOT / "recipes/sst2-lora-minilm.yaml")
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    launch("cpu-2proc.yaml", str(script), recipe, str(tmp_path), *overrides(4, tmp_path / "a"), cwd=tmp_path)
    launch("cpu.yaml", str(script), recipe, str(tmp_path), *overrides(8, tmp_path / "b"), cwd=tmp_path)
    rank0, rank1 = load_file(tmp_path / "rank0-of-2.safetensors"), load_file(tmp_path / "rank1-of-2.safetensors")
    single = load_file(tmp_path / "rank0-of-1.safetensors")
    assert rank0.keys() == rank1.keys() == single.keys() and len(rank0) > 2
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name  # DDP keeps the ranks identical
        assert torch.allclose(rank0[name], single[name], atol=1e-4, rtol=1e-3), name  # same global batch of 8

    # The CLI under two processes: one adapter, one JSON line, one log line.
    done = launch("cpu-2proc.yaml", "-m", "adapterlab", "train", recipe, "--json", "--quiet",
                  *[a for o in overrides(4, tmp_path / "cli") for a in ("--set", o)], cwd=tmp_path)
    outputs = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(outputs) == 1 and Path(outputs[0]["adapter_path"]).is_dir()
    assert [p.name for p in (tmp_path / "cli" / "sst2").iterdir()] == [Path(outputs[0]["adapter_path"]).name]
    assert done.stderr.count("trainable parameters:") == 1


# Trains a tiny BERT adapter with gradient accumulation and stores it like `adapterlab train`; every rank
# dumps its adapter and head tensors and the learning rate at each optimizer step.
TRAIN_AND_STORE = """
import json, sys
from safetensors.torch import save_file
from torch.optim.optimizer import register_optimizer_step_pre_hook
from adapterlab.recipe import validate_recipe
from adapterlab.training.builders import logged_parameter_counts, setup
from adapterlab.training.loop import fit
from adapterlab.training.result import save_run
backbone, out = sys.argv[1:3]
recipe = validate_recipe({"task": "sentiment", "backbone": backbone, "method": {"name": "lora", "r": 4},
                          "data": {"path": "demo:sentiment", "k": 4}, "output": {"store": out},
                          "training": {"max_steps": 5, "batch_size": 2, "grad_accum": 2, "warmup_ratio": 0.4,
                                       "lr": 1e-3, "mixed_precision": "no"}})
accelerator, task, model = setup(recipe)
rates = []
register_optimizer_step_pre_hook(lambda optimizer, *_: rates.append(optimizer.param_groups[0]["lr"]))
fit(model, task.train, recipe, accelerator, show_progress=False)
result = save_run(model, recipe, task, accelerator, logged_parameter_counts(model, accelerator), 0.0)
rank = accelerator.process_index
save_file({k: v.detach().contiguous() for k, v in model.state_dict().items() if "lora_" in k or k.startswith("head.")},
          f"{out}/rank{rank}.safetensors")
json.dump({"rates": rates, "adapter_path": result.adapter_path and str(result.adapter_path)},
          open(f"{out}/rank{rank}.json", "w"))
"""


def adapter_and_head(model) -> dict[str, torch.Tensor]:
    """As the script dumps them."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if "lora_" in k or k.startswith("head.")}


def test_two_processes_agree_and_store_what_rank_0_trained(tiny_bert, tmp_path):
    script = tmp_path / "train_and_store.py"
    script.write_text(TRAIN_AND_STORE)
    launch("cpu-2proc.yaml", str(script), tiny_bert, str(tmp_path), cwd=tmp_path)
    ranks = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in (0, 1)]
    runs = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and any("lora_" in k for k in ranks[0])
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # DDP keeps the ranks identical
    # one rate per optimizer step (10 batches a rank), warming up over 2 of 5 steps as in one process
    assert runs[0]["rates"] == runs[1]["rates"] == pytest.approx([0, 5e-4, 1e-3, 1e-3 * 2 / 3, 1e-3 / 3])
    assert runs[1]["adapter_path"] is None  # only the main process stores
    stored, _ = load_adapter(runs[0]["adapter_path"], load_backbone(tiny_bert))
    loaded = adapter_and_head(stored)
    assert loaded.keys() == ranks[0].keys() and all(torch.equal(loaded[k], ranks[0][k]) for k in loaded)


# Trains a tiny recipe under `accelerate launch`; with "stop", the main process dies right after its
# checkpoint at step 4 (MPI then ends the other rank), as a killed job would.
RESUMABLE = """
import os, sys
import adapterlab.training
import adapterlab.training.loop
from adapterlab.recipe import validate_recipe
mode, backbone, store = sys.argv[1:4]
recipe = validate_recipe({"task": "sentiment", "backbone": backbone, "method": {"name": "lora", "r": 4},
                          "data": {"path": "demo:sentiment", "k": 4}, "output": {"store": store},
                          "training": {"max_steps": 6, "batch_size": 2, "checkpoint_every": 2}})
if mode == "stop":
    save = adapterlab.training.loop.save_checkpoint
    def save_then_die(folder, step, *args):
        save(folder, step, *args)
        if step == 4:
            os._exit(1)
    adapterlab.training.loop.save_checkpoint = save_then_die
adapterlab.training.train(recipe, show_progress=False, resume=mode == "resume")
"""


def test_two_processes_resume_a_checkpoint_to_the_uninterrupted_adapter(tiny_bert, tmp_path):
    script = tmp_path / "resumable.py"
    script.write_text(RESUMABLE)
    run = [ACCELERATE, "launch", "--config_file", str(ROOT / "accelerate_configs/cpu-2proc.yaml"), str(script)]
    env = {**os.environ, **MPI_AS_ROOT}
    launch("cpu-2proc.yaml", str(script), "whole", tiny_bert, str(tmp_path / "whole"), cwd=tmp_path)
    stopped = subprocess.run([*run, "stop", tiny_bert, str(tmp_path / "resumed")], capture_output=True, text=True,
                             timeout=900, cwd=ROOT, env=env)
    assert stopped.returncode != 0
    adapter = next((tmp_path / "whole/sentiment").iterdir()).name  # the recipe's default name, in both stores
    assert (tmp_path / f"resumed/.checkpoints/sentiment/{adapter}/step-4.safetensors").is_file()
    launch("cpu-2proc.yaml", str(script), "resume", tiny_bert, str(tmp_path / "resumed"), cwd=tmp_path)
    for name in ("adapter_model.safetensors", "head.safetensors"):
        whole = load_file(tmp_path / "whole/sentiment" / adapter / name)
        resumed = load_file(tmp_path / "resumed/sentiment" / adapter / name)
        assert all(torch.allclose(whole[k], resumed[k], atol=1e-6) for k in whole), name
    assert not (tmp_path / "resumed/.checkpoints").exists()
