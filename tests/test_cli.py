"""The command line, in-process: JSON outputs on a tiny BERT, and one-line errors for bad input."""

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from adapterlab.backbones import loading as backbone_loading
from adapterlab.cli import app
from adapterlab.data import load_task
from adapterlab.engine import Engine
from adapterlab.recipe import DataConfig
from conftest import ROOT, shared, tiny_recipe

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
    first = predicted["predictions"][0]
    assert set(first) == {"text", "label", "score", "scores", "truncated"} and first["text"] == "great"
    assert {s["label"]: s["score"] for s in first["scores"]} == pytest.approx(expected[0].scores, abs=1e-6)
    assert [s["score"] for s in first["scores"]] == sorted(expected[0].scores.values(), reverse=True)  # as HTTP answers
    name = Path(out["adapter_path"]).name
    evaluated = last_json(invoke("eval", f"sentiment/{name}", "--store", store, "--data", "demo:sentiment",
                                 "--limit", "6", "--json", "--dtype", "float32"))
    rows = load_task(DataConfig(path="demo:sentiment", k=None)).test.select(range(6))
    right = sum(p.label == ["negative", "positive"][y] for p, y in zip(engine.predict(f"sentiment/{name}",
                                                                                      rows.texts), rows.labels))
    assert evaluated["rows"] == 6 and evaluated["accuracy"] == right / 6
    listed = last_json(invoke("adapters", "list", "--store", store, "--json"))
    assert [(a["task"], a["name"]) for a in listed["adapters"]] == [("sentiment", name)]
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
    reference = f"sentiment/{Path(out['adapter_path']).name}"
    single = last_json(invoke("predict", "--adapter", reference, "--store", store, "nice", "--json"))
    assert len(single["predictions"]) == 1
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"adapter": reference, "text": "nice"}) + "\n"
                    '{"adapter": null, "text": "nice", "labels": ["cats", "dogs", "fish"]}\n')
    result = invoke("predict", "--batch", rows, "--store", store, "--output", tmp_path / "answers.jsonl")
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert answers[0]["label"] == single["predictions"][0]["label"]
    assert [s["label"] for s in answers[0]["scores"]] == [s["label"] for s in single["predictions"][0]["scores"]]
    assert [s["score"] for s in answers[0]["scores"]] == pytest.approx(
        [s["score"] for s in single["predictions"][0]["scores"]], abs=1e-6)
    assert {s["label"] for s in answers[1]["scores"]} == {"cats", "dogs", "fish"}
    assert set(answers[1]) == {"adapter", "text", "label", "score", "scores", "truncated"}
    rows.write_text(json.dumps({"adapter": reference, "text": "nice"}) + "\nnot json\n")
    assert_clean_error(invoke("predict", "--batch", rows, "--store", store), "rows.jsonl:2: expected a JSON object")


HEAVY = {"torch", "transformers", "peft", "sklearn", "datasets", "fastapi", "accelerate"}
# Runs the command line in a fresh process, then writes which heavy libraries it imported to argv[1].
CHECKED_RUN = """
import json, sys
from adapterlab.cli import app
try:
    app(sys.argv[2:], prog_name="adapterlab")
finally:
    with open(sys.argv[1], "w") as report:
        json.dump(sorted(set(sys.modules) & {heavy}), report)
"""


