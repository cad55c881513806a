"""Checkpoint and resume: a run stopped after a checkpoint and resumed ends with the adapter of an
uninterrupted run (tiny BERT in-process; MiniLM killed with SIGKILL in a subprocess), and a damaged
checkpoint or one of another run is refused with one clear line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import adapterlab.training.loop
import adapterlab.training.select
from adapterlab.training.checkpoint import CheckpointError, checkpoint_folder, read_selection
from adapterlab.cli import app
from adapterlab.recipe import load_recipe, validate_recipe
from adapterlab.store import list_adapters, read_card, verify
from adapterlab.training import train
from conftest import ROOT, shared, tiny_recipe


class Stopped(Exception):
    """Stands for the process dying right after a checkpoint."""


def stop_after_checkpoint(monkeypatch, at_step: int) -> None:
    save = adapterlab.training.loop.save_checkpoint

    def save_then_stop(folder, step, *args):
        save(folder, step, *args)
        if step == at_step:
            raise Stopped

    monkeypatch.setattr(adapterlab.training.loop, "save_checkpoint", save_then_stop)


# Tied labels, four of the intent task's five a step: resuming must draw the labels of the uninterrupted run.
TIED = {"head": {"tie_labels": True, "tie_labels_per_step": 4}, "data": {"path": "demo:intent", "k": 4}}


def recipe_in(store: Path, tiny_bert: str, tied: bool = False, name: str | None = None, **training):
    # Dropout stays on (LoRA and head): resuming must draw the same masks as the uninterrupted run.
    return validate_recipe(tiny_recipe(tiny_bert, store, training={"max_steps": 6, "batch_size": 4,
                                                                   "checkpoint_every": 2, **training},
                                       output={"name": name}, **(TIED if tied else {})))


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {**load_file(folder / "adapter_model.safetensors"), **load_file(folder / "head.safetensors")}


def interrupted_run(store: Path, tiny_bert: str, monkeypatch, at_step: int = 4, tied: bool = False,
                    name: str | None = None, **training) -> Path:
    recipe = recipe_in(store, tiny_bert, tied, name, **training)
    with monkeypatch.context() as patch:
        stop_after_checkpoint(patch, at_step)
        with pytest.raises(Stopped):
            train(recipe, show_progress=False)
    folder = checkpoint_folder(recipe)
    assert json.loads((folder / "checkpoint.json").read_text())["step"] == at_step
    return folder


@pytest.mark.parametrize("grad_accum, tied", [(1, False), (2, False), (1, True)])
def test_resumed_run_equals_the_uninterrupted_one(tiny_bert, tmp_path, monkeypatch, grad_accum, tied):
    whole = train(recipe_in(tmp_path / "whole", tiny_bert, tied, grad_accum=grad_accum), show_progress=False)
    folder = interrupted_run(tmp_path / "resumed", tiny_bert, monkeypatch, tied=tied, grad_accum=grad_accum)
    assert list_adapters(tmp_path / "resumed") == []  # the hidden checkpoint is no adapter

    resumed = train(recipe_in(tmp_path / "resumed", tiny_bert, tied, grad_accum=grad_accum), show_progress=False, resume=True)
    expected, got = adapter_tensors(whole.adapter_path), adapter_tensors(resumed.adapter_path)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6), name
    assert not folder.exists() and not (tmp_path / "resumed" / ".checkpoints").exists()  # removed once saved
    assert [c.name for c in list_adapters(tmp_path / "resumed")] == [whole.adapter_path.name]
    assert verify(resumed.adapter_path) == []


def test_a_resumed_run_keeps_the_settings_its_selection_chose_without_choosing_again(tiny_bert, tmp_path,
                                                                                    monkeypatch):
    select = {"select": {"folds": 2, "grid": {"training.lr": [1e-4, 5e-3]}}}
    whole = train(recipe_in(tmp_path / "whole", tiny_bert, **select), show_progress=False)
    folder = interrupted_run(tmp_path / "resumed", tiny_bert, monkeypatch, **select)
    assert (folder / "selection.json").exists()

    def must_not_choose_again(*args, **kwargs):
        raise AssertionError("the resumed run cross-validated again")

    with monkeypatch.context() as patch:
        patch.setattr(adapterlab.training.select, "select_settings", must_not_choose_again)
        resumed = train(recipe_in(tmp_path / "resumed", tiny_bert, **select), show_progress=False, resume=True)
    expected, got = adapter_tensors(whole.adapter_path), adapter_tensors(resumed.adapter_path)
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6), name
    chosen = [read_card(r.adapter_path).selection for r in (whole, resumed)]
    assert [c["chosen"] for c in chosen] == [chosen[0]["chosen"]] * 2 and chosen[0]["points"] == chosen[1]["points"]
    assert not folder.exists()

    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "selection.json").write_text("{half")
    with pytest.raises(CheckpointError, match="selection.json"):
        read_selection(tmp_path / "damaged", {})


def test_next_checkpoint_clears_a_killed_write(tiny_bert, tmp_path, monkeypatch):
    folder = interrupted_run(tmp_path, tiny_bert, monkeypatch, at_step=2)
    partial = folder / ".step-4.safetensors.4242424.tmp"  # what a kill during a write leaves
    partial.write_bytes(b"half a tensor file")
    recipe = recipe_in(tmp_path, tiny_bert)
    with monkeypatch.context() as patch:
        stop_after_checkpoint(patch, 4)
        with pytest.raises(Stopped):
            train(recipe, show_progress=False, resume=True)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.json", "step-4.safetensors"]


def test_resume_without_a_checkpoint_starts_from_the_beginning(tiny_bert, tmp_path, caplog):
    caplog.set_level("INFO", logger="adapterlab")
    result = train(recipe_in(tmp_path, tiny_bert), show_progress=False, resume=True)
    assert "no checkpoint in" in caplog.text and result.adapter_path.is_dir()


def test_checkpoint_of_another_run_is_refused(tiny_bert, tmp_path, monkeypatch):
    # other settings under a default name are another name, with checkpoints of their own
    assert checkpoint_folder(recipe_in(tmp_path, tiny_bert, lr=3e-3)) != checkpoint_folder(recipe_in(tmp_path, tiny_bert))
    interrupted_run(tmp_path, tiny_bert, monkeypatch, name="run")  # an explicit name: any recipe may take it
    with pytest.raises(CheckpointError, match="belongs to another run .another recipe."):
        train(recipe_in(tmp_path, tiny_bert, name="run", lr=3e-3), show_progress=False, resume=True)
    with pytest.raises(CheckpointError, match="another recipe"):  # the schedule depends on the step count
        train(recipe_in(tmp_path, tiny_bert, name="run", max_steps=8), show_progress=False, resume=True)
    index = checkpoint_folder(recipe_in(tmp_path, tiny_bert, name="run")) / "checkpoint.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "processes": 2}))
    with pytest.raises(CheckpointError, match="2 processes, now 1"):
        train(recipe_in(tmp_path, tiny_bert, name="run"), show_progress=False, resume=True)
    # Without --resume the run starts over, replaces the checkpoint and removes it at the end.
    assert train(recipe_in(tmp_path, tiny_bert, name="run"), show_progress=False).adapter_path.is_dir()
    assert not index.exists()


@pytest.mark.parametrize("damage", ["truncated tensors", "missing tensors", "malformed index"])
def test_damaged_checkpoint_is_one_line_on_the_command_line(tiny_bert, tmp_path, monkeypatch, damage):
    folder = interrupted_run(tmp_path / "store", tiny_bert, monkeypatch)
    weights = folder / json.loads((folder / "checkpoint.json").read_text())["weights"]
    if damage == "truncated tensors":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "missing tensors":
        weights.unlink()
    else:
        (folder / "checkpoint.json").write_text('{"step": 4, "weights"')
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_bert, tmp_path / "store", training={
        "max_steps": 6, "batch_size": 4, "checkpoint_every": 2})))
    result = CliRunner().invoke(app, ["train", str(recipe), "--resume", "--quiet"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: checkpoint {folder} is damaged"), result.stderr
    assert list_adapters(tmp_path / "store") == []


@pytest.mark.slow
def test_killed_minilm_run_resumes_to_the_uninterrupted_adapter(tmp_path):
    """`adapterlab train` on MiniLM, SIGKILLed once its first checkpoint is on disk, then `--resume`."""
    overrides = [f"data.path={shared('sst2')}", "data.k=8", "data.test_limit=20", "training.batch_size=4",
                 "training.max_steps=24", "training.checkpoint_every=3"]

    def command(store: Path, *extra: str) -> list[str]:
        sets = [a for o in [*overrides, f"output.store={store}"] for a in ("--set", o)]
        return [sys.executable, "-m", "adapterlab", "train", str(ROOT / "recipes/sst2-lora-minilm.yaml"),
                *sets, "--quiet", "--json", *extra]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two runs share the 2 cores
    whole = subprocess.Popen(command(tmp_path / "whole"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    killed = subprocess.Popen(command(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    name = load_recipe(ROOT / "recipes/sst2-lora-minilm.yaml", overrides).adapter_name
    index = tmp_path / "killed" / ".checkpoints" / "sst2" / name / "checkpoint.json"
    deadline = time.monotonic() + 120
    while not index.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL and index.exists()
    step = json.loads(index.read_text())["step"]
    assert 3 <= step < 24  # killed mid-run, after at least one checkpoint

    resumed = subprocess.run(command(tmp_path / "killed", "--resume"), env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {step}" in resumed.stderr
    out, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err[-2000:]

    expected = adapter_tensors(Path(json.loads(out.splitlines()[-1])["adapter_path"]))
    got = adapter_tensors(Path(json.loads(resumed.stdout.splitlines()[-1])["adapter_path"]))
    assert expected.keys() == got.keys() and len(expected) > 2
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-5, rtol=1e-4), name
    assert not index.parent.exists()
    verified = subprocess.run([sys.executable, "-m", "adapterlab", "adapters", "verify", "--store",
                               str(tmp_path / "killed"), "--json"], capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0 and json.loads(verified.stdout.splitlines()[-1])["ok"] is True


def test_a_generative_run_resumes_to_the_uninterrupted_adapter(tiny_llama, tmp_path, monkeypatch, caplog):
    def recipe(store: Path):
        return validate_recipe(tiny_recipe(tiny_llama, store, task="e2e", head={
            "type": "generate", "template": "Describe: {text}", "max_new_tokens": 4},
            data={"path": shared("e2e"), "text_field": "mr", "target_field": "ref", "k": 8, "test_limit": 1},
            training={"max_steps": 4, "batch_size": 4, "checkpoint_every": 2, "lr": 0.05}))

    whole = train(recipe(tmp_path / "whole"), show_progress=False)
    with monkeypatch.context() as patch:
        stop_after_checkpoint(patch, 2)
        with pytest.raises(Stopped):
            train(recipe(tmp_path / "resumed"), show_progress=False)
    caplog.set_level("INFO", logger="adapterlab")
    resumed = train(recipe(tmp_path / "resumed"), show_progress=False, resume=True)
    assert "at step 2" in caplog.text  # continued, not started over
    expected, got = adapter_tensors(whole.adapter_path), adapter_tensors(resumed.adapter_path)
    assert expected.keys() == got.keys() and any(t.abs().sum() > 0 for k, t in got.items() if "lora_B" in k)
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6), name
