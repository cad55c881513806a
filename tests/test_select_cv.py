"""training.select: settings chosen by cross-validation on the k-shot rows alone, the card's estimates
beside the zero-shot start's, and the fallback to that start."""

import math

import pytest
import torch

from adapterlab.backbones import load_backbone
from adapterlab.data import load_task
from adapterlab.engine import Engine
from adapterlab.model import AdapterModel
from adapterlab.recipe import RecipeError, load_recipe, validate_recipe
from adapterlab.store import read_card
from adapterlab.training import loop, single, train
from adapterlab.training import select as cv
from adapterlab.training.builders import new_accelerator, new_model, setup
from adapterlab.training.loop import fit, frozen_stem_states
from adapterlab.training.select import (PointResult, Selection, SelectionError, right_per_prototype_weight, right_rows,
                                        stratified_folds)
from conftest import ROOT, shared, tiny_recipe

SELECT = {"folds": 2, "max_cost": 5, "grid": {"training.lr": [1e-3, 3e-2], "head.prototype_weight": [0.0, 0.5]}}
SMALL = {"folds": 2, "grid": {"head.prototype_weight": [0.0, 0.5]}}  # one training per fold
TINY_TRAINING = {"max_steps": None, "epochs": 2, "batch_size": 8}
TIED_HEAD = {"tie_labels": True}
STEM_METHOD = {"name": "lora", "r": 4, "layers": [1]}  # the lower of tiny_bert's two layers is a stem


def selecting(backbone, store, select=SELECT, **sections) -> dict:
    """The tiny recipe with the recommended head (tied descriptions), trained by epochs, selecting."""
    return tiny_recipe(backbone, store, head={"tie_labels": True, **sections.pop("head", {})},
                       training={**TINY_TRAINING, "select": select}, **sections)


def test_folds_hold_out_every_class_once():
    labels = [0, 1, 2] * 5 + [0]
    parts = stratified_folds(labels, 3, seed=7, names=["a", "b", "c"])
    assert sorted(i for part in parts for i in part) == list(range(len(labels)))  # each row held out once
    assert all({labels[i] for i in part} == {0, 1, 2} for part in parts)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts == stratified_folds(labels, 3, seed=7, names=["a", "b", "c"])
    assert parts != stratified_folds(labels, 3, seed=8, names=["a", "b", "c"])
    with pytest.raises(SelectionError, match="class 'b' has 1 training rows, fewer than training.select.folds 2"):
        stratified_folds([0, 0, 1], 2, seed=0, names=["a", "b"])


def test_grid_is_searched_on_training_rows_only_and_recorded(tiny_bert, tmp_path, monkeypatch):
    recipe = validate_recipe(selecting(tiny_bert, tmp_path))
    task = load_task(recipe.data)
    seen = {"selecting": [], "after": []}  # every text that a model trained on or scored, by phase
    phase = ["selecting"]
    real_select, real_batch, real_scores = cv.select_settings, AdapterModel.batch, AdapterModel.scores

    def select_spy(*args, **kwargs):
        try:
            return real_select(*args, **kwargs)
        finally:
            phase[0] = "after"

    def batch_spy(self, rows, indices, *args, **kwargs):
        seen[phase[0]] += [rows.texts[i] for i in indices]
        return real_batch(self, rows, indices, *args, **kwargs)

    def scores_spy(self, texts, *args, **kwargs):
        seen[phase[0]] += list(texts)
        return real_scores(self, texts, *args, **kwargs)

    monkeypatch.setattr(cv, "select_settings", select_spy)
    monkeypatch.setattr(AdapterModel, "batch", batch_spy)
    monkeypatch.setattr(AdapterModel, "scores", scores_spy)
    result = train(recipe, show_progress=False)

    assert seen["selecting"] and set(seen["selecting"]) <= set(task.train.texts)
    assert set(task.test.texts) & set(seen["after"])  # the final evaluation does read the test rows
    selection = read_card(result.adapter_path).selection
    assert selection["trainings"] == 2 * 2  # two learning rates × two folds: the prototype weights share them
    assert [p["settings"] for p in selection["points"]] == [
        {"training.lr": lr, "head.prototype_weight": w} for lr in (1e-3, 3e-2) for w in (0.0, 0.5)]
    best = max(p["cv_accuracy"] for p in selection["points"])
    assert selection["cv_accuracy"] == best
    assert selection["chosen"] == next(p["settings"] for p in selection["points"] if p["cv_accuracy"] == best)
    card = read_card(result.adapter_path)
    assert card.recipe["training"]["lr"] == selection["chosen"]["training.lr"]  # the final run used the choice
    assert card.recipe["head"]["prototype_weight"] == selection["chosen"]["head.prototype_weight"]
    assert selection["rows"] == len(task.train)
    assert selection["below_zero_shot"] == (selection["cv_accuracy"] < selection["zero_shot_cv_accuracy"])
    assert selection["fell_back"] is False and selection["time_ratio"] > 0


