"""Ensembles (training.ensemble): N members on the same k-shot rows stored as one adapter; the engine's
answer is the mean of the members' probabilities, alone or in mixed batches; bad uses are refused."""

import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adapterlab.backbones import load_backbone
from adapterlab.cli import app
from adapterlab.data import load_task
from adapterlab.engine import Engine, Request
from adapterlab.loading import load_adapter
from adapterlab.merge import combine_adapters, merge_adapter
from adapterlab.recipe import DataConfig, RecipeError, load_recipe, validate_recipe
from adapterlab.store import StoreError, read_card, verify
from adapterlab.training import train
from conftest import ROOT, assert_answer, assert_beats_its_start, shared, tiny_recipe

TEXTS = ["the soup was cold", "loved every minute", "what a dull film", "a gorgeous, moving story"]
METHODS = {"lora": {"name": "lora", "r": 4}, "prefix": {"name": "prefix_tuning", "num_virtual_tokens": 4}}


@pytest.fixture(scope="module")
def store(tiny_bert, tmp_path_factory):
    """Two ensembles of 3 (LoRA and prefix members), a single adapter of another task."""
    store = tmp_path_factory.mktemp("ensemble-store")
    for name, method in METHODS.items():
        raw = tiny_recipe(tiny_bert, store, method=method, training={"max_steps": 4, "lr": 0.05, "ensemble": 3},
                          output={"name": name})
        train(validate_recipe(raw), show_progress=False)
    train(validate_recipe(tiny_recipe(tiny_bert, store, task="topic", data={"path": "demo:topic"},
                                      output={"name": "single"})), show_progress=False)
    return store


def probabilities(predictions) -> torch.Tensor:
    return torch.tensor([list(p.scores.values()) for p in predictions])


def test_the_card_lists_the_members(store):
    card = read_card(store / "sentiment" / "lora")
    assert [member["seed"] for member in card.members] == [0, 1, 2]
    assert all(member["metrics"]["accuracy"] >= 0 and member["train_seconds"] > 0 for member in card.members)
    members = [read_card(store / "sentiment" / "lora" / "members" / str(i)) for i in range(3)]
    assert [m.recipe["training"]["seed"] for m in members] == [0, 1, 2]
    assert card.recipe["training"]["ensemble"] == 3
    assert card.adapter_bytes == sum(m.adapter_bytes for m in members)
    assert card.trainable_params == sum(m.trainable_params for m in members)
    assert verify(store / "sentiment" / "lora") == []


@pytest.mark.parametrize("name", METHODS)
def test_ensemble_answers_the_mean_of_its_members_alone_and_in_a_mixed_batch(store, tiny_bert, name):
    engine = Engine(tiny_bert, store, dtype="float32")
    folder = store / "sentiment" / name
    members = [probabilities(Engine(tiny_bert, store, dtype="float32").predict(str(folder / "members" / str(i)), TEXTS))
               for i in range(3)]
    assert not torch.allclose(members[0], members[1], atol=1e-3)  # the seeds made different members
    mean = torch.stack(members).mean(0)
    alone = probabilities(engine.predict(f"sentiment/{name}", TEXTS))
    assert torch.allclose(alone, mean, atol=1e-5)
    requests = [Request(f"sentiment/{name}", text) for text in TEXTS]
    requests += [Request("topic/single", text) for text in TEXTS] + [Request(None, t, labels=("a", "b")) for t in TEXTS]
    mixed = engine.predict_batch(requests[::-1])[::-1]
    assert torch.allclose(probabilities(mixed[:4]), mean, atol=1e-5)
    assert torch.allclose(probabilities(mixed[4:8]), probabilities(engine.predict("topic/single", TEXTS)), atol=1e-5)


def test_members_equal_their_peft_form(store, tiny_bert):
    engine = Engine(tiny_bert, store, dtype="float32")
    member = store / "sentiment" / "lora" / "members" / "2"
    model, _ = load_adapter(member, load_backbone(tiny_bert))
    assert torch.allclose(probabilities(engine.predict(str(member), TEXTS)), model.scores(TEXTS), atol=1e-5)


def test_the_http_server_serves_an_ensemble_as_the_engine_does(store, tiny_bert):
    from fastapi.testclient import TestClient

    from adapterlab.server import Settings, create_app

    expected = Engine(tiny_bert, store, dtype="float32").predict("sentiment/lora", TEXTS)
    with TestClient(create_app(store, tiny_bert, Settings(dtype="float32"))) as client:
        response = client.post("/v1/classify", json={"adapter": "sentiment/lora", "inputs": TEXTS})
        listed = client.get("/v1/adapters").json()
    assert response.status_code == 200, response.text
    for answer, prediction in zip(response.json()["predictions"], expected):
        assert_answer(answer, prediction)
    assert "sentiment/lora" in json.dumps(listed)


