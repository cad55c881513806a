"""The adapter store on a tiny random BERT: atomic saves, verification, reload, refusals."""

import json
import multiprocessing
import os
import random
import shutil
import subprocess
import threading
import time

import pytest
import torch

import adapterlab.store as store_module
from adapterlab.backbones import load_backbone
from adapterlab.recipe import validate_recipe
from pydantic import ValidationError
from safetensors.torch import load_file

from adapterlab.errors import AdapterlabError
from adapterlab.loading import load_adapter
from adapterlab.merge import combine_adapters
from adapterlab.names import name_problem
from adapterlab.store import (AdapterCard, StoreError, list_adapters, read_card, resolve, save_adapter,
                              verify)
from adapterlab.training import train
from conftest import tiny_recipe


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    result = train(validate_recipe(tiny_recipe(tiny_bert, store)), show_progress=False)
    return store, result


def test_saved_folder_is_complete_and_peft_loadable(trained, tiny_bert):
    store, result = trained
    folder = result.adapter_path
    assert folder.parent == store / "sentiment" and folder.name.startswith("lora-k4-s0-")
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "card.json", "head.safetensors"]
    assert verify(folder) == []
    card = read_card(folder)
    assert card.labels == ["negative", "positive"] and card.k == 4 and card.method == "lora"
    assert card.backbone_fingerprint.startswith("sha256:") and card.recipe["data"]["k"] == 4
    assert card.adapter_bytes == result.adapter_bytes > 0
    assert card.settings_digest == folder.name.removeprefix("lora-k4-s0-")  # the name's last part
    assert set(card.metrics) == {"accuracy", "macro_f1"}
    from peft import PeftModel  # the standard loader reads our files as they are
    PeftModel.from_pretrained(load_backbone(tiny_bert).model, str(folder))


def test_adapter_files_name_the_base_model_as_other_machines_find_it(trained, tiny_bert):
    """adapter_config.json and the model card name the base model by its hub id where one is known, else
    by its folder; card.json keeps the folder it was loaded from; peft's card metadata stays, extended."""
    from dataclasses import replace

    from huggingface_hub import ModelCard

    _, result = trained
    folder = result.adapter_path
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_bert
    assert read_card(folder).backbone_source == tiny_bert
    metadata = ModelCard.load(folder / "README.md").data
    assert metadata.library_name == "peft" and metadata.base_model == tiny_bert
    assert "transformers" in metadata.tags  # peft's, kept
    assert {"adapterlab", "lora", "few-shot", "text-classification", f"base_model:adapter:{tiny_bert}"} <= set(
        metadata.tags)
    assert {r.metric_type: r.metric_value for r in metadata.eval_results} == result.metrics
    text = (folder / "README.md").read_text()
    assert "k = 4 examples per class, drawn with seed 0 from `demo:sentiment`" in text
    assert "Labels: negative, positive." in text and "\n- PEFT " in text

    backbone = load_backbone(tiny_bert)
    assert backbone.base_model == tiny_bert  # a local folder keeps its path
    assert replace(backbone, name="minilm").base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert replace(backbone, name="smollm2-135m").base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert replace(backbone, name="someone/tiny-bert").base_model == "someone/tiny-bert"  # a hub id stays


def test_reload_gives_identical_scores(trained, tiny_bert):
    store, result = trained
    texts = ["a lovely evening", "cold food and rude staff"]
    first, _ = load_adapter(result.adapter_path, load_backbone(tiny_bert))
    second, _ = load_adapter(resolve(store, "sentiment"), load_backbone(tiny_bert))
    assert torch.equal(first.scores(texts), second.scores(texts))


def test_crash_mid_save_leaves_store_valid(trained, tiny_bert, monkeypatch):
    store, result = trained
    before = [c.name for c in list_adapters(store)]

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(store_module, "save_file", crash)
    raw = tiny_recipe(tiny_bert, store, output={"name": "second"})
    with pytest.raises(KeyboardInterrupt):
        train(validate_recipe(raw), show_progress=False)
    assert [c.name for c in list_adapters(store)] == before
    assert not any(p.name.startswith(".") for p in (store / "sentiment").iterdir())
    assert verify(result.adapter_path) == []


def test_corrupt_weights_are_named(trained, tmp_path, tiny_bert):
    _, result = trained
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(result.adapter_path, broken)
    (broken / "head.safetensors").write_bytes(b"\x00garbage")
    problems = verify(broken)
    assert any("head.safetensors is corrupt" in p for p in problems)
    with pytest.raises(StoreError, match="unusable: head.safetensors is corrupt"):
        load_adapter(broken, load_backbone(tiny_bert))


def test_pickled_files_and_bad_cards_are_refused(trained, tmp_path):
    _, result = trained
    import shutil
    folder = tmp_path / "pickled"
    shutil.copytree(result.adapter_path, folder)
    (folder / "adapter_model.bin").write_bytes(b"anything")
    card = json.loads((folder / "card.json").read_text())
    del card["labels"]
    (folder / "card.json").write_text(json.dumps(card))
    problems = verify(folder)
    assert any("pickled" in p for p in problems) and any("corrupt card" in p for p in problems)