def run_checked(tmp_path, *args) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The command's process, and the heavy libraries it imported."""
    report = tmp_path / "imported.json"
    script = CHECKED_RUN.format(heavy=repr(HEAVY))
    done = subprocess.run([sys.executable, "-c", script, str(report), *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=120)
    return done, json.loads(report.read_text())


@pytest.mark.parametrize("args", [
    ["adapters", "list"], ["adapters", "show", "sentiment/x"], ["adapters", "verify"],
    ["predict", "sentiment/x", "hello"], ["eval", "sentiment/x", "--data", "demo:sentiment"],
    ["merge", "sentiment/x", "--output", "merged"], ["export", "sentiment/x", "--format", "peft", "--output", "out"],
    ["combine", "sentiment/x", "sentiment/y", "--name", "both"], ["serve"],
], ids=lambda args: " ".join(args[:2]))
def test_a_missing_store_is_one_line_before_anything_loads(tmp_path, args):
    missing = tmp_path / "nowhere"
    done, imported = run_checked(tmp_path, *args, "--store", missing)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: no adapter store at {missing} (not found)") \
        and done.stderr.count("\n") == 1, done.stderr
    assert not set(imported) & {"torch", "transformers", "fastapi"}, imported


def test_light_commands_import_no_heavy_library(trained, tmp_path):
    store, _ = trained
    for args in (["--help"], ["adapters", "list", "--store", store], ["adapters", "show", "sentiment", "--store", store]):
        done, imported = run_checked(tmp_path, *args)
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert imported == [], f"{' '.join(map(str, args))} imported {imported}"


def test_a_run_that_loads_a_model_prints_no_library_warning(trained, tmp_path):
    store, out = trained
    done, imported = run_checked(tmp_path, "predict", out["adapter_path"], "great", "--json", "--dtype", "float32")
    assert done.returncode == 0 and "peft" in imported
    assert done.stderr == "", done.stderr  # bitsandbytes' kernels advice, weight-loading bars: none


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any backbone load fails the test: refusals must come before one."""
    monkeypatch.setattr(backbone_loading, "AutoConfig", None)


def test_missing_data_and_unknown_backbones_are_refused_before_a_model_loads(tiny_bert, tmp_path, no_model_loads):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_bert, tmp_path / "store")))
    missing = Path("no/such/folder")
    for result in (invoke("train", recipe, "--set", f"data.path={missing}"),
                   invoke("zeroshot", "--backbone", tiny_bert, "--data", missing),
                   invoke("eval", "sentiment/x", "--store", tmp_path, "--data", missing),
                   invoke("select", "--data", missing, "--out", "x.jsonl")):  # --out: the earlier spelling
        assert_clean_error(result, f"data not found: {missing} (no {missing.resolve()}): expected a dataset folder")
        assert result.exit_code == 2
    for result in (invoke("train", recipe, "--set", "backbone=no-such-model"),
                   invoke("zeroshot", "--backbone", "no-such-model", "--data", "demo:sentiment"),
                   invoke("select", "--backbone", "no-such-model", "--data", shared("agnews"), "--output", "x.jsonl"),
                   invoke("serve", "--backbone", "no-such-model", "--store", tmp_path)):
        assert_clean_error(result, f"unknown backbone 'no-such-model' (no folder {Path('no-such-model').resolve()})")
        assert result.exit_code == 2
    (tmp_path / "empty").mkdir()
    assert_clean_error(invoke("zeroshot", "--backbone", tmp_path / "empty", "--data", "demo:sentiment"),
                       f"{tmp_path / 'empty'} is not a Hugging Face model folder (no config.json)")


def test_store_and_name_options_and_the_store_variable(tiny_bert, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_bert, tmp_path / "recipe-store")))
    from_env, given = tmp_path / "from-env", tmp_path / "given"
    env = {"ADAPTERLAB_STORE": str(from_env)}
    quick = ["--quiet", "--json", "--set", "training.max_steps=1"]
    out = last_json(runner.invoke(app, ["train", str(recipe), *quick], env=env))
    name = Path(out["adapter_path"]).name
    assert Path(out["adapter_path"]) == from_env / "sentiment" / name and name.startswith("lora-k4-s0-")
    out = last_json(runner.invoke(app, ["train", str(recipe), *quick, "--store", str(given), "--name", "2024"], env=env))
    assert Path(out["adapter_path"]) == given / "sentiment" / "2024"  # --store beats the variable; a number stays a name
    out = last_json(invoke("train", recipe, *quick))
    assert Path(out["adapter_path"]) == tmp_path / "recipe-store" / "sentiment" / name  # the store is no setting
    listed = last_json(runner.invoke(app, ["adapters", "list", "--json"], env=env))
    assert listed["store"] == str(from_env) and [a["name"] for a in listed["adapters"]] == [name]
    listed = last_json(runner.invoke(app, ["adapters", "list", "--json", "--store", str(given)], env=env))
    assert [a["name"] for a in listed["adapters"]] == ["2024"]
    assert_clean_error(runner.invoke(app, ["train", str(recipe), "--quiet", "--name", "../x"], env=env),
                       "must be a plain name")


def test_runs_of_other_settings_coexist_and_a_rerun_is_refused_naming_the_reason(tiny_bert, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_bert, tmp_path / "store", training={"max_steps": 1})))
    first = Path(last_json(invoke("train", recipe, "--quiet", "--json"))["adapter_path"])
    other = Path(last_json(invoke("train", recipe, "--quiet", "--json", "--set", "training.lr=0.01"))["adapter_path"])
    assert first.parent == other.parent and first.name != other.name
    assert first.name.startswith("lora-k4-s0-") and other.name.startswith("lora-k4-s0-")
    shown = [last_json(invoke("adapters", "show", f"sentiment/{folder.name}", "--store", tmp_path / "store", "--json"))
             for folder in (first, other)]
    assert [card["settings_digest"] for card in shown] == [first.name[-6:], other.name[-6:]]
    assert_clean_error(invoke("train", recipe, "--quiet"), f"the same settings were already trained: {first}")
    # an explicit name wins; taken by a run of other settings, the refusal says only that it is taken
    last_json(invoke("train", recipe, "--quiet", "--json", "--name", "mine"))
    assert_clean_error(invoke("train", recipe, "--quiet", "--name", "mine", "--set", "training.lr=0.01"),
                       f"adapter folder {first.parent / 'mine'} already exists")
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([first.name, other.name, "mine"])


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout == f"adapterlab {version('adapterlab')}\n"


def test_help_shows_brackets_literally():
    assert "pip install adapterlab[ray]" in " ".join(invoke("serve", "--help").stdout.split())
    assert "pip install adapterlab[ray]" in " ".join(invoke("sweep", "--help").stdout.split())


def visible_options(command, path=()):
    """(command path, option name, parameter name) of every option --help shows, through the groups."""
    for name, sub in getattr(command, "commands", {}).items():
        yield from visible_options(sub, (*path, name))
    for param in command.params:
        if param.param_type_name == "option" and not param.hidden:  # typer's own copy of click's Option
            for opt in param.opts:
                yield " ".join(path), opt, param.name


def test_one_spelling_per_option_across_commands():
    options = list(visible_options(typer.main.get_command(app)))
    spellings, meanings = {}, {}
    for _, opt, name in options:
        spellings.setdefault(name, set()).add(opt)
        meanings.setdefault(opt, set()).add(name)
    assert {name: opts for name, opts in spellings.items() if len(opts) > 1} == {}
    assert {opt: names for opt, names in meanings.items() if len(names) > 1} == {}
    names = sorted(meanings)
    # one word shortened (--out, --output), not a word followed by more (--adapter, --adapters-per-replica)
    shortened = [(a, b) for a in names for b in names if a != b and b.startswith(a) and "-" not in b[len(a):]]
    assert shortened == []
    assert {opt for path, opt, _ in options if path in ("select", "predict", "merge", "export", "factory")
            and opt.startswith("--out")} == {"--output"}
