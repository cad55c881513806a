"""The adapter store: STORE/TASK/NAME/ folders, written atomically, each describing itself.

A folder holds the standard PEFT files (adapter_config.json, adapter_model.safetensors: loadable by
`PeftModel.from_pretrained`), the head (head.safetensors), card.json and README.md, a model card as the
Hub reads it. adapter_config.json and README.md name the base model as other machines find it (its hub
id where one is known: `Backbone.base_model`); card.json names the backbone as adapterlab loads it, and
the folder it came from. A folder is written under a hidden temporary name and renamed into place, so
a crash mid-save never leaves a half adapter that `list_adapters` shows. Writers of one name take turns
(`adapter_lock`), so that of two saves at once the later one finds the earlier one's adapter, and
replaces it only when told to. Only safetensors are read: nothing is ever unpickled.

An ensemble's folder holds its card.json and README.md, and one such adapter folder per member in
members/0, members/1, ... (the card's `members` lists them in that order). A merged model's folder
(`save_merged`) holds a transformers model with the adapter folded in, its head, card and model card,
and for an encoder the files that make it a sentence-transformers folder. Exports (`save_portable`,
`save_lora_files`) are new folders written the same way, for loaders elsewhere.

Cards alone (listing, showing, resolving TASK/NAME) are read by `cards`, which needs no torch; its
names are importable from here too. Everything that uses an adapter reads it through `read_adapter`
(ensembles through `read_ensemble`, merged models through `read_merged`), which checks it for the
backbone; only `_read_files` opens the files, and models are built from what it read (`loading` puts
an adapter under peft).
"""

import ctypes
import errno
import fcntl
import functools
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
from peft import PeftModel
from torch import nn

from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save_file

from adapterlab.backbones import Backbone, load_backbone
from adapterlab.backbones.sentence_folders import SentenceSettings, write_sentence_settings
from adapterlab.heads import HeadMismatch, build_head
from adapterlab.methods import METHODS, method_module
from adapterlab.recipe import Recipe, describe_errors
# The card-only reading lives in `cards` (no torch); its names stay importable from here.
from adapterlab.cards import (MEMBERS, AdapterCard, StoreError, adapter_folders, list_adapters, member_folders,
                              read_card, resolve)
from adapterlab.errors import AdapterlabError
from adapterlab.model_card import model_card
from adapterlab.names import check_name

REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors", "head.safetensors", "card.json")
WEIGHT_FILES = ("adapter_model.safetensors", "head.safetensors")


class Trained(Protocol):
    """What the store saves of a trained model (model.AdapterModel, generative.GenerativeModel)."""

    backbone: Backbone
    peft_model: PeftModel
    head: nn.Module


def save_adapter(model: Trained, card: AdapterCard, store: str | Path, overwrite: bool = True
                 ) -> tuple[Path, AdapterCard]:
    """Write the adapter to STORE/TASK/NAME atomically; returns its folder and its completed card. One of
    the same name is replaced only with `overwrite` (else AdapterExists)."""
    return _save_atomically(card, store, lambda staging: _write_adapter(model, card, staging), overwrite)


def save_ensemble(members: list[tuple[Trained, AdapterCard]], card: AdapterCard, store: str | Path,
                  overwrite: bool = True) -> tuple[Path, AdapterCard]:
    """Write an ensemble to STORE/TASK/NAME atomically, as one adapter: each member a complete adapter
    folder in members/<i>, beside the ensemble's card (which lists them)."""
    def write(staging: Path) -> AdapterCard:
        written = [_write_adapter(model, member_card, staging / MEMBERS / str(i))
                   for i, (model, member_card) in enumerate(members)]
        backbone = members[0][0].backbone
        update = {"adapter_bytes": sum(c.adapter_bytes for c in written), "backbone_source": str(backbone.path)}
        return _write_card(card.model_copy(update=update), staging, backbone.base_model, library=None)

    return _save_atomically(card, store, write, overwrite)