def test_other_backbone_is_refused(trained):
    _, result = trained
    with pytest.raises(StoreError, match=r"trained on backbone '.*tiny-bert.*' \(sha256:.*\), not on the loaded backbone 'minilm'"):
        load_adapter(result.adapter_path, load_backbone("minilm"))


def test_unknown_reference_and_path_escape(trained):
    store, _ = trained
    with pytest.raises(StoreError, match="no adapter 'nope'"):
        resolve(store, "nope")
    with pytest.raises(StoreError, match="not TASK/NAME"):
        resolve(store, "../sentiment/x")



def test_leftovers_of_a_killed_save_are_tidied(trained, tiny_bert):
    """A save killed between its steps leaves hidden folders; the next save of that name removes its
    staging folder, puts back an adapter it had moved aside, and leaves alone a running save's folder
    and another machine's (whose process ids mean nothing here)."""
    store, result = trained
    task_dir = store / "sentiment"
    dead = subprocess.Popen(["true"])
    dead.wait()
    here = store_module._host()
    shutil.copytree(result.adapter_path, task_dir / f".third.replaced-{dead.pid}@{here}")  # killed between renames
    (task_dir / f".third.saving-{dead.pid}@{here}-abc").mkdir()
    live = task_dir / f".third.saving-{os.getpid()}@{here}-live"
    elsewhere = task_dir / f".third.saving-{dead.pid}@another_machine-xyz"
    live.mkdir()
    elsewhere.mkdir()
    kept = sorted([live.name, elsewhere.name])
    hidden = lambda: sorted(p.name for p in task_dir.iterdir() if p.name.startswith(".third"))
    assert "third" not in [c.name for c in list_adapters(store)]

    with store_module.adapter_lock(task_dir / "third"):  # what the next save of "third" does
        store_module._tidy_leftovers(task_dir, "third")
    assert verify(task_dir / "third") == [] and hidden() == kept
    train(validate_recipe(tiny_recipe(tiny_bert, store, output={"name": "third"})), show_progress=False)
    assert read_card(task_dir / "third").name == "third" and hidden() == kept
    live.rmdir()
    elsewhere.rmdir()


@pytest.mark.parametrize("bad", ["..", ".hidden", "a/b", "a\\b", "", "x" * 129, "tab\tname", "../src"])
def test_one_rule_for_names_in_recipes_cards_the_store_and_combine(trained, tiny_bert, bad):
    store, result = trained
    assert name_problem(bad) and name_problem("lora-k16-s0.v2") is None
    with pytest.raises(AdapterlabError, match="must be a plain name"):
        validate_recipe(tiny_recipe(tiny_bert, store, task=bad))
    card = read_card(result.adapter_path)
    with pytest.raises(ValidationError, match="must be a plain name"):
        AdapterCard.model_validate({**card.model_dump(), "name": bad})
    model, _ = load_adapter(result.adapter_path, load_backbone(tiny_bert))
    with pytest.raises(AdapterlabError, match="must be a plain name"):  # a copied card skips its validators
        save_adapter(model, card.model_copy(update={"task": bad}), store)
    with pytest.raises(AdapterlabError, match="must be a plain name"):
        combine_adapters(store, [f"sentiment/{card.name}"] * 2, [0.5, 0.5], "linear", "ok", task=bad)
    assert sorted(p.name for p in store.iterdir()) == ["sentiment"]  # nothing written outside


def _save_forever(model, card, store) -> None:
    """In a forked child: replace the adapter again and again until killed."""
    while True:
        save_adapter(model, card, store)


def test_a_replacing_save_killed_anywhere_never_leaves_the_name_empty(trained, tiny_bert, tmp_path):
    """Saves of one name killed with SIGKILL at random moments, 40 times, while a reader looks at the
    name without pause: it always finds a complete adapter there (the folders are exchanged in one
    step), and each next save tidies what the killed one left."""
    _, result = trained
    model, card = load_adapter(result.adapter_path, load_backbone(tiny_bert))
    store = tmp_path / "store"
    folder, _ = save_adapter(model, card, store)
    stop, missing = threading.Event(), []

    def read():
        while not stop.is_set():
            try:
                read_card(folder)
                load_file(folder / "head.safetensors")
            except (StoreError, OSError, ValueError) as error:
                missing.append(repr(error))

    reader = threading.Thread(target=read)
    reader.start()
    random.seed(0)
    try:
        for _ in range(40):
            child = multiprocessing.get_context("fork").Process(target=_save_forever, args=(model, card, store))
            child.start()
            time.sleep(random.uniform(0.01, 0.3))
            child.kill()
            child.join()
            assert verify(folder) == [] and read_card(folder).name == card.name
    finally:
        stop.set()
        reader.join()
    assert missing == []
    with store_module.adapter_lock(folder):  # what the next save does; a killed holder's lock file goes too
        store_module._tidy_leftovers(folder.parent, folder.name)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]
