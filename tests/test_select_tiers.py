"""training.select.candidates: whole recipes on different backbones cross-validated on the same folds, the
best one trained and stored under its backbone, the card's record of every candidate, the budget that skips
the costly ones, and the candidates that are refused."""

import pytest
import yaml

from adapterlab.recipe import RecipeError, candidate_recipes, load_recipe, validate_recipe
from adapterlab.store import read_card
from adapterlab.training import select as cv
from adapterlab.training import tiers, train
from adapterlab.training.select import FoldTrainer
from conftest import ROOT, tiny_recipe

TRAINING = {"max_steps": 2, "batch_size": 8}


def write_recipe(folder, name: str, raw: dict) -> str:
    path = folder / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def llm_candidate(tiny_llama, folder, **sections) -> str:
    """A label-words recipe on the tiny Llama, of another task and data: the selecting recipe's replace them."""
    raw = tiny_recipe(tiny_llama, folder / "elsewhere", task="other", data={"path": "demo:topic", "k": 2},
                      training=TRAINING, **sections)
    return write_recipe(folder, "llm.yaml", raw)


def tiered(tiny_bert, store, candidates: list[str], **training) -> dict:
    return tiny_recipe(tiny_bert, store, training={**TRAINING, **training,
                                                   "select": {"folds": 2, "candidates": candidates}})


@pytest.fixture
def folds_seen(monkeypatch) -> list[tuple]:
    """(backbone, kept rows, held-out rows) of every fold trained."""
    seen, real = [], FoldTrainer.train_and_score

    def spy(self, fold, kept, held_out, group):
        seen.append((fold.backbone, tuple(kept), tuple(held_out)))
        return real(self, fold, kept, held_out, group)

    monkeypatch.setattr(FoldTrainer, "train_and_score", spy)
    return seen


@pytest.mark.parametrize("winner", ["llm", "narrow", "tie"])
def test_candidates_share_folds_and_the_best_trains_under_its_backbone(tiny_bert, tiny_llama, tmp_path, monkeypatch,
                                                                     folds_seen, winner):
    """Held-out scores forced: the LLM right on every row and the BERT recipe on none (it wins clearly); the
    LLM ahead by one row a fold only ("narrow": within chance, so the cheaper BERT recipe as written trains);
    or both wrong on all (a tie goes to the cheaper). Each candidate trains for real on its own backbone."""
    def forced(model, rows, recipe):
        every = list(range(len(rows)))
        if recipe.backbone == tiny_llama:
            return every if winner in ("llm", "narrow") else []
        return every[1:] if winner == "narrow" else []

    monkeypatch.setattr(cv, "right_rows", forced)
    llm = llm_candidate(tiny_llama, tmp_path)
    recipe = validate_recipe(tiered(tiny_bert, tmp_path / "store", [llm]))
    result = train(recipe, show_progress=False)

    by_backbone = {}
    for backbone, kept, held_out in folds_seen:
        by_backbone.setdefault(backbone, []).append((kept, held_out))
    assert set(by_backbone) == {tiny_bert, tiny_llama}
    assert by_backbone[tiny_bert] == by_backbone[tiny_llama] and len(by_backbone[tiny_bert]) == 2  # the same folds
    assert [backbone for backbone, _, _ in folds_seen] == [tiny_bert] * 2 + [tiny_llama] * 2  # cheapest first
    rows = sum(len(held_out) for _, held_out in by_backbone[tiny_bert])

    card = read_card(result.adapter_path)
    selection = card.selection
    assert [c["recipe"] for c in selection["candidates"]] == [tiers.AS_WRITTEN, llm]
    assert [c["backbone"] for c in selection["candidates"]] == [tiny_bert, tiny_llama]
    assert all(not c["skipped"] and c["seconds"] > 0 and c["estimate_seconds"] > 0 for c in selection["candidates"])
    scores = [c["cv_accuracy"] for c in selection["candidates"]]
    p_values = [c["p_value_over_cheapest"] for c in selection["candidates"]]
    expected = {"llm": ([0.0, 1.0], [None, 0.5 ** rows]), "narrow": ([round(1 - 2 / rows, 4), 1.0], [None, 0.25]),
                "tie": ([0.0, 0.0], [None, 1.0])}[winner]
    assert (scores, p_values) == (expected[0], [None, pytest.approx(expected[1][1], abs=1e-4)])
    chosen_backbone = tiny_llama if winner == "llm" else tiny_bert
    assert selection["chosen"] == (llm if winner == "llm" else tiers.AS_WRITTEN)
    assert selection["cv_accuracy"] == scores[winner == "llm"] and selection["trainings"] == 4
    assert card.backbone == chosen_backbone and card.task == "sentiment"  # the selecting recipe's task and store
    assert result.adapter_path.parent.parent == tmp_path / "store"
    assert result.adapter_path.name == recipe.adapter_name and card.settings_digest == recipe.settings_digest
    assert card.recipe["backbone"] == chosen_backbone and card.recipe["method"]["r"] == 4
    assert card.recipe["training"]["select"] is None and card.recipe["data"]["path"] == "demo:sentiment"