def _save_atomically(card: AdapterCard, store: str | Path, write: Callable[[Path], AdapterCard], overwrite: bool
                     ) -> tuple[Path, AdapterCard]:
    """`write` fills a hidden staging folder and returns the completed card; the folder then replaces
    STORE/TASK/NAME in one step. The name's lock is held from the look at what is there to the swap,
    so that of two writers of one name the later one sees the earlier one's adapter."""
    check_name(card.task, "task")  # a card copied with new values skipped its validators
    check_name(card.name, "adapter name")
    task_dir = Path(store) / card.task
    task_dir.mkdir(parents=True, exist_ok=True)
    target = task_dir / card.name
    staging = Path(tempfile.mkdtemp(dir=task_dir, prefix=f".{card.name}.saving-{_owner()}-"))
    try:
        card = write(staging)
        _fsync_tree(staging)
        with adapter_lock(target):
            _tidy_leftovers(task_dir, card.name)
            if not overwrite:
                refuse_existing(target, "(another run may have saved it meanwhile): this run's adapter is "
                                        "discarded, not saved", card.settings_digest)
            _swap(staging, target)  # staging now holds the replaced adapter, if any
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, card


class AdapterExists(StoreError):
    """A save that would replace a stored adapter without being told to overwrite it."""


def refuse_existing(folder: Path, consequence: str = "", settings_digest: str | None = None) -> None:
    """AdapterExists when `folder` (STORE/TASK/NAME) is taken; `consequence` says what became of the
    new adapter. The message says when the adapter there was trained with the settings of `settings_digest`."""
    if not folder.exists():
        return
    try:
        same = settings_digest is not None and read_card(folder).settings_digest == settings_digest
    except StoreError:  # a damaged folder is still taken
        same = False
    taken = f"the same settings were already trained: {folder}" if same else f"adapter folder {folder} already exists"
    raise AdapterExists(" ".join(filter(None, [taken, consequence, "(pass --overwrite to replace it)"])))


@contextmanager
def adapter_lock(target: Path) -> Iterator[None]:
    """Hold the lock of the adapter folder `target` (TASK/NAME) against other writers of that name, in
    any process of this machine: an advisory flock on TASK/.NAME.lock. The holder removes the file on
    the way out (the store keeps no litter), so a writer that locked a file since removed tries again."""
    path = target.with_name(f".{target.name}.lock")
    while True:
        handle = open(path, "a")
        fcntl.flock(handle, fcntl.LOCK_EX)
        if _same_file(handle, path):
            break
        handle.close()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        handle.close()