def test_selection_is_deterministic_per_seed(tiny_bert, tmp_path):
    def selection(store):
        record = read_card(train(validate_recipe(selecting(tiny_bert, store)), show_progress=False).adapter_path).selection
        return {key: value for key, value in record.items() if key not in ("seconds", "time_ratio")}

    assert selection(tmp_path / "a") == selection(tmp_path / "b")


def test_fallback_serves_exactly_the_zero_shot_start(tiny_bert, tmp_path, monkeypatch):
    for flag in ("below_zero_shot", "clearly_below_zero_shot"):  # as CV would say
        monkeypatch.setattr(Selection, flag, property(lambda self: True))
    def trained_as(name, fallback):
        raw = selecting(tiny_bert, tmp_path, {**SMALL, "fallback": fallback}, output={"store": str(tmp_path), "name": name})
        return train(validate_recipe(raw), show_progress=False)
    fallen, trained = trained_as("fallen", "zero_shot"), trained_as("trained", "none")
    selection = read_card(fallen.adapter_path).selection
    assert selection["below_zero_shot"] and selection["fell_back"] and selection["time_ratio"] is None
    assert read_card(trained.adapter_path).selection["fell_back"] is False

    engine = Engine(tiny_bert, tmp_path, dtype="float32")
    test = load_task(validate_recipe(tiny_recipe(tiny_bert, tmp_path)).data).test
    start = engine.classify(engine.baseline("sentiment/fallen"), test.texts)
    def scores(predictions):
        return torch.tensor([list(p.scores.values()) for p in predictions])
    assert torch.allclose(scores(engine.predict("sentiment/fallen", test.texts)), scores(start), atol=1e-6)
    assert not torch.allclose(scores(engine.predict("sentiment/trained", test.texts)), scores(start), atol=1e-3)
    labels = engine.card("sentiment/fallen").labels
    start_accuracy = sum(p.label == labels[y] for p, y in zip(start, test.labels)) / len(test)
    assert fallen.metrics["accuracy"] == pytest.approx(start_accuracy)  # its test figure is the zero-shot one


@pytest.mark.parametrize("change, message", [
    ({"training": {"select": {"grid": {"training.lrr": [1e-3]}}}}, "grid key 'training.lrr' is not a setting"),
    ({"training": {"select": {"grid": {"data.k": [4]}}}}, "grid key 'data.k' is not a setting"),
    ({"training": {"select": {"grid": {"training.mixed_precision": ["no"]}}}}, "'training.mixed_precision' is not"),
    ({"training": {"select": {"grid": {"training.lr": []}}}}, "grid key 'training.lr' has no values"),
    ({"training": {"select": {"grid": {}}}}, "training.select.grid: Dictionary should have at least 1 item"),
    ({"training": {"select": {"folds": 1, "grid": {"training.lr": [1e-3]}}}}, "folds: Input should be greater"),
    ({"training": {"select": {"folds": 5, "grid": {"training.lr": [1e-3]}}}},
     "folds 5 needs at least 5 rows per class (each fold holds out every class); data.k is 4"),
    ({"training": {"select": {"grid": {"training.lr": [-1]}}}},
     "grid point {'training.lr': -1}: training.lr: Input should be greater than 0"),
    ({"training": {"select": {"grid": {"head.cosine_scale": [20, None]}}}, "head": {"tie_labels": True}},
     "grid point {'head.cosine_scale': None}: head: Value error, tie_labels needs a cosine"),
    ({"training": {"select": {"fallback": "zero_shot", "grid": {"training.lr": [1e-3]}}},
      "method": {"name": "prefix_tuning"}}, "an untrained prefix_tuning adapter changes the backbone's answers"),
    ({"training": {"select": {"grid": {"training.lr": [1e-3]}}}, "head": {"type": "generate"},
      "data": {"path": "demo:sentiment", "target_field": "label"}}, "it needs a classification task"),
])
def test_selections_that_cannot_work_are_refused_by_name(change, message, tmp_path):
    with pytest.raises(RecipeError) as error:
        validate_recipe(tiny_recipe("minilm", tmp_path, **change))
    assert message in str(error.value)


def test_a_grid_over_its_cost_is_refused_before_training(tiny_bert, tmp_path, monkeypatch):
    for module in (cv, single):
        monkeypatch.setattr(module, "fit", lambda *args, **kwargs: pytest.fail("trained"))
    select = {"folds": 2, "grid": {"training.epochs": [2, 4]}}  # (2 + 4 epochs) x 2 folds of 1 step, against 2
    with pytest.raises(SelectionError, match=r"would train 6.00x the optimizer steps .* over its max_cost 3.0"):
        train(validate_recipe(selecting(tiny_bert, tmp_path, select)), show_progress=False)


