"""Sweeps on a tiny random BERT and the demo data: table, plots, resume, bad files."""

import csv
import json
import re

import matplotlib.image
import pytest
import yaml

import adapterlab.sweep as sweep_module
from adapterlab.baselines import evaluate_prompting
from adapterlab.data import load_task
from adapterlab.engine import Engine
from adapterlab.provenance import SOURCE_TREE, git_commit
from adapterlab.recipe import DataConfig
from adapterlab.store import read_card
from adapterlab.sweep import SweepError, factory_sweep, load_sweep, run_sweep
from adapterlab.zeroshot import ZeroShotConfig, demonstration_indices, evaluate_zero_shot
from conftest import shared, tiny_recipe


@pytest.fixture
def sweep_file(tiny_bert, tmp_path):
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_bert, tmp_path / "unused")))
    sweep = {"name": "tiny", "backbone": tiny_bert, "output": str(tmp_path / "out"),
             "datasets": {"sentiment": {"path": "demo:sentiment"}, "topic": {"path": "demo:topic"}},
             "methods": {"zeroshot": "zeroshot", "lora": str(recipe)}, "k": [2, 4], "seeds": [0, 1]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_sweep_writes_table_and_plots_then_resumes(sweep_file, monkeypatch):
    folder = run_sweep(load_sweep(sweep_file), show_progress=False)
    rows = list(csv.DictReader(open(folder / "results.csv")))
    assert len(rows) == 2 * (1 + 2 * 2)  # per dataset: one zero-shot cell, lora at 2 k × 2 seeds
    assert {(r["dataset"], r["method"]) for r in rows} == {(d, m) for d in ("sentiment", "topic")
                                                           for m in ("zeroshot", "lora")}
    summary = json.loads((folder / "summary.json").read_text())
    lora_k4 = next(s for s in summary if s["dataset"] == "topic" and s["method"] == "lora" and s["k"] == 4)
    runs = [float(r["accuracy"]) for r in rows if r["dataset"] == "topic" and r["method"] == "lora" and r["k"] == "4"]
    assert lora_k4["seeds"] == 2 and lora_k4["accuracy_mean"] == pytest.approx(sum(runs) / 2)
    table = (folder / "summary.md").read_text()
    assert f"| topic | lora | 4 | {100 * lora_k4['accuracy_mean']:.1f} ± {100 * lora_k4['accuracy_std']:.1f} |" in table
    for name in ("accuracy_vs_k.png", "methods.png"):
        image = matplotlib.image.imread(folder / name)
        assert image.shape[0] > 200 and image.shape[1] > 300 and image.std() > 0.05  # a drawn figure

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr("adapterlab.training.train", must_not_train)
    monkeypatch.setattr(sweep_module, "_prompting", must_not_train)
    run_sweep(load_sweep(sweep_file), show_progress=False)
    assert len(list(csv.DictReader(open(folder / "results.csv")))) == len(rows)


def test_a_whole_split_cell_trains_on_every_train_row(sweep_file, tmp_path):
    """k: null in a sweep (library adapters): the cell's recipe reads the whole train split; it is named,
    tabled and plotted as k 'all', after the numeric k."""
    raw = yaml.safe_load(sweep_file.read_text())
    sweep_file.write_text(yaml.safe_dump({**raw, "datasets": {"topic": {"path": "demo:topic"}}, "k": [2, None],
                                          "seeds": [0]}))
    sweep = load_sweep(sweep_file)
    folder = run_sweep(sweep, show_progress=False)
    whole = next(row for row in sweep_module.read_results(folder / "results.jsonl") if row["k"] is None)
    assert whole["adapter"].startswith("topic/lora-kall-s0-")
    card = read_card(folder / "adapters" / whole["adapter"])
    assert card.k is None
    recipe = sweep_module.cell_recipe(sweep, whole, folder)
    assert recipe.data.k is None and len(load_task(recipe.data).train) == len(load_task(
        DataConfig(path="demo:topic", k=None)).train) > 2 * len(card.labels)
    summary = [s for s in json.loads((folder / "summary.json").read_text()) if s["method"] == "lora"]
    assert [s["k"] for s in summary] == [2, None]
    assert "| topic | lora | all |" in (folder / "summary.md").read_text()
    assert matplotlib.image.imread(folder / "accuracy_vs_k.png").std() > 0.05
    sweep_file.write_text(yaml.safe_dump({**raw, "k": [0]}))
    with pytest.raises(SweepError, match="k.0: Input should be greater than 0"):
        load_sweep(sweep_file)


def test_a_cell_that_selects_its_settings_reports_its_estimate_and_counts_the_selection(sweep_file, tmp_path):
    sweep = load_sweep(sweep_file)
    recipe = yaml.safe_load(open(sweep.methods["lora"]))
    recipe["training"] |= {"select": {"folds": 2, "grid": {"training.epochs": [1, 2]}, "max_cost": 10}}
    cv_recipe = tmp_path / "lora-cv.yaml"
    cv_recipe.write_text(yaml.safe_dump(recipe))
    folder = run_sweep(sweep.model_copy(update={"methods": {"cv": str(cv_recipe)}, "k": [4], "seeds": [0],
                                                "datasets": {"topic": {"path": "demo:topic"}}}), show_progress=False)
    [row] = sweep_module.read_results(folder / "results.jsonl")
    assert row["adapter"].startswith("topic/cv-k4-s0-")  # the sweep's name of the method, then the settings digest
    card = Engine(sweep.backbone, folder / "adapters").card(row["adapter"])
    assert row["cv_accuracy"] == card.selection["cv_accuracy"] and row["chosen"] == card.selection["chosen"]
    assert row["select_seconds"] == card.selection["seconds"] > 0
    assert row["train_seconds"] == pytest.approx(row["fit_seconds"] + row["select_seconds"])


def test_cells_of_a_changed_recipe_run_again(sweep_file, monkeypatch):
    sweep = load_sweep(sweep_file)
    folder = run_sweep(sweep.model_copy(update={"k": [2], "seeds": [0]}), show_progress=False)
    first = sweep_module.read_results(folder / "results.jsonl")
    recipe = yaml.safe_load(open(sweep.methods["lora"]))
    recipe["training"]["max_steps"] = 4
    yaml.safe_dump(recipe, open(sweep.methods["lora"], "w"))

    trained = []
    real_train = sweep_module._train
    monkeypatch.setattr(sweep_module, "_train", lambda *args: trained.append(args[1]["dataset"]) or real_train(*args))
    monkeypatch.setattr(sweep_module, "_prompting", lambda *args: pytest.fail("zero-shot did not change"))
    run_sweep(sweep.model_copy(update={"k": [2], "seeds": [0]}), show_progress=False)
    assert sorted(trained) == ["sentiment", "topic"]
    rows = sweep_module.read_results(folder / "results.jsonl")
    assert len(rows) == len(first) + 2  # the earlier cells stay in the file ...
    reported = list(csv.DictReader(open(folder / "results.csv")))
    assert len(reported) == len(first)  # ... and out of the report
    assert {r["settings"] for r in reported if r["method"] == "lora"} == {r["settings"] for r in rows[-2:]}
    # the adapters of the earlier settings stay beside the new ones, under names of their own
    adapters = [row["adapter"] for row in rows if row["method"] == "lora"]
    assert len(set(adapters)) == 4 and all((folder / "adapters" / adapter).is_dir() for adapter in adapters)


def test_cells_name_their_date_and_commit_and_kept_cells_of_other_code_are_warned_of(sweep_file, monkeypatch,
                                                                                    caplog):
    """A code change does not rerun kept cells (they are keyed by settings): the sweep says so, by commit."""
    sweep = load_sweep(sweep_file).model_copy(update={"k": [2], "seeds": [0]})
    monkeypatch.setattr(sweep_module, "git_commit", lambda: "1111111")
    folder = run_sweep(sweep, show_progress=False)
    rows = sweep_module.read_results(folder / "results.jsonl")
    assert {row["commit"] for row in rows} == {"1111111"} and all(len(row["date"]) == 10 for row in rows)
    heading = (folder / "summary.md").read_text().splitlines()[0]
    assert f"{len(rows)} cells measured on {rows[0]['cpu']}" in heading and "commits: 1111111." in heading

    monkeypatch.setattr(sweep_module, "git_commit", lambda: "2222222")
    monkeypatch.setattr(sweep_module, "_train", lambda *args: pytest.fail("a kept cell ran again"))
    with caplog.at_level("WARNING", logger="adapterlab"):
        run_sweep(sweep, show_progress=False)
    assert f"{len(rows)} kept cells were measured at commit 1111111, this code is 2222222" in caplog.text


def test_the_commit_is_the_checkouts_own_or_unknown(tmp_path):
    """A folder that is no checkout root (an installed wheel's, or one inside another repository) has no commit."""
    if (SOURCE_TREE / ".git").exists():  # run from a checkout (a clone, as CI's)
        assert re.fullmatch(r"[0-9a-f]{7,}(\+changes)?", git_commit())
    assert git_commit(tmp_path) == "unknown" and git_commit(SOURCE_TREE / "src") == "unknown"


def test_recipes_that_differ_only_in_their_method_digest_apart(sweep_file, tmp_path):
    """Each method's section at its defaults dumps empty: the method's name must still tell the cells apart."""
    sweep = load_sweep(sweep_file)
    files = {}
    for name in ("lora", "prefix_tuning"):
        raw = yaml.safe_load(open(sweep.methods["lora"]))
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump({**raw, "method": {"name": name}}))
    grid = sweep_module.cells(sweep.model_copy(update={"methods": {name: str(f) for name, f in files.items()}}))
    digests = {cell["method"]: cell["settings"] for cell in grid if cell["dataset"] == "sentiment" and cell["k"] == 2
               and cell["seed"] == 0}
    assert digests["lora"] != digests["prefix_tuning"]


