"""Two writers of one adapter name at once, in real processes: `train` runs and a server upload end with
one whole adapter and a one-line refusal for the writer that must not replace it."""

import multiprocessing
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import adapterlab.store as store_module
from adapterlab.backbones import load_backbone
from adapterlab.cli import app
from adapterlab.loading import load_adapter
from adapterlab.recipe import load_recipe
from adapterlab.store import StoreError, read_card, save_adapter, swap_into_place, verify
from conftest import tiny_recipe

FORK = multiprocessing.get_context("fork")  # the children inherit the loaded model


def train_command(recipe: Path, *options: str):
    return CliRunner().invoke(app, ["train", str(recipe), "--quiet", *options])


@pytest.fixture(scope="module")
def first_run(tiny_bert, tmp_path_factory) -> tuple[Path, Path]:
    """(A recipe file, the adapter folder its first `adapterlab train` stored.)"""
    folder = tmp_path_factory.mktemp("writers")
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_bert, folder / "store", training={"max_steps": 1})))
    result = train_command(recipe)
    assert result.exit_code == 0, result.output
    return recipe, folder / "store" / "sentiment" / load_recipe(recipe).adapter_name


def test_train_refuses_a_taken_name_before_training_unless_told_to_overwrite(first_run):
    recipe, folder = first_run
    (folder / "note.txt").write_text("the first run's folder")
    refused = train_command(recipe)
    assert refused.exit_code == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == (f"error: the same settings were already trained: {folder} "
                                            "(pass --overwrite to replace it)")
    assert (folder / "note.txt").exists()

    replaced = train_command(recipe, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert not (folder / "note.txt").exists() and verify(folder) == []
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


SWAPPING = FORK.Event()  # set by a saving child once it has looked at the name and is about to swap


def _save_when_both_are_ready(barrier, results, model, card, store: Path, index: int, overwrite: bool) -> None:
    """In a forked child: writer `index` (its head moved by `index`, its card marked) saves at the barrier.
    Its swap waits a moment, so that two writers without a lock would both find the name free."""
    with torch.no_grad():
        for parameter in model.head.parameters():
            parameter.add_(index)
    swap = store_module._swap

    def slow_swap(new: Path, target: Path) -> None:
        SWAPPING.set()
        time.sleep(0.5)
        swap(new, target)

    store_module._swap = slow_swap
    barrier.wait()
    try:
        save_adapter(model, card.model_copy(update={"metrics": {"writer": float(index)}}), store, overwrite=overwrite)
        results.put((index, "saved"))
    except StoreError as error:
        results.put((index, f"refused: {error}"))
    except Exception as error:  # anything else is what the lock must prevent
        results.put((index, f"failed: {error!r}"))


def _run_writers(writers: list) -> dict[int, str]:
    barrier, results = FORK.Barrier(len(writers)), FORK.Queue()
    children = [FORK.Process(target=target, args=(barrier, results, *args)) for target, *args in writers]
    for child in children:
        child.start()
    outcomes = dict(results.get(timeout=120) for _ in children)
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    return outcomes


@pytest.fixture(scope="module")
def stored(first_run, tiny_bert):
    _, folder = first_run
    return load_adapter(folder, load_backbone(tiny_bert))


def _head_of(writer: int, model) -> dict[str, torch.Tensor]:
    return {key: value + writer for key, value in model.head.state_dict().items()}


def assert_one_whole_adapter_of(folder: Path, writer: int, model) -> None:
    assert verify(folder) == [] and read_card(folder).metrics == {"writer": float(writer)}
    head = load_file(folder / "head.safetensors")
    expected = _head_of(writer, model)
    assert head.keys() == expected.keys() and all(torch.equal(head[k], expected[k]) for k in head)
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no staging folder, no lock file


def test_of_two_runs_saving_one_new_name_one_wins_and_the_other_is_told(stored, tmp_path):
    model, card = stored
    store = tmp_path / "store"
    outcomes = _run_writers([(_save_when_both_are_ready, model, card, store, i, False) for i in (1, 2)])
    winners = [i for i, outcome in outcomes.items() if outcome == "saved"]
    assert len(winners) == 1, outcomes
    folder = store / card.task / card.name
    loser = outcomes[3 - winners[0]]
    assert loser == (f"refused: the same settings were already trained: {folder} (another run may have saved it "
                     "meanwhile): this run's adapter is discarded, not saved (pass --overwrite to replace it)")
    assert_one_whole_adapter_of(folder, winners[0], model)


def test_of_two_runs_allowed_to_overwrite_both_save_and_the_last_one_stays_whole(stored, tmp_path):
    model, card = stored
    store = tmp_path / "store"
    save_adapter(model, card.model_copy(update={"metrics": {"writer": 0.0}}), store)  # an older adapter
    outcomes = _run_writers([(_save_when_both_are_ready, model, card, store, i, True) for i in (1, 2)])
    assert outcomes == {1: "saved", 2: "saved"}
    folder = store / card.task / card.name
    assert_one_whole_adapter_of(folder, int(read_card(folder).metrics["writer"]), model)
    assert read_card(folder).metrics["writer"] in (1.0, 2.0)


def _upload_while_a_run_swaps(barrier, results, upload: Path, target: Path) -> None:
    """In a forked child: what the server does with an unpacked upload (its staging folder is swapped in),
    once the run beside it has looked at the name and is about to swap its own adapter in."""
    barrier.wait()
    assert SWAPPING.wait(timeout=60)
    swap_into_place(upload, target)
    shutil.rmtree(upload, ignore_errors=True)  # it now holds the adapter it replaced, if any
    results.put((0, "uploaded"))


def test_an_upload_during_a_runs_save_waits_and_then_replaces_it_whole(stored, tmp_path):
    model, card = stored
    store = tmp_path / "store"
    folder = store / card.task / card.name
    save_adapter(model, card.model_copy(update={"metrics": {"writer": 0.0}}), tmp_path / "elsewhere")
    upload = store / ".upload-test"
    shutil.copytree(tmp_path / "elsewhere" / card.task / card.name, upload)
    folder.parent.mkdir(parents=True)
    SWAPPING.clear()
    outcomes = _run_writers([(_upload_while_a_run_swaps, upload, folder),
                             (_save_when_both_are_ready, model, card, store, 1, False)])
    assert outcomes == {0: "uploaded", 1: "saved"}  # the run found the name free, and the upload came after it
    assert_one_whole_adapter_of(folder, 0, model)
    assert sorted(p.name for p in store.iterdir()) == [card.task]