@pytest.mark.slow
def test_minilm_selection_on_real_rows_reports_beside_test(tmp_path, capsys):
    """The shipped MiniLM recipe on SST-2 (k=8, 200 test rows) choosing its epochs by 2-fold CV: four
    trainings within its step budget, the card's zero-shot estimate is the engine's zero-shot start on the
    k-shot rows, and the CV estimate is reported beside the test accuracy. (Time against a single run is
    measured by benchmarks/fewshot.py's adapterlab-cv rows, not asserted here.)"""
    recipe = load_recipe(ROOT / "recipes" / "sst2-lora-minilm.yaml", [
        f"data.path={shared('sst2')}", "data.k=8", "data.test_limit=200", f"output.store={tmp_path}",
        "output.name=cv", "training.select={folds: 2, grid: {training.epochs: [5, 10]}}"])
    chosen = train(recipe, show_progress=False)
    selection = read_card(chosen.adapter_path).selection
    assert selection["trainings"] == 2 * 2 and len(selection["points"]) == 2 and selection["steps_ratio"] <= 3
    assert selection["chosen"] in [point["settings"] for point in selection["points"]]

    engine = Engine("minilm", tmp_path, dtype="float32")
    rows = load_task(recipe.data).train
    labels = engine.card("sst2/cv").labels
    start = engine.classify(engine.baseline("sst2/cv"), rows.texts)
    assert selection["zero_shot_cv_accuracy"] == round(
        sum(p.label == labels[y] for p, y in zip(start, rows.labels)) / len(rows), 4)
    with capsys.disabled():
        print(f"\nsst2 k=8: CV {selection['seconds']:.1f} s against a final run of {chosen.train_seconds:.1f} s, chose "
              f"{selection['chosen']}, cv_accuracy {selection['cv_accuracy']} (zero-shot "
              f"{selection['zero_shot_cv_accuracy']}), test {chosen.metrics['accuracy']:.3f}")

def _trained(model) -> dict[str, torch.Tensor]:
    """Everything a training changed: the adapter's and the head's tensors."""
    return {name: tensor.clone() for name, tensor in model.state_dict().items() if "lora_" in name or
            "prompt_encoder" in name or name.startswith("head.")}


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4}, {"name": "prefix_tuning", "num_virtual_tokens": 4}])
def test_folds_on_a_reused_backbone_train_as_on_a_fresh_load(tiny_bert, tmp_path, method):
    """Each fold's adapter is built on the backbone the previous fold's adapter was taken out of: its
    training must be bit-identical to one on a freshly loaded backbone, and the backbone bare again."""
    recipe = validate_recipe(tiny_recipe(tiny_bert, tmp_path, method=method, head=TIED_HEAD))
    task = load_task(recipe.data)
    accelerator = new_accelerator(recipe.training)
    bare = load_backbone(tiny_bert).model.state_dict()

    first = new_model(recipe, task, accelerator)
    fit(first, task.train.select([0, 1, 2, 4, 5, 6]), recipe, accelerator, show_progress=False)
    backbone = first.release_backbone()
    assert not any("lora_" in name for name, _ in backbone.model.named_modules())
    assert not hasattr(backbone.model, "peft_config") and not backbone.model.training
    assert backbone.model.state_dict().keys() == bare.keys()
    assert all(torch.equal(tensor, bare[name]) for name, tensor in backbone.model.state_dict().items())

    second = recipe.with_settings({"training.seed": 5, "training.lr": 3e-3})
    rows = task.train.select([1, 2, 3, 5, 6, 7])
    reused, fresh = new_model(second, task, accelerator, backbone), new_model(second, task, accelerator)
    assert _trained(reused).keys() == _trained(fresh).keys()
    assert all(torch.equal(tensor, _trained(fresh)[name]) for name, tensor in _trained(reused).items())  # same start
    for model in (reused, fresh):
        fit(model, rows, second, accelerator, show_progress=False)
    after, expected = _trained(reused), _trained(fresh)
    assert any(not torch.equal(after[name], tensor) for name, tensor in _trained(first).items())  # it did train anew
    assert all(torch.equal(tensor, expected[name]) for name, tensor in after.items())
    assert torch.equal(reused.scores(task.test.texts), fresh.scores(task.test.texts))