@pytest.mark.parametrize("budget, estimate, folds_of_llm", [(3600, 1e6, 1), (1e-9, None, 0)])
def test_a_candidate_over_the_budget_is_skipped_and_recorded(tiny_bert, tiny_llama, tmp_path, monkeypatch,
                                                             folds_seen, budget, estimate, folds_of_llm):
    """Over the budget by its estimate (measured on its first fold: here made huge), or started after the
    budget is spent (never measured); the cheapest candidate always runs."""
    monkeypatch.setattr(tiers, "estimate_seconds", lambda load, fold, folds: 1e6)
    llm = llm_candidate(tiny_llama, tmp_path)
    raw = tiered(tiny_bert, tmp_path / "store", [llm], budget_seconds=budget)
    card = read_card(train(validate_recipe(raw), show_progress=False).adapter_path)

    assert sum(backbone == tiny_llama for backbone, _, _ in folds_seen) == folds_of_llm
    written, skipped = card.selection["candidates"]
    assert not written["skipped"] and written["cv_accuracy"] is not None
    assert skipped["recipe"] == llm and skipped["skipped"] and skipped["cv_accuracy"] is None
    assert skipped["estimate_seconds"] == estimate
    assert card.selection["chosen"] == tiers.AS_WRITTEN and card.selection["budget_seconds"] == budget
    assert card.backbone == tiny_bert and card.selection["trainings"] == 2


def test_the_shipped_tiered_recipe_is_the_tied_recipe_against_smollm2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # candidate files are read from the recipe's folder, not the current one
    recipe = load_recipe(ROOT / "recipes" / "tiered-minilm-smollm2.yaml")
    tied = load_recipe(ROOT / "recipes" / "sst2-lora-minilm-tied.yaml")
    assert recipe.with_settings({"training.select": None, "training.budget_seconds": None}) == tied
    assert recipe.training.budget_seconds and recipe.training.select.candidates == [
        str(ROOT / "recipes" / "sst2-prefix-smollm2-label-prompt.yaml")]
    (llm,) = candidate_recipes(recipe.with_settings({"data.seed": 2, "training.seed": 2}))
    assert llm.backbone == "smollm2-135m" and llm.head.type == "label_words"
    assert llm.data.seed == 2 and llm.training.seed == 2  # a sweep's seed reaches the candidate's draw and start
    assert llm.head.template is None  # the prompt is written from the task's labels, whatever the task


def nested(folder) -> str:
    raw = tiny_recipe("minilm", folder, training={"select": {"folds": 2, "grid": {"training.lr": [1e-3]}}})
    return write_recipe(folder, "nested.yaml", raw)


def self_naming(folder) -> str:
    path = folder / "self.yaml"
    raw = tiny_recipe("minilm", folder, training={"select": {"folds": 2, "candidates": [str(path)]}})
    return write_recipe(folder, "self.yaml", raw)


@pytest.mark.parametrize("candidate, change, message", [
    (lambda folder: str(folder / "missing.yaml"), {}, "training.select.candidates: recipe not found"),
    (lambda folder: str(folder), {}, "cannot be read"),
    (lambda folder: write_recipe(folder, "gen.yaml", tiny_recipe("minilm", folder, head={"type": "generate"}, data={
        "path": "demo:sentiment", "target_field": "label"})), {}, "is a generation recipe (head.type generate)"),
    (nested, {}, "has its own training.select: a candidate trains as written (no nested selections)"),
    (self_naming, {}, "has its own training.select"),
    (lambda folder: write_recipe(folder, "auto.yaml", tiny_recipe("minilm", folder, training={"init_from": "auto"})),
     {}, "chooses its source (training.init_from auto)"),
    (lambda folder: write_recipe(folder, "bad.yaml", tiny_recipe("minilm", folder, training={"lr": -1})), {},
     "bad.yaml: training.lr: Input should be greater than 0"),
    (lambda folder: write_recipe(folder, "prefix.yaml", tiny_recipe("minilm", folder, method={
        "name": "prefix_tuning"})), {"fallback": "zero_shot"}, "untrained prefix_tuning adapter changes"),
    (lambda folder: write_recipe(folder, "bf16.yaml", tiny_recipe("minilm", folder, training={
        "mixed_precision": "bf16"})), {}, "one run has one precision"),
    (lambda folder: write_recipe(folder, "ok.yaml", tiny_recipe("minilm", folder)), {"grid": {"training.lr": [1e-3]}},
     "a grid or candidates, not both"),
])
def test_candidates_that_cannot_run_are_refused_in_one_line(tmp_path, candidate, change, message):
    raw = tiny_recipe("minilm", tmp_path, training={"select": {"folds": 2, "candidates": [candidate(tmp_path)],
                                                               **change}})
    with pytest.raises(RecipeError) as error:
        validate_recipe(raw)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("training, message", [
    ({"budget_seconds": 60}, "training.budget_seconds bounds a selection among training.select.candidates"),
    ({"select": {"folds": 2}}, "training.select needs a grid or candidates"),
])
def test_a_budget_or_selection_with_nothing_to_choose_is_refused(tmp_path, training, message):
    with pytest.raises(RecipeError, match=message):
        validate_recipe(tiny_recipe("minilm", tmp_path, training=training))
