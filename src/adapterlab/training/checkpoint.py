"""Checkpoints of a training run, so that a killed run can resume where it stopped.

A checkpoint holds what `fit` needs to go on exactly: the trainable (adapter and head) tensors,
AdamW's state tensors (exp_avg, exp_avg_sq, step) in safetensors; the step, the optimizer's
parameter groups and the scheduler's position in a small JSON file. Nothing is pickled (Accelerate's
`save_state` would torch.save the optimizer). It lives at STORE/.checkpoints/TASK/NAME/, hidden so
that the store's listings skip it, and is removed once the adapter is saved.

checkpoint.json names the tensor file of its step and is replaced last, so a kill at any moment
leaves the previous checkpoint or the new one, whole. A run that chose its settings by cross-validation
(`training.select`) keeps that choice beside them (selection.json), so that resuming does not choose
again.
"""

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from adapterlab.errors import AdapterlabError

FORMAT = 1
INDEX = "checkpoint.json"
SELECTION = "selection.json"


class CheckpointError(AdapterlabError):
    """A checkpoint that is damaged or was written by another run."""


@dataclass
class Checkpoint:
    folder: Path
    step: int
    tensors: dict[str, torch.Tensor]
    index: dict  # the JSON part


def checkpoint_folder(recipe) -> Path:
    return Path(recipe.output.store) / ".checkpoints" / recipe.task / recipe.adapter_name


def run_identity(recipe, backbone_fingerprint: str, processes: int) -> dict:
    """What a checkpoint must match to be resumed: the recipe (save where checkpoints go and how
    often), the backbone's weights, and the number of processes (it sets the global batch)."""
    trained = recipe.model_dump(mode="json", exclude={"output": True, "training": {"checkpoint_every"}})
    digest = hashlib.sha256(json.dumps(trained, sort_keys=True).encode()).hexdigest()
    return {"format": FORMAT, "recipe": f"sha256:{digest}", "backbone_fingerprint": backbone_fingerprint,
            "processes": processes}


def save_checkpoint(folder: Path, step: int, model: torch.nn.Module, optimizer, scheduler, identity: dict) -> None:
    """Write the run's state after `step` optimizer steps (call it on one process only)."""
    tensors = {f"param/{name}": p.detach().cpu().contiguous() for name, p in _trainable(model).items()}
    optimizer_state = optimizer.state_dict()
    for number, values in optimizer_state["state"].items():  # AdamW: step, exp_avg, exp_avg_sq
        for key, value in values.items():
            tensors[f"optimizer/{number}/{key}"] = value.detach().cpu().contiguous()
    weights = f"step-{step}.safetensors"
    index = {**identity, "step": step, "weights": weights, "param_groups": optimizer_state["param_groups"],
             "scheduler": scheduler.state_dict()}
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomically(folder / weights, lambda path: save_file(tensors, path))
    _write_atomically(folder / INDEX, lambda path: path.write_text(json.dumps(index)))
    for old in folder.glob("step-*.safetensors"):
        if old.name != weights:
            old.unlink()
    for partial in folder.glob(".*.tmp"):  # a write killed mid-way (this one's are gone by now)
        partial.unlink(missing_ok=True)


def has_checkpoint(folder: Path) -> bool:
    return (folder / INDEX).exists()


def read_checkpoint(folder: Path, identity: dict) -> Checkpoint | None:
    """The checkpoint in `folder`, None when there is none; refused when damaged or another run's."""
    if not has_checkpoint(folder):
        return None
    try:
        index = json.loads((folder / INDEX).read_text())
        checkpoint = Checkpoint(folder, int(index["step"]), load_file(folder / index["weights"]), index)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        raise CheckpointError(f"checkpoint {folder} is damaged ({type(error).__name__}: {error}); "
                              "delete it to train from the start") from None
    _check_identity(folder, index, identity)
    return checkpoint


def _check_identity(folder: Path, saved: dict, identity: dict) -> None:
    differences = [_difference(key, saved.get(key), value) for key, value in identity.items()
                   if saved.get(key) != value]
    if differences:
        raise CheckpointError(f"checkpoint {folder} belongs to another run ({'; '.join(differences)}): "
                              "delete it, or train without --resume to start over")


def save_selection(folder: Path, selection: dict, identity: dict) -> None:
    """Keep a run's cross-validated choice (`Selection.state()`) for `--resume` (call it on one process)."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomically(folder / SELECTION, lambda path: path.write_text(json.dumps({**identity, "selection": selection})))


def read_selection(folder: Path, identity: dict) -> dict | None:
    """The choice an interrupted run of the same recipe made, None when there is none."""
    file = folder / SELECTION
    if not file.exists():
        return None
    try:
        saved = json.loads(file.read_text())
        selection = saved["selection"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {folder} is damaged ({SELECTION}: {error}); delete it to train from "
                              "the start") from None
    _check_identity(folder, saved, identity)
    return selection


def restore(checkpoint: Checkpoint, model: torch.nn.Module, optimizer, scheduler) -> int:
    """Load the checkpoint into the model, optimizer and scheduler; returns its step."""
    params = _trainable(model)
    saved = {k.removeprefix("param/"): v for k, v in checkpoint.tensors.items() if k.startswith("param/")}
    misfits = sorted(set(params) ^ set(saved)) or [n for n in params if params[n].shape != saved[n].shape]
    if misfits:
        raise CheckpointError(f"checkpoint {checkpoint.folder} does not fit the model (e.g. {misfits[0]})")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])
    state = {}
    for key, value in checkpoint.tensors.items():
        if key.startswith("optimizer/"):
            _, number, name = key.split("/")
            state.setdefault(int(number), {})[name] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": checkpoint.index["param_groups"]})
        scheduler.load_state_dict(checkpoint.index["scheduler"])
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"checkpoint {checkpoint.folder} is damaged (optimizer state: {error})") from None
    return checkpoint.step


def remove_checkpoint(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    for parent in (folder.parent, folder.parent.parent):  # TASK/ and .checkpoints/, once empty
        try:
            parent.rmdir()
        except OSError:
            break


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _difference(key: str, saved, current) -> str:
    if key == "processes":
        return f"{saved} processes, now {current}"
    return {"recipe": "another recipe", "backbone_fingerprint": "another backbone",
            "format": f"checkpoint format {saved}, this adapterlab reads {current}"}.get(key, key)


def _write_atomically(target: Path, write) -> None:
    """Write through a temporary file, flushed to disk, then renamed over `target`."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(partial)
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