def test_shared_stem_states_equal_each_folds_own(tiny_bert, tmp_path):
    """The states of all k-shot rows, computed once, are those each fold would compute for its rows."""
    recipe = validate_recipe(tiny_recipe(tiny_bert, tmp_path, method=STEM_METHOD, training={"eval_batch_size": 3}))
    task = load_task(recipe.data)
    model = new_model(recipe, task, new_accelerator(recipe.training))
    assert model.stem_layers == 1
    shared = frozen_stem_states(model, task.train, recipe.training)
    for part in stratified_folds(task.train.labels, 2, seed=0, names=task.label_names):
        own = frozen_stem_states(model, task.train.select(part), recipe.training)
        assert [state.shape for state in own] == [shared[i].shape for i in part]
        assert all(torch.allclose(state, shared[i], atol=1e-6, rtol=0) for state, i in zip(own, part))


def test_selection_computes_stem_states_once_and_scales_max_steps(tiny_bert, tmp_path, monkeypatch):
    """One stem pass over the k-shot rows serves every fold and trial; a user's max_steps shrinks with
    the rows a fold keeps (2 folds of half the rows: half the steps each)."""
    stem_rows, fold_steps = [], []
    real_stem, real_fit = frozen_stem_states, fit
    for module in (cv, loop):  # the selection's pass, and the one a run's fit makes
        monkeypatch.setattr(module, "frozen_stem_states", lambda model, rows, config: stem_rows.append(len(rows))
                            or real_stem(model, rows, config))

    def fit_spy(model, rows, recipe, *args, stem=None, **kwargs):
        fold_steps.append((len(rows), recipe.training.max_steps))
        if stem is not None:  # the shared states handed to a fold are its own rows'
            own = real_stem(model, rows, recipe.training)
            assert all(torch.allclose(state, mine, atol=1e-6, rtol=0) for state, mine in zip(stem, own, strict=True))
        return real_fit(model, rows, recipe, *args, stem=stem, **kwargs)

    for module in (cv, single):  # the folds, then the final run
        monkeypatch.setattr(module, "fit", fit_spy)
    raw = tiny_recipe(tiny_bert, tmp_path, method=STEM_METHOD,
                      training={"max_steps": 4, "batch_size": 2,
                                "select": {"folds": 2, "grid": {"training.lr": [1e-3, 3e-2]}}})
    result = train(validate_recipe(raw), show_progress=False)
    rows = len(load_task(validate_recipe(raw).data).train)
    assert stem_rows == [rows, rows]  # the selection's one pass, then the final run's own
    assert fold_steps == [(rows // 2, 2)] * 4 + [(rows, 4)]
    assert read_card(result.adapter_path).selection["steps_ratio"] == 2 * (2 + 2) / 4


def test_prototype_weights_scored_from_vectors_once_agree_with_settling_and_scoring_each(tiny_bert, tmp_path):
    recipe = validate_recipe(tiny_recipe(tiny_bert, tmp_path, head=TIED_HEAD, training=TINY_TRAINING))
    accelerator, task, model = setup(recipe)
    fit(model, task.train, recipe, accelerator, show_progress=False)
    kept, held_out = task.train.select(list(range(0, len(task.train), 2))), task.train.select(list(range(1, len(task.train), 2)))
    weights = [0.0, 0.5, 1.0]
    once = right_per_prototype_weight(model, kept, held_out, weights)
    each = []
    for weight in weights:
        model.settle_label_vectors(kept, weight)
        each.append(right_rows(model, held_out, recipe))
        from_vectors = model.head.scores_of_unit_vectors(model.text_vectors(held_out.texts)).softmax(-1).cpu()
        assert torch.allclose(from_vectors, model.scores(held_out.texts), atol=1e-5)
        rows = model.head.linear.weight.detach().clone()
        model.settle_label_vectors(kept, weight, model.text_vectors(kept.texts))
        assert torch.allclose(rows, model.head.linear.weight, atol=1e-6)
    assert once == each  # the same rows right, weight by weight


@pytest.mark.parametrize("start_only, chosen_only, clearly", [(2, 0, False), (5, 0, True), (7, 2, False), (9, 1, True)])
def test_a_fallback_needs_the_start_ahead_by_more_than_chance(start_only, chosen_only, clearly):
    """Folds train on part of the rows: a lead of a row or two for the untrained start is the noise of a
    pessimistic estimate, not a reason to store it untrained."""
    shared_right = list(range(10))
    start = shared_right + list(range(10, 10 + start_only))
    chosen = PointResult({}, 1, shared_right + list(range(20, 20 + chosen_only)))
    selection = Selection(2, {}, 32, [chosen], 2, 1.0, zero_shot_right=start)
    assert selection.below_zero_shot
    assert selection.clearly_below_zero_shot is clearly
    n = start_only + chosen_only
    assert selection.below_zero_shot_p_value == pytest.approx(
        sum(math.comb(n, i) for i in range(start_only, n + 1)) / 2 ** n)
    assert Selection.from_state(selection.state()) == selection