def _same_file(handle, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def _write_adapter(model: Trained, card: AdapterCard, folder: Path, base_model: str | None = None) -> AdapterCard:
    """The standard PEFT files naming `base_model` (default: the backbone's, `Backbone.base_model`),
    the head, card.json and README.md (peft's model card, extended), into `folder`."""
    base_model = base_model or model.backbone.base_model
    model.peft_model.save_pretrained(folder, safe_serialization=True, selected_adapters=[model.peft_model.active_adapter])
    config = json.loads((folder / "adapter_config.json").read_text())
    _write_adapter_config(config, base_model, folder)  # peft names the folder it saw the backbone loaded from
    _write_head(model.head, folder)
    update = {"adapter_bytes": sum((folder / f).stat().st_size for f in WEIGHT_FILES),
              "backbone_source": str(model.backbone.path)}
    return _write_card(card.model_copy(update=update), folder, base_model, model.head)


def _write_adapter_config(config: dict, base_model: str, folder: Path) -> None:
    config = {**config, "base_model_name_or_path": base_model}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def save_portable(model: Trained, card: AdapterCard, output: str | Path, base_model: str | None = None) -> Path:
    """An adapter loaded from the store (`loading.load_adapter`) in the new folder `output`, written as
    the store writes its own (peft's files, head, card, model card) and naming `base_model` (default:
    its backbone's hub id, else its folder): for peft on other machines."""
    return _new_folder(output, lambda staging: _write_adapter(model, card, staging, base_model))


def save_lora_files(stored: "StoredAdapter", output: str | Path, base_model: str) -> Path:
    """adapter_config.json (naming `base_model`) and adapter_model.safetensors of an adapter
    `read_adapter` read, alone in the new folder `output`: the layout vLLM's --lora-modules and
    LoRAX read, with nothing else beside them."""
    def write(staging: Path) -> None:
        _write_adapter_config(stored.adapter_config, base_model, staging)
        save_file(stored.tensors, staging / "adapter_model.safetensors", metadata={"format": "pt"})

    return _new_folder(output, write)


def save_merged(model, tokenizer, head: nn.Module, card: AdapterCard, output: str | Path, base_model: str,
                sentence: SentenceSettings | None = None, max_length: int = 512) -> Path:
    """A merged model (`merge.merge_adapter`: a transformers model with the adapter folded into its
    weights) in the new folder `output`: its files and its tokenizer's, head.safetensors, card.json
    and a model card naming `base_model`; given `sentence` (an encoder's head pooling), the files of a
    sentence-transformers folder that embeds texts of up to `max_length` tokens as that head pools them.
    `read_merged` reads it back."""
    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _write_head(head, staging)
        if sentence is not None:
            write_sentence_settings(staging, sentence, model.config.hidden_size, max_length)
        library = "transformers" if sentence is None else "sentence-transformers"
        _write_card(card, staging, base_model, head, library)

    return _new_folder(output, write)


def _new_folder(output: str | Path, write: Callable[[Path], object]) -> Path:
    """`write` fills a hidden staging folder beside `output`, which is then renamed to `output`;
    an existing `output` is refused (exports never replace anything)."""
    output = Path(output)
    if output.exists():
        raise StoreError(f"{output} exists; exports are written to a new folder")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.saving-"))
    try:
        write(staging)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def _write_head(head: nn.Module, folder: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, folder / "head.safetensors")


def _write_card(card: AdapterCard, folder: Path, base_model: str, head: nn.Module | None = None,
                library: str | None = "peft") -> AdapterCard:
    """card.json, and README.md: the model card (`model_card.model_card`), keeping what peft wrote there."""
    card = card.model_copy(update={"created": card.created or datetime.now(timezone.utc).isoformat(timespec="seconds")})
    (folder / "card.json").write_text(card.model_dump_json(indent=2))
    readme = folder / "README.md"
    kept = readme.read_text() if readme.is_file() else None
    readme.write_text(model_card(card, base_model, library, kept, head))
    return card


def swap_into_place(new: Path, target: Path) -> None:
    """Put the folder `new` at `target`, holding the name's lock (`adapter_lock`); afterwards `new`
    holds the old `target`, if there was one (the caller removes it, or swaps back)."""
    with adapter_lock(target):
        _swap(new, target)


def _swap(new: Path, target: Path) -> None:
    """`swap_into_place` under a lock already held. Where the OS offers it (Linux) the two are exchanged
    in one step, so that readers always find an adapter under the name. Elsewhere the old one is moved
    aside first (a kill between the renames leaves it aside; the next save of the name puts it back)."""
    if not target.exists():
        new.rename(target)
    elif not _exchange(new, target):
        aside = target.with_name(f".{target.name}.replaced-{_owner()}")
        target.rename(aside)
        new.rename(target)
        aside.rename(new)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 with RENAME_EXCHANGE); False where the OS, its C library or
    the filesystem does not offer it."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _tidy_leftovers(task_dir: Path, name: str) -> None:
    """Clear what a save of NAME killed mid-way left in its task folder (under NAME's lock): a staging
    folder is removed; an adapter it had moved aside is put back when nothing replaced it. Saves still
    running are left alone (their process id is in the name), and so are other machines' (a shared
    store): whether they still run cannot be told from here."""
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
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def verify(folder: str | Path, backbone: Backbone | None = None) -> list[str]:
    """Problems with an adapter folder; empty when it is complete and its files are readable, and,
    given a backbone, when it fits that backbone as `read_adapter` checks it. An ensemble's problems
    are its members', each named by its folder (members/<i>: ...)."""
    folder = Path(folder)
    card = _card_if_readable(folder)
    if card is not None and card.members is not None:
        return _ensemble_problems(folder, card, backbone)
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
    return problems or _refusal(read_adapter, folder, backbone)


def _refusal(reader: Callable, folder: Path, backbone: Backbone | None) -> list[str]:
    """Why `reader` (read_adapter, read_ensemble) refuses a folder whose files are sound, given a backbone."""
    if backbone is None:
        return []
    try:
        reader(folder, backbone)
    except StoreError as error:
        return [str(error)]
    return []


