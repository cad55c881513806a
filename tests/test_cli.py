"""The command line, in-process: JSON outputs on a tiny BERT, and one-line errors for bad input."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from adapterlab.cli import app
from adapterlab.data import load_task
from adapterlab.engine import Engine
from adapterlab.recipe import DataConfig
from conftest import shared, tiny_recipe

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def last_json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_bert, folder / "store")))
    out = last_json(invoke("train", recipe, "--json", "--quiet", "--set", "training.max_steps=2"))
    return folder / "store", out


def test_train_json(trained):
    store, out = trained
    assert set(out) == {"adapter_path", "trainable_params", "total_params", "adapter_bytes", "train_seconds",
                        "metrics"}
    assert {"accuracy", "macro_f1"} <= set(out["metrics"]) and out["adapter_bytes"] > 0
    assert 0 < out["trainable_params"] < 0.05 * out["total_params"]


def test_predict_eval_and_adapters_commands(trained, tiny_bert):
    store, out = trained
    engine = Engine(tiny_bert, store, dtype="float32")
    predicted = last_json(invoke("predict", out["adapter_path"], "great", "awful", "--json", "--dtype", "float32"))
    expected = engine.predict(out["adapter_path"], ["great", "awful"])
    assert [p["label"] for p in predicted["predictions"]] == [p.label for p in expected]
    assert predicted["predictions"][0]["scores"] == pytest.approx(expected[0].scores, abs=1e-6)
    evaluated = last_json(invoke("eval", "sentiment/lora-k4-s0", "--store", store, "--data", "demo:sentiment",
                                 "--limit", "6", "--json", "--dtype", "float32"))
    rows = load_task(DataConfig(path="demo:sentiment", k=None)).test.select(range(6))
    right = sum(p.label == ["negative", "positive"][y] for p, y in zip(engine.predict("sentiment/lora-k4-s0",
                                                                                      rows.texts), rows.labels))
    assert evaluated["rows"] == 6 and evaluated["accuracy"] == right / 6
    listed = last_json(invoke("adapters", "list", "--store", store, "--json"))
    assert [(a["task"], a["name"]) for a in listed["adapters"]] == [("sentiment", "lora-k4-s0")]
    shown = last_json(invoke("adapters", "show", "sentiment", "--store", store, "--json"))
    assert shown["labels"] == ["negative", "positive"]
    assert last_json(invoke("adapters", "verify", "--store", store, "--json"))["ok"] is True


def assert_clean_error(result, fragment: str):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("content, overrides, fragment", [
    ("task: [oops\n", [], "malformed YAML"),
    (None, ["training.lrr=1"], "training.lrr: unknown key"),
    (None, ["training.epochs=ten"], "training.epochs"),
    (None, ["backbone=no-such-model"], "unknown backbone 'no-such-model'"),
    (None, ["data.path=missing/train.jsonl"], "data not found: missing/train.jsonl"),
    (None, ["data.k=40"], "has only 12 training examples, k=40"),
    (None, ["data.labels=[neg, pos]"], "differ from the expected labels"),
    (None, ["training.metrics=[precision]"], "would run code from the Hugging Face hub"),
    (None, ["task=.."], "must be a plain name"),
])
def test_bad_training_input_is_one_line_and_writes_nothing(tiny_bert, tmp_path, content, overrides, fragment):
    store = tmp_path / "store"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(content or yaml.safe_dump(tiny_recipe(tiny_bert, store)))
    result = invoke("train", recipe, "--quiet", *[a for o in overrides for a in ("--set", o)])
    assert_clean_error(result, fragment)
    assert not store.exists() or not any(store.rglob("*"))


def test_a_backbone_folder_that_is_not_a_model(tiny_bert, tmp_path):
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "notes.txt").write_text("hello")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(str(tmp_path / "not-a-model"), tmp_path / "store")))
    assert_clean_error(invoke("train", recipe, "--quiet"), "is not a Hugging Face model folder")


def test_data_that_is_not_utf8(tiny_bert, tmp_path):
    (tmp_path / "train.jsonl").write_bytes('{"text": "caf\u00e9", "label": 0}\n'.encode("latin-1"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_bert, tmp_path / "store", data={"path": str(tmp_path)})))
    assert_clean_error(invoke("train", recipe, "--quiet"), "train.jsonl: not UTF-8 text")


def test_yaml_words_reach_literal_fields_as_words(tiny_bert, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_bert, tmp_path / "store")))
    out = last_json(invoke("train", recipe, "--quiet", "--json", "--set", "training.mixed_precision=no"))
    assert json.loads((Path(out["adapter_path"]) / "card.json").read_text())["recipe"]["training"]["mixed_precision"] == "no"


def test_unknown_label_in_data(tiny_bert, tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "x", "label": "meh"}\n')
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_bert, tmp_path / "store",
                                                 data={"path": str(tmp_path), "labels": ["neg", "pos"]})))
    assert_clean_error(invoke("train", recipe, "--quiet"), "label 'meh' is not in the label list (neg, pos)")


def test_corrupt_adapter_file(trained, tmp_path):
    import shutil
    store, out = trained
    broken = tmp_path / "broken"
    shutil.copytree(out["adapter_path"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    assert_clean_error(invoke("predict", broken, "hello"), "adapter_model.safetensors is corrupt")
    verify = invoke("adapters", "verify", broken)
    assert verify.exit_code == 1 and "corrupt" in verify.stdout


def test_eval_with_labels_of_another_task(trained):
    store, out = trained
    assert_clean_error(invoke("eval", out["adapter_path"], "--data", shared("agnews")),
                       "differ from the expected labels")


def test_predict_with_adapter_option_and_batch_file(trained, tmp_path):
    store, out = trained
    single = last_json(invoke("predict", "--adapter", "sentiment/lora-k4-s0", "--store", store, "nice", "--json"))
    assert len(single["predictions"]) == 1
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"adapter": "sentiment/lora-k4-s0", "text": "nice"}\n'
                    '{"adapter": null, "text": "nice", "labels": ["cats", "dogs", "fish"]}\n')
    result = invoke("predict", "--batch", rows, "--store", store, "--output", tmp_path / "answers.jsonl")
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert answers[0]["label"] == single["predictions"][0]["label"]
    assert answers[0]["scores"] == pytest.approx(single["predictions"][0]["scores"], abs=1e-6)
    assert set(answers[1]["scores"]) == {"cats", "dogs", "fish"}
    rows.write_text('{"adapter": "sentiment/lora-k4-s0", "text": "nice"}\nnot json\n')
    assert_clean_error(invoke("predict", "--batch", rows, "--store", store), "rows.jsonl:2: expected a JSON object")