@pytest.mark.parametrize("edit, fragment", [
    ({"methodz": {}}, "methodz: unknown key"),
    ({"k": "many"}, "k: Input should be a valid list"),
    ({"methods": {"lora": "missing.yaml"}}, "recipe not found: missing.yaml"),
    ({"k": []}, "k: List should have at least 1 item"),
])
def test_bad_sweep_files_are_named(sweep_file, edit, fragment):
    raw = yaml.safe_load(sweep_file.read_text())
    sweep_file.write_text(yaml.safe_dump({**raw, **edit}))
    with pytest.raises(SweepError) as error:
        load_sweep(sweep_file)
    assert fragment in str(error.value)


E2E = {"path": None, "text_field": "mr", "target_field": "ref", "references_field": "refs"}


@pytest.fixture
def generation_sweep(tiny_llama, tmp_path):
    """A generation recipe (E2E, MR → sentence) and zero-shot prompting, on a tiny chat Llama."""
    recipe = tmp_path / "e2e.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(
        tiny_llama, tmp_path / "unused", task="e2e", head={"type": "generate", "template": "Describe: {text}",
                                                           "max_new_tokens": 6},
        data={**E2E, "path": shared("e2e")}, training={"max_steps": 2, "batch_size": 4, "metrics": ["slot_coverage"]})))
    sweep = {"name": "e2e", "backbone": tiny_llama, "output": str(tmp_path / "out"), "test_limit": 3,
             "datasets": {"e2e": {**E2E, "path": shared("e2e")}},
             "methods": {"zeroshot": "zeroshot", "lora": str(recipe)}, "k": [4], "seeds": [0, 1]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_a_generation_sweep_reports_bleu_with_zero_shot_prompting(generation_sweep, tiny_llama):
    """Generation recipes in a sweep: each cell trains and scores its adapter (BLEU, chrF, ROUGE-L and
    the recipe's metrics), zero-shot is the bare backbone prompted with the recipe's template (what
    `evaluate_prompting` scores on those rows), the table and plots summarize BLEU, or `metric`."""
    sweep = load_sweep(generation_sweep)
    folder = run_sweep(sweep, show_progress=False)
    rows = sweep_module.read_results(folder / "results.jsonl")
    assert sorted((row["method"], row["k"], row["seed"]) for row in rows) == [("lora", 4, 0), ("lora", 4, 1),
                                                                               ("zeroshot", 0, 0)]
    assert all({"bleu", "chrf", "rouge_l", "slot_coverage"} <= set(row) for row in rows)
    for row in rows:
        if row["method"] == "lora":
            card = json.loads((folder / "adapters" / row["adapter"] / "card.json").read_text())
            assert card["kind"] == "generate" and card["k"] == 4 and card["seed"] == row["seed"]
    zero = next(row for row in rows if row["method"] == "zeroshot")
    recipe = sweep_module.cell_recipe(sweep, {"dataset": "e2e", "method": "zeroshot", "k": 0, "seed": 0}, folder)
    assert zero["bleu"] == pytest.approx(evaluate_prompting(Engine(tiny_llama, dtype="float32"), recipe)["bleu"])
    summary = json.loads((folder / "summary.json").read_text())
    assert {s["metric"] for s in summary} == {"bleu"}
    lora = next(s for s in summary if s["method"] == "lora")
    assert lora["bleu_mean"] == pytest.approx(sum(r["bleu"] for r in rows if r["method"] == "lora") / 2)
    assert "| e2e | lora | 4 | " in (folder / "summary.md").read_text()
    assert matplotlib.image.imread(folder / "accuracy_vs_k.png").std() > 0.05

    by_slots = run_sweep(sweep.model_copy(update={"metric": "slot_coverage"}), show_progress=False)  # no cell reruns
    assert "slot_coverage (mean ± std)" in (by_slots / "summary.md").read_text()


def test_in_context_cells_show_each_cell_its_own_k_shot_rows(generation_sweep, tiny_llama, tmp_path):
    """`incontext` cells run per k and seed, unprompted by any training: the bare backbone shown the first
    `shots` of the rows that cell's adapters train on (per class when classifying), scored as
    `evaluate_zero_shot` / `evaluate_prompting` score those prompts."""
    engine = Engine(tiny_llama, dtype="float32")
    classify = {"name": "sst2", "backbone": tiny_llama, "output": str(tmp_path / "out"), "test_limit": 6, "shots": 3,
                "datasets": {"sst2": {"path": shared("sst2")}}, "methods": {"incontext": "incontext"},
                "k": [2, 4], "seeds": [0, 1]}
    path = tmp_path / "classify.yaml"
    path.write_text(yaml.safe_dump(classify))
    sweep = load_sweep(path)
    rows = sweep_module.read_results(run_sweep(sweep, show_progress=False) / "results.jsonl")
    assert sorted((row["k"], row["seed"], row["shots"]) for row in rows) == [(2, 0, 2), (2, 1, 2), (4, 0, 3), (4, 1, 3)]
    data = DataConfig(path=shared("sst2"), k=None)
    train = load_task(data).train
    for row in rows:
        config = ZeroShotConfig(shots=row["shots"], seed=row["seed"], pool=row["k"])
        assert row["accuracy"] == evaluate_zero_shot(engine, data, config, limit=6)["accuracy"]
        shown = [train.texts[i] for i in demonstration_indices(train.labels, ["negative", "positive"], config)]
        drawn = load_task(data.model_copy(update={"k": row["k"], "seed": row["seed"]})).train.texts
        assert len(shown) == 2 * row["shots"] and set(shown) <= set(drawn)

    raw = yaml.safe_load(generation_sweep.read_text())
    generation_sweep.write_text(yaml.safe_dump({**raw, "shots": 2, "seeds": [1],
                                                "methods": {**raw["methods"], "incontext": "incontext"}}))
    sweep = load_sweep(generation_sweep)
    folder = run_sweep(sweep, show_progress=False)
    shown = next(row for row in sweep_module.read_results(folder / "results.jsonl") if row["method"] == "incontext")
    recipe = sweep_module.cell_recipe(sweep, {"dataset": "e2e", "method": "incontext", "k": 4, "seed": 1}, folder)
    assert (shown["k"], shown["seed"], shown["shots"]) == (4, 1, 2)
    assert shown["bleu"] == pytest.approx(evaluate_prompting(engine, recipe, shots=2)["bleu"])


@pytest.mark.parametrize("edit, fragment", [
    ({"metric": "accuracy"}, "metric 'accuracy': the cells of this sweep report bleu"),
    ({"methods": {"zeroshot": "zeroshot", "lora": "GENERATE", "classify": "CLASSIFY"}}, "mixes generation and classification"),
])
def test_bad_generation_sweeps_are_named(generation_sweep, tiny_bert, edit, fragment):
    raw = yaml.safe_load(generation_sweep.read_text())
    classify = generation_sweep.parent / "classify.yaml"
    classify.write_text(yaml.safe_dump(tiny_recipe(tiny_bert, generation_sweep.parent)))
    if "methods" in edit:
        edit = {"methods": {name: {"GENERATE": raw["methods"]["lora"], "CLASSIFY": str(classify)}.get(file, file)
                            for name, file in edit["methods"].items()}}
    generation_sweep.write_text(yaml.safe_dump({**raw, **edit}))
    with pytest.raises(SweepError, match=fragment):
        load_sweep(generation_sweep)


@pytest.mark.slow
def test_sweep_on_minilm_and_real_data(tmp_path):
    """A small real sweep: zero-shot and LoRA on AG News with MiniLM; each LoRA cell's adapter beats the
    zero-shot classifier it started from on the sweep's test rows."""
    from conftest import ROOT, assert_beats_its_start, shared

    sweep = {"name": "real", "backbone": "minilm", "output": str(tmp_path), "test_limit": 200,
             "datasets": {"agnews": {"path": shared("agnews")}},
             "methods": {"zeroshot": "zeroshot", "lora": str(ROOT / "recipes/sst2-lora-minilm.yaml")},
             "k": [8], "seeds": [0, 1]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    folder = run_sweep(load_sweep(path), show_progress=False)
    summary = {s["method"]: s for s in json.loads((folder / "summary.json").read_text())}
    assert summary["lora"]["seeds"] == 2
    engine = Engine("minilm", folder / "adapters", dtype="float32")
    rows = load_task(DataConfig(path=shared("agnews"), k=None, test_limit=200)).test
    results = sweep_module.read_results(folder / "results.jsonl")
    for adapter in [row["adapter"] for row in results if row["method"] == "lora"]:
        assert_beats_its_start(engine, adapter, rows)
    # the zero-shot cell is scored in float32, as the LoRA cells are, whatever this CPU computes fast
    zero = next(row for row in results if row["method"] == "zeroshot")
    assert zero["dtype"] == "float32"
    assert zero["accuracy"] == evaluate_zero_shot(engine, DataConfig(path=shared("agnews"), k=None), limit=200)["accuracy"]


def test_the_factory_refuses_what_it_cannot_train(tiny_bert, tmp_path):
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_bert, tmp_path / "unused")))
    (tmp_path / "a" / "same").mkdir(parents=True)
    (tmp_path / "b" / "same").mkdir(parents=True)
    with pytest.raises(SweepError, match="task folders not found: .*nowhere"):
        factory_sweep(recipe, [tmp_path / "nowhere"], "f", str(tmp_path))
    with pytest.raises(SweepError, match="distinct names"):
        factory_sweep(recipe, [tmp_path / "a/same", tmp_path / "b/same"], "f", str(tmp_path))
    sweep = factory_sweep(recipe, [tmp_path / "a/same"], "f", str(tmp_path), ["data.k=3"])
    assert (sweep.k, sweep.seeds, list(sweep.datasets)) == ([3], [0], ["same"])
    assert factory_sweep(recipe, [tmp_path / "a/same"], "f", str(tmp_path), ["data.k=null"]).k == [None]