def test_an_uploaded_ensemble_archive_serves_as_the_stored_one(store, tiny_bert, tmp_path):
    """POST /v1/adapters with a .zip of an ensemble folder (its card, members/<i>/ each a whole adapter)."""
    from fastapi.testclient import TestClient

    from adapterlab.server import Settings, create_app

    folder = store / "sentiment" / "prefix"
    files = {f"prefix/{path.relative_to(folder).as_posix()}": path.read_bytes()
             for path in folder.rglob("*") if path.is_file()}
    assert any(name.startswith("prefix/members/2/") for name in files)
    expected = Engine(tiny_bert, store, dtype="float32").predict("sentiment/prefix", TEXTS)
    (tmp_path / "served").mkdir()
    settings = Settings(dtype="float32", admin_token="admin")
    with TestClient(create_app(tmp_path / "served", tiny_bert, settings), headers={"Authorization": "Bearer admin"}) as client:
        stray = {**files, "prefix/members/x/head.safetensors": files["prefix/members/0/head.safetensors"]}
        refused = client.post("/v1/adapters", files={"file": ("e.zip", zip_of(stray))})
        created = client.post("/v1/adapters", files={"file": ("e.zip", zip_of(files))})
        response = client.post("/v1/classify", json={"adapter": "sentiment/prefix", "inputs": TEXTS})
    assert refused.status_code == 400 and "members/<i>/" in refused.json()["error"]
    assert created.status_code == 201, created.text
    assert [answer["label"] for answer in response.json()["predictions"]] == [p.label for p in expected]
    assert verify(tmp_path / "served" / "sentiment" / "prefix") == []


def zip_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as packed:
        for name, data in files.items():
            packed.writestr(name, data)
    return buffer.getvalue()


def test_a_damaged_member_is_named(store, tiny_bert, tmp_path):
    copy = tmp_path / "sentiment" / "lora"
    shutil.copytree(store / "sentiment" / "lora", copy)
    (copy / "members" / "1" / "head.safetensors").write_bytes(b"not safetensors")
    assert any(problem.startswith("members/1: head.safetensors is corrupt") for problem in verify(copy))
    with pytest.raises(StoreError, match="unusable"):
        Engine.for_adapter("sentiment/lora", tmp_path)
    with pytest.raises(StoreError, match=r"ensemble sentiment/lora, member members/1: .*unusable"):
        Engine(tiny_bert, tmp_path, dtype="float32").predict("sentiment/lora", TEXTS)


def test_an_ensemble_is_not_merged_combined_or_asked_to_generate(store, tmp_path):
    with pytest.raises(StoreError, match="is an ensemble of 3 members"):
        merge_adapter(store, "sentiment/lora", tmp_path / "merged")
    with pytest.raises(StoreError, match="an ensemble cannot be combined"):
        combine_adapters(store, ["sentiment/lora", "sentiment/prefix"], [0.5, 0.5], "linear", "both")
    assert not (tmp_path / "merged").exists() and not (store / "sentiment" / "both").exists()


@pytest.mark.parametrize("value, fragment", [(0, "greater than or equal to 1"), ("three", "valid integer")])
def test_a_bad_ensemble_size_is_refused(tiny_bert, tmp_path, value, fragment):
    with pytest.raises(RecipeError, match=f"training.ensemble: .*{fragment}"):
        validate_recipe(tiny_recipe(tiny_bert, tmp_path, training={"ensemble": value}))


def test_generation_ensembles_are_refused_in_one_line(tiny_llama, tmp_path):
    raw = tiny_recipe(tiny_llama, tmp_path, head={"type": "generate"}, training={"ensemble": 3},
                      data={"path": "demo:sentiment", "target_field": "label"})
    with pytest.raises(RecipeError, match="training.ensemble 3 averages label probabilities: it needs a "
                                          "classification task") as error:
        validate_recipe(raw)
    assert "\n" not in str(error.value)


def test_cli_trains_an_ensemble_and_lists_it(tiny_bert, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(tiny_recipe(tiny_bert, tmp_path / "store")))
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(recipe), "--ensemble", "2", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    trained = json.loads(result.output.strip().splitlines()[-1])
    assert Path(trained["adapter_path"]).name.startswith("lora-k4-s0-ens2-")
    listed = runner.invoke(app, ["adapters", "list", "--store", str(tmp_path / "store"), "--json"])
    assert json.loads(listed.output.strip().splitlines()[-1])["adapters"][0]["members"] == 2
    refused = runner.invoke(app, ["train", str(recipe), "--ensemble", "-1"])
    assert refused.exit_code == 2 and "training.ensemble" in refused.output


@pytest.mark.slow
def test_minilm_ensemble_beats_zero_shot_and_serves_its_stored_metrics(tmp_path):
    """MPQA, k=8, three members of the shipped tied recipe (10 epochs each), 200 test rows."""
    recipe = load_recipe(ROOT / "recipes" / "sst2-lora-minilm-tied.yaml", [
        "task=mpqa", f"data.path={shared('mpqa')}", "data.k=8", "data.test_limit=200", "training.epochs=10",
        "training.ensemble=3", f"output.store={tmp_path}"])
    train(recipe, show_progress=False)
    reference = f"mpqa/{recipe.adapter_name}"
    card = read_card(tmp_path / reference)
    assert len(card.members) == 3
    engine = Engine("minilm", tmp_path, dtype="float32")
    rows = load_task(DataConfig.model_validate({**card.recipe["data"], "k": None})).test
    assert len(rows) == 200
    assert_beats_its_start(engine, reference, rows)  # its zero-shot start, on the same test rows
    served = engine.evaluate(reference, shared("mpqa"), limit=200)
    assert served["rows"] == 200
    assert served["accuracy"] == pytest.approx(card.metrics["accuracy"], abs=1e-9)
    assert served["macro_f1"] == pytest.approx(card.metrics["macro_f1"], abs=1e-9)
