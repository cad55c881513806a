import hashlib
from pathlib import Path

import pytest
import yaml

from adapterlab.recipe import RecipeError, apply_override, load_recipe, validate_recipe
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


def named(overrides=(), text=BASE):
    """The adapter name of the recipe `text` with `overrides`."""
    return validate_recipe(_raw(text, overrides)).adapter_name


def _raw(text: str, overrides) -> dict:
    raw = yaml.safe_load(text)
    for override in overrides:
        apply_override(raw, override)
    return raw


def test_the_default_name_reads_as_before_then_digests_the_settings():
    name = named()
    assert name.startswith("lora-k16-s0-") and len(name) == len("lora-k16-s0-") + 6
    assert named(["training.ensemble=3"]).startswith("lora-k16-s0-ens3-")
    assert named(["data.k=null"]).startswith("lora-kall-s0-")
    # the same settings, written out or left to their defaults, in another order: the same name
    assert named(["training.epochs=10", "data.seed=0", "method.r=8"]) == name
    assert named(text="data: {path: 'demo:sentiment'}\nmethod: {name: lora}\nbackbone: minilm\ntask: t\n") == name


@pytest.mark.parametrize("override", ["training.lr=0.001", "method.r=4", "training.epochs=3", "head.type=classifier",
                                      "training.init_from=sst2/x", "data.seed=1", "backbone=other/model",
                                      "head.label_templates=['{label}!']", "training.ensemble=2"])
def test_each_setting_that_trains_another_adapter_changes_the_name(override):
    assert named([override]) != named()


@pytest.mark.parametrize("override", ["output.store=elsewhere", "output.overwrite=false", "data.test_limit=5",
                                      "training.eval_batch_size=8", "training.checkpoint_every=2"])
def test_where_and_how_a_run_is_stored_or_scored_leaves_the_name(override):
    assert named([override]) == named()


def test_an_explicit_name_wins():
    assert named(["output.name=mine"]) == "mine"
    assert validate_recipe(_raw(BASE, ["output.name=mine"])).settings_digest == named()[-6:]


def test_the_backbone_is_digested_as_written_not_as_resolved(tmp_path, monkeypatch):
    text = BASE.replace("backbone: minilm", "backbone: models/encoder")
    monkeypatch.chdir(tmp_path)
    here = named(text=text)
    monkeypatch.chdir(ROOT)
    assert named(text=text) == here != named()


def test_the_digest_is_sha256_of_the_settings_as_canonical_json():
    # no hash(), no paths resolved: the same name in every process and on every machine; a changed rule would
    # rename the re-runs of every stored adapter
    written = b'{"backbone": "minilm", "data": {"path": "demo:sentiment"}, "method": {"name": "lora"}, "task": "t"}'
    assert named() == "lora-k16-s0-" + hashlib.sha256(written).hexdigest()[:6]


def test_a_pinned_recipe_keeps_its_name_and_digest_whatever_the_run_changes():
    recipe = validate_recipe(_raw(BASE, []))
    pinned = recipe.with_name_pinned()
    changed = pinned.with_settings({"training.lr": 0.5}).model_copy(update={"task": "t"})
    assert (changed.adapter_name, changed.settings_digest) == (recipe.adapter_name, recipe.settings_digest)
    assert pinned.output.name == recipe.adapter_name
