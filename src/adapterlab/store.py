"""The adapter store: STORE/TASK/NAME/ folders, written atomically, each describing itself.

A folder holds the standard PEFT files (adapter_config.json, adapter_model.safetensors: loadable by
`PeftModel.from_pretrained`), the head (head.safetensors), card.json and a short README.md. A folder
is written under a hidden temporary name and renamed into place, so a crash mid-save never leaves a
half adapter that `list_adapters` shows. Only safetensors are read: nothing is ever unpickled.
"""

import glob
import json
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from adapterlab.backbones import Backbone
from adapterlab.model import AdapterModel, load_adapter_model
from adapterlab.recipe import Recipe
from adapterlab.errors import AdapterlabError

REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors", "head.safetensors", "card.json")
WEIGHT_FILES = ("adapter_model.safetensors", "head.safetensors")


class StoreError(AdapterlabError):
    """An adapter folder that is missing, damaged, or does not fit the backbone."""


class AdapterCard(BaseModel):
    """What an adapter is: enough to reload and judge it without asking the caller anything."""

    model_config = ConfigDict(extra="allow")
    task: str
    name: str
    labels: list[str]
    label_descriptions: list[str]
    backbone: str
    backbone_fingerprint: str
    method: str
    k: int | None
    seed: int
    recipe: dict
    metrics: dict[str, float] = {}
    trainable_params: int
    backbone_params: int
    adapter_bytes: int = 0
    train_seconds: float | None = None
    created: str = ""


def save_adapter(model: AdapterModel, card: AdapterCard, store: str | Path) -> tuple[Path, AdapterCard]:
    """Write the adapter to STORE/TASK/NAME atomically (replacing one of the same name); returns
    its folder and its completed card."""
    task_dir = Path(store) / card.task
    task_dir.mkdir(parents=True, exist_ok=True)
    target = task_dir / card.name
    _tidy_leftovers(task_dir, card.name)
    staging = Path(tempfile.mkdtemp(dir=task_dir, prefix=f".{card.name}.saving-{_owner()}-"))
    try:
        model.peft_model.save_pretrained(staging, safe_serialization=True,
                                         selected_adapters=[model.peft_model.active_adapter])
        save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()},
                  staging / "head.safetensors")
        card = card.model_copy(update={
            "adapter_bytes": sum((staging / f).stat().st_size for f in WEIGHT_FILES),
            "created": card.created or datetime.now(timezone.utc).isoformat(timespec="seconds")})
        (staging / "card.json").write_text(card.model_dump_json(indent=2))
        (staging / "README.md").write_text(_readme(card))
        _fsync_tree(staging)
        _replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, card


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an old `target` is moved aside first and removed after."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.replaced-{_owner()}")
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _tidy_leftovers(task_dir: Path, name: str) -> None:
    """Clear what a save of NAME killed mid-way left in its task folder: a staging folder is removed;
    an adapter it had moved aside is put back when nothing replaced it. Saves still running are left
    alone (their process id is in the name), and so are other machines' (a shared store): whether
    they still run cannot be told from here."""
    for leftover in task_dir.glob(f".{glob.escape(name)}.*"):
        kind, _, rest = leftover.name[len(name) + 2:].partition("-")
        pid, _, host = rest.split("-")[0].partition("@")
        if kind not in ("saving", "replaced") or not pid.isdigit() or host != _host() or _alive(int(pid)):
            continue
        if kind == "replaced" and not (task_dir / name).exists():
            leftover.rename(task_dir / name)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _owner() -> str:
    """PID@HOST, written into the names of a save's temporary folders."""
    return f"{os.getpid()}@{_host()}"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())  # no '-': it separates the name's parts


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _fsync_tree(folder: Path) -> None:
    for file in folder.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def adapter_folders(store: str | Path) -> list[Path]:
    """Every TASK/NAME folder of the store, broken ones included; hidden (in-progress) ones are not."""
    return sorted(folder for folder in Path(store).glob("*/*")
                  if folder.is_dir() and not folder.name.startswith(".") and not folder.parent.name.startswith("."))


def list_adapters(store: str | Path) -> list[AdapterCard]:
    """Cards of every adapter in the store that has a valid card (`verify` names broken ones)."""
    cards = []
    for folder in adapter_folders(store):
        try:
            cards.append(read_card(folder))
        except StoreError:
            continue
    return cards


def resolve(store: str | Path, reference: str) -> Path:
    """A folder path, or TASK/NAME inside the store, or TASK alone when it holds one adapter."""
    if Path(reference).is_dir():
        return Path(reference)
    parts = Path(reference).parts
    if not 1 <= len(parts) <= 2 or ".." in parts or Path(reference).is_absolute():
        raise StoreError(f"no adapter folder {reference!r}, and as TASK/NAME in the store it may hold "
                         "at most one '/' and no '..'")
    folder = Path(store) / reference
    if (folder / "card.json").exists():
        return folder
    if folder.is_dir():
        names = sorted(p.name for p in folder.iterdir() if (p / "card.json").exists())
        if len(names) == 1:
            return folder / names[0]
        if names:
            raise StoreError(f"task {reference!r} has several adapters ({', '.join(names)}): name one as TASK/NAME")
    raise StoreError(f"no adapter {reference!r} in store {store}")


