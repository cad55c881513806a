"""Adapter cards: what each STORE/TASK/NAME folder says it is, read from its card.json alone.

Listing, showing and resolving adapters needs no weights, so this module imports no torch: the
command line answers `adapters list` and `adapters show` quickly. Reading the weights (and checking
them against a backbone) is `store`'s, which re-exports every name here.
"""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from adapterlab.errors import AdapterlabError
from adapterlab.names import name_problem

MEMBERS = "members"  # an ensemble's member folders: members/0, members/1, ...


class StoreError(AdapterlabError):
    """An adapter folder that is missing, damaged, or does not fit the backbone."""


class AdapterCard(BaseModel):
    """What an adapter is: enough to reload and judge it without asking the caller anything."""

    model_config = ConfigDict(extra="allow")
    task: str
    name: str
    kind: Literal["classify", "generate"] = "classify"  # generate: it writes text (no labels, no head weights)
    labels: list[str]
    label_descriptions: list[str]
    backbone: str
    backbone_fingerprint: str
    # the folder the backbone was loaded from, where it was trained (adapter_config.json names its hub id)
    backbone_source: str | None = None
    method: str
    k: int | None
    seed: int
    recipe: dict
    # the digest of the settings that change the trained adapter (Recipe.settings_digest, the default name's
    # last part): equal for two runs of the same settings; None on cards written before it was recorded
    settings_digest: str | None = None
    metrics: dict[str, float] = {}
    trainable_params: int
    backbone_params: int
    adapter_bytes: int = 0
    train_seconds: float | None = None
    # training.select: the settings chosen by cross-validation on the k-shot rows, their estimate beside
    # the zero-shot start's (below_zero_shot), whether it fell back to that start (crossval.Selection.record)
    selection: dict | None = None
    # training.self_train: the setting ("k=16 labelled + 1000 unlabeled"), the pseudo-labels kept per class
    # and round, the seconds (self_training.SelfTraining.record)
    self_training: dict | None = None
    # training.ensemble: one entry per member folder (members/<i>), in order: its seed, train_seconds and
    # test metrics; metrics above are the ensemble's own (the mean of the members' probabilities)
    members: list[dict] | None = None
    # training.init_from: the stored adapter it started from (source), how it was chosen (named, or auto:
    # every candidate's start accuracy on the k-shot rows beside the zero-shot start's, the sources tried)
    init_from: dict | None = None
    created: str = ""

    @field_validator("task", "name")
    @classmethod
    def _plain(cls, value: str, info) -> str:
        problem = name_problem(value)
        if problem:
            raise ValueError(f"{info.field_name} {value!r} {problem}")
        return value


def check_store(store: str | Path) -> None:
    """Refuse a store that is not a folder, naming it as resolved, before anything reads or loads."""
    folder = Path(store)
    if not folder.is_dir():
        state = "a file" if folder.exists() else "not found"
        raise StoreError(f"no adapter store at {folder.resolve()} ({state}): expected a folder of TASK/NAME "
                         "adapter folders, as `adapterlab train` writes them")


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
    parts = reference.split("/")
    if not 1 <= len(parts) <= 2 or any(name_problem(part) for part in parts):
        raise StoreError(f"no adapter folder {reference!r}, and it is not TASK/NAME (or TASK) in the store: "
                         f"each part {name_problem('')}")
    check_store(store)
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
    """An adapter folder's card, validated; StoreError names a missing or corrupt one."""
    file = Path(folder) / "card.json"
    try:
        return AdapterCard.model_validate_json(file.read_text())
    except FileNotFoundError:
        raise StoreError(f"{folder}: not an adapter folder (no card.json)") from None
    except (ValidationError, ValueError) as error:
        raise StoreError(f"{file}: corrupt card ({str(error).splitlines()[0]})") from None


def member_folders(folder: str | Path, card: AdapterCard) -> list[Path]:
    """An ensemble's member folders, in the order its card lists them."""
    return [Path(folder) / MEMBERS / str(i) for i in range(len(card.members or ()))]