def _card_if_readable(folder: Path) -> AdapterCard | None:
    try:
        return read_card(folder)
    except StoreError:
        return None


def _ensemble_problems(folder: Path, card: AdapterCard, backbone: Backbone | None) -> list[str]:
    problems = [f"{member.relative_to(folder)}: {problem}"
                for member in member_folders(folder, card) for problem in verify(member)]
    if not card.members:
        problems.append("an ensemble card that lists no members")
    return problems or _refusal(read_ensemble, folder, backbone)


def verify_folders(folders: list[Path], backbone: str | None = None, check_fit: bool = True
                   ) -> tuple[dict[Path, list[str]], dict[Path, str]]:
    """`verify` for many folders: the problems of each, and why a folder's fit was not checked. The
    fit is checked against `backbone`, else against each card's own backbone where it loads; each
    backbone loads once."""

    loaded: dict[str, Backbone | str] = {}
    report, unchecked = {}, {}
    for folder in folders:
        report[folder] = problems = verify(folder)
        if problems or not check_fit:
            continue
        name = backbone or read_card(folder).backbone
        if name not in loaded:
            try:
                loaded[name] = load_backbone(name)
            except AdapterlabError as error:
                if backbone is not None:
                    raise
                loaded[name] = str(error)
        if isinstance(loaded[name], str):
            unchecked[folder] = loaded[name]
        else:
            report[folder] = verify(folder, loaded[name])
    return report, unchecked


class BackboneMismatch(StoreError):
    """An adapter trained on another backbone than the one asked to serve it."""


@dataclass
class StoredAdapter:
    """An adapter read and checked for one backbone: card, recipe, PEFT config, adapter tensors, and
    its head, built for that backbone and loaded."""

    folder: Path
    card: AdapterCard
    recipe: Recipe
    adapter_config: dict
    tensors: dict[str, torch.Tensor]
    head: nn.Module

    @property
    def nbytes(self) -> int:
        tensors = (*self.tensors.values(), *self.head.state_dict().values())
        return sum(t.numel() * t.element_size() for t in tensors)


def check_folder(folder: str | Path) -> None:
    """Refuse a folder whose files `verify` finds incomplete or unreadable, naming every problem (a
    check that needs no backbone: done before one loads)."""
    problems = verify(folder)
    if problems:
        raise StoreError(f"adapter {folder} is unusable: {'; '.join(problems)}")


def read_adapter(folder: str | Path, backbone: Backbone) -> StoredAdapter:
    """The one way an adapter reaches a model (engine, merge, combine, server, peft): each file read
    once, safetensors only, and everything checked before anything serves it: the card and its recipe,
    the backbone's fingerprint, the method's tensors against the backbone's modules and the recipe's
    rank, finite weights, the head's shape against the labels. Every problem is named in one line."""
    folder = Path(folder)
    card = read_card(folder)
    _check_backbone(card, backbone)
    if card.members is not None:
        raise StoreError(f"adapter {card.task}/{card.name} is an ensemble of {len(card.members)} members: the engine "
                         "serves it; merging, combining and loading into peft take a single adapter")
    return _read_checked(folder, card, backbone, merged=False)


def read_merged(folder: str | Path) -> tuple[Backbone, StoredAdapter]:
    """A merged model's folder (`save_merged`): the folder loaded as the backbone, its adapter folded
    into the weights, and its card and head read and checked as `read_adapter` checks them."""
    folder = Path(folder)
    card = read_card(folder)
    if "merged_from" not in (card.model_extra or {}):
        raise StoreError(f"{folder}: not a merged model (its card names no merged_from; adapters load with "
                         "their backbone)")
    backbone = load_backbone(str(folder))
    return backbone, _read_checked(folder, card, backbone, merged=True)