def read_card(folder: str | Path) -> AdapterCard:
    file = Path(folder) / "card.json"
    try:
        return AdapterCard.model_validate_json(file.read_text())
    except FileNotFoundError:
        raise StoreError(f"{folder}: not an adapter folder (no card.json)") from None
    except (ValidationError, ValueError) as error:
        raise StoreError(f"{file}: corrupt card ({str(error).splitlines()[0]})") from None


def verify(folder: str | Path) -> list[str]:
    """Problems with an adapter folder; empty when it is complete and its files are readable."""
    folder = Path(folder)
    problems = [f"missing {name}" for name in REQUIRED_FILES if not (folder / name).is_file()]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        problems.append("holds pickled weights (.bin/.pt); adapterlab reads safetensors only")
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            try:
                with safe_open(folder / name, framework="pt") as handle:
                    for key in handle.keys():
                        handle.get_tensor(key)
            except (SafetensorError, OSError, ValueError) as error:
                problems.append(f"{name} is corrupt ({error})")
    if (folder / "adapter_config.json").is_file():
        try:
            json.loads((folder / "adapter_config.json").read_text())
        except ValueError:
            problems.append("adapter_config.json is not valid JSON")
    if (folder / "card.json").is_file():
        try:
            read_card(folder)
        except StoreError as error:
            problems.append(str(error))
    return problems


@dataclass
class StoredAdapter:
    """An adapter's files, read: its card, PEFT config, adapter tensors and head tensors."""

    folder: Path
    card: AdapterCard
    adapter_config: dict
    tensors: dict[str, torch.Tensor]
    head_tensors: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.tensors.values(), *self.head_tensors.values()))


def read_adapter(folder: str | Path, fingerprint: str, backbone_name: str = "the loaded backbone") -> StoredAdapter:
    """Read an adapter's files for a backbone with `fingerprint` (the engine's fast path: each file
    is read once, safetensors only; a damaged file is named)."""
    folder = Path(folder)
    card = read_card(folder)
    _check_backbone(card, fingerprint, backbone_name)
    try:
        adapter_config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(folder / "adapter_model.safetensors")
        head_tensors = load_file(folder / "head.safetensors")
    except (SafetensorError, OSError, ValueError) as error:
        raise StoreError(f"adapter {folder} is unusable: {type(error).__name__}: {error}") from None
    return StoredAdapter(folder, card, adapter_config, tensors, head_tensors)


def _check_backbone(card: AdapterCard, fingerprint: str, backbone_name: str) -> None:
    if card.backbone_fingerprint != fingerprint:
        raise StoreError(
            f"adapter {card.task}/{card.name} was trained on backbone {card.backbone!r} "
            f"({card.backbone_fingerprint[:19]}…), not on the loaded backbone {backbone_name!r} "
            f"({fingerprint[:19]}…)")


def load_adapter(folder: str | Path, backbone: Backbone) -> tuple[AdapterModel, AdapterCard]:
    """Load a verified adapter onto `backbone` through peft (for merging and exporting; serving goes
    through `read_adapter` and the engine). Refused when it was trained on another backbone."""
    folder = Path(folder)
    problems = verify(folder)
    if problems:
        raise StoreError(f"adapter {folder} is unusable: {'; '.join(problems)}")
    card = read_card(folder)
    _check_backbone(card, backbone.fingerprint, backbone.name)
    recipe = Recipe.model_validate(card.recipe)
    model = load_adapter_model(folder, recipe, backbone, card.labels, load_file(folder / "head.safetensors"))
    return model, card


def _readme(card: AdapterCard) -> str:
    metrics = ", ".join(f"{k} {v:.3f}" for k, v in card.metrics.items()) or "not evaluated"
    return (f"# {card.task} / {card.name}\n\n"
            f"A {card.method} adapter for `{card.backbone}` made by adapterlab, trained on "
            f"{card.k if card.k is not None else 'all'} examples per class (seed {card.seed}).\n\n"
            f"- labels: {', '.join(card.labels)}\n- test metrics: {metrics}\n"
            f"- trainable parameters: {card.trainable_params:,} "
            f"({100 * card.trainable_params / card.backbone_params:.2f}% of the backbone)\n"
            f"- backbone fingerprint: `{card.backbone_fingerprint}`\n\n"
            "Load with `adapterlab predict` or `peft.PeftModel.from_pretrained` (head in head.safetensors); "
            "card.json holds the full recipe.\n")
