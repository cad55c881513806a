from pathlib import Path

import pytest

from adapterlab.recipe import RecipeError, load_recipe, validate_recipe
from conftest import ROOT

SHIPPED = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "sweeps" not in p.parts)
SWEEPS = sorted((ROOT / "recipes" / "sweeps").glob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"sst2-lora-minilm.yaml", "sst2-prefix-minilm.yaml", "sst2-lora-smollm2.yaml",
            "sst2-prefix-smollm2.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.task and recipe.method.name in ("lora", "prefix_tuning")


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_shipped_sweep_validates(path, monkeypatch):
    from adapterlab.sweep import load_sweep

    monkeypatch.chdir(ROOT)  # recipe paths in sweeps are relative to the project root
    assert load_sweep(path).methods


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


BASE = "task: t\nbackbone: minilm\nmethod: {name: lora}\ndata: {path: demo:sentiment}\n"


def test_overrides_reach_any_key_and_parse_values(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE), ["training.lr=3e-4", "method.r=4", "data.k=2",
                                                 "method.target_modules=[query, key]"])
    assert recipe.training.lr == 3e-4 and recipe.method.r == 4 and recipe.data.k == 2
    assert recipe.method.target_modules == ["query", "key"]


def test_override_strings_stay_strings(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE), ["head.template=Review: {text}", "head.label_words={a: b}"])
    assert recipe.head.template == "Review: {text}" and recipe.head.label_words == {"a": "b"}


def test_method_switch_by_override(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE), ["method.name=prefix_tuning"])
    assert recipe.method.num_virtual_tokens == 16


@pytest.mark.parametrize("text, override, fragment", [
    (BASE + "trainig: {epochs: 1}\n", None, "trainig: unknown key"),
    (BASE + "training: {lrr: 0.1}\n", None, "training.lrr: unknown key"),
    (BASE, "method.rank=4", "method.rank: unknown key"),
    (BASE, "training.epochs=many", "training.epochs"),
    (BASE, "method.name=adapterdrop", "method"),
    (BASE, "data.k=0", "data.k"),
    (BASE, "task=../escape", "plain name"),
    ("task: [unclosed\n", None, "malformed YAML"),
    ("- a list\n", None, "YAML mapping"),
])
def test_bad_recipes_name_the_problem(tmp_path, text, override, fragment):
    with pytest.raises(RecipeError, match=None) as error:
        load_recipe(write(tmp_path, text), [override] if override else [])
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_section_is_named():
    with pytest.raises(RecipeError, match="data: Field required"):
        validate_recipe({"task": "t", "backbone": "minilm", "method": {"name": "lora"}})


def test_bad_override_syntax(tmp_path):
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        load_recipe(write(tmp_path, BASE), ["training.lr"])


def test_hub_metrics_fail_clearly_offline():
    from adapterlab.errors import AdapterlabError
    from adapterlab.metrics import classification_metrics

    assert classification_metrics([0, 1, 1], [0, 1, 0], 2) == {"accuracy": 2 / 3, "macro_f1": (2 / 3 + 2 / 3) / 2}
    with pytest.raises(AdapterlabError, match="metric 'precision'"):
        classification_metrics([0, 1], [0, 1], 2, ("precision",))