def _read_checked(folder: Path, card: AdapterCard, backbone: Backbone, merged: bool) -> StoredAdapter:
    name = f"{card.task}/{card.name}"
    try:
        recipe = Recipe.model_validate(card.recipe)
    except ValidationError as error:
        raise StoreError(f"adapter {name} cannot be served on {backbone.name!r}: the recipe in its card.json "
                         f"does not validate ({describe_errors(error)})") from None
    adapter_config, tensors, head_tensors = _read_files(folder, name, merged)
    problems = (_weight_problems(card, head_tensors) if merged
                else _fit_problems(card, recipe, adapter_config, tensors, head_tensors, backbone))
    head = None
    if not problems:
        try:
            head = build_head(recipe.head, backbone, card.labels, card.labels, head_tensors)
        except HeadMismatch as error:
            problems.append(f"head.safetensors {error}")
        except AdapterlabError as error:
            problems.append(str(error))
    if problems:
        raise StoreError(f"adapter {name} cannot be served on {backbone.name!r}: {'; '.join(problems)}")
    return StoredAdapter(folder, card, recipe, adapter_config, tensors, head.eval())


def _read_files(folder: Path, name: str, merged: bool) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The only reader of an adapter's files: adapter_config.json, adapter_model.safetensors and
    head.safetensors, each read once and parsed in memory (a merged model's folder: its head alone)."""
    try:
        adapter_config = {} if merged else json.loads((folder / "adapter_config.json").read_text())
        tensors = {} if merged else load((folder / "adapter_model.safetensors").read_bytes())
        return adapter_config, tensors, load((folder / "head.safetensors").read_bytes())
    except (SafetensorError, OSError, ValueError) as error:
        raise StoreError(f"adapter {name} is unusable: {type(error).__name__}: {error}") from None


def read_ensemble(folder: str | Path, backbone: Backbone) -> list[StoredAdapter]:
    """An ensemble's members, each read and checked as `read_adapter` reads a single adapter, and
    checked to answer for the ensemble's labels; a damaged member is named."""
    folder = Path(folder)
    card = read_card(folder)
    name = f"{card.task}/{card.name}"
    _check_backbone(card, backbone)
    if not card.members:
        raise StoreError(f"adapter {name} is not an ensemble (its card lists no members)")
    members = []
    for member in member_folders(folder, card):
        where = f"ensemble {name}, member {member.relative_to(folder)}"
        try:
            stored = read_adapter(member, backbone)
        except BackboneMismatch as error:
            raise BackboneMismatch(f"{where}: {error}") from None
        except StoreError as error:
            raise StoreError(f"{where}: {error}") from None
        if stored.card.labels != card.labels or stored.card.kind != "classify":
            raise StoreError(f"{where}: it classifies into {stored.card.labels}, the ensemble into {card.labels}")
        members.append(stored)
    return members


def _check_backbone(card: AdapterCard, backbone: Backbone) -> None:
    if card.backbone_fingerprint != backbone.fingerprint:
        raise BackboneMismatch(
            f"adapter {card.task}/{card.name} was trained on backbone {card.backbone!r} "
            f"({card.backbone_fingerprint[:19]}…), not on the loaded backbone {backbone.name!r} "
            f"({backbone.fingerprint[:19]}…)")


def _fit_problems(card, recipe, adapter_config, tensors, head_tensors, backbone) -> list[str]:
    if card.method not in METHODS:
        return [f"unknown method {card.method!r} (known: {', '.join(METHODS)})"]
    if recipe.method.name != card.method:
        return [f"card.json names method {card.method!r}, its recipe {recipe.method.name!r}"]
    problems = method_module(card.method).fit_problems(tensors, adapter_config, recipe.method, backbone)
    return problems + _weight_problems(card, {**tensors, **head_tensors})


def _weight_problems(card: AdapterCard, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Weights that are not finite, and labels without their descriptions."""
    problems = []
    broken = _not_finite(tensors)
    if broken:
        problems.append(f"weights that are not finite (NaN or inf): {', '.join(sorted(broken)[:3])}")
    if len(card.label_descriptions) != len(card.labels):
        problems.append(f"{len(card.labels)} labels but {len(card.label_descriptions)} label descriptions")
    return problems


def _not_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of tensors holding NaN or inf. A sum per tensor screens them first: NaN and inf survive
    a sum, and a hundred small sums cost a cold load less than a hundred elementwise checks."""
    floats = {key: t for key, t in tensors.items() if t.is_floating_point()}
    if not floats or torch.stack([t.float().sum() for t in floats.values()]).isfinite().all():
        return []
    return [key for key, t in floats.items() if not t.isfinite().all()]  # (a sum can overflow: look closer)
