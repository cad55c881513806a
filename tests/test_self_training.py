"""training.self_train: pseudo-labels on data.unlabeled (confident, class-balanced, capped), the unlabeled
texts read without the k-shot rows or the test split, the retraining and what the card records."""

import json

import pytest
import torch

from adapterlab.data import DataError, Pool, Split, load_task, read_unlabeled
from adapterlab.errors import AdapterlabError
from adapterlab.engine import Engine
from adapterlab.model import AdapterModel
from adapterlab.recipe import RecipeError, load_recipe, validate_recipe
from adapterlab.store import read_card
from adapterlab.training import train
from adapterlab.training.self_training import pseudo_labels, training_rows
from conftest import ROOT, paired_counts, shared, tiny_recipe

SELF_TRAIN = {"rounds": 1, "threshold": 0.0, "keep_fraction": 1.0, "steps": 1.0}


def self_training(backbone, store, self_train=SELF_TRAIN, **data) -> dict:
    return tiny_recipe(backbone, store, data={"unlabeled": "train", **data},
                       training={"self_train": self_train})


def settings(**fields):
    return validate_recipe(self_training("minilm", "store", self_train={**SELF_TRAIN, **fields})).training.self_train


def test_pseudo_labels_keep_the_confident_rows_of_each_class_up_to_its_share():
    probabilities = torch.tensor([[0.95, 0.05], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9], [0.55, 0.45]])
    kept = pseudo_labels(probabilities, settings(threshold=0.65, balance=False))
    assert kept.indices == [0, 2, 4, 3] and kept.labels == [0, 0, 1, 1]  # most confident first, 0.6 and 0.55 dropped
    assert kept.confidences == pytest.approx([0.95, 0.8, 0.9, 0.7])
    capped = pseudo_labels(probabilities, settings(keep_fraction=1 / 3, balance=False))  # 6 rows / 3 / 2 classes
    assert capped.indices == [0, 4] and capped.per_class(2) == [1, 1]


def test_balance_cuts_every_class_to_the_fewest():
    # five rows predicted 'a', one each 'b' and 'c': unbalanced, 'a' keeps its share (7 rows / 3 classes)
    probabilities = torch.tensor([[0.9, 0.1, 0.0]] * 5 + [[0.2, 0.8, 0.0], [0.1, 0.2, 0.7]])
    assert pseudo_labels(probabilities, settings(balance=False)).per_class(3) == [2, 1, 1]
    balanced = pseudo_labels(probabilities, settings())
    assert balanced.per_class(3) == [1, 1, 1] and balanced.indices == [0, 5, 6]
    # a class with no row above the threshold leaves none for any class when balanced
    assert pseudo_labels(probabilities, settings(threshold=0.75)).indices == []


def test_retraining_rows_repeat_the_labelled_rows_to_their_share():
    labelled = Split(["x", "y"], [0, 1])
    pool = Pool([f"u{i}" for i in range(10)], None, [], [])
    kept = pseudo_labels(torch.tensor([[0.9, 0.1]] * 5 + [[0.1, 0.9]] * 5), settings())
    rows = training_rows(labelled, pool, kept, labelled_share=0.5)
    assert rows.texts[:10] == ["x", "y"] * 5 and sorted(rows.texts[10:]) == sorted(pool.texts)
    assert rows.labels == [0, 1] * 5 + [0] * 5 + [1] * 5
    assert len(training_rows(labelled, pool, kept, labelled_share=0.0)) == 12  # once each, no repeats
    paired_pool = Pool(pool.texts, [text + "'" for text in pool.texts], [], [])
    pairs = training_rows(Split(["x", "y"], [0, 1], ["x2", "y2"]), paired_pool, kept, labelled_share=0.5)
    assert [second.rstrip("'") for second in pairs.text_pairs[10:]] == pairs.texts[10:]  # each text keeps its pair


def test_train_means_the_train_rows_other_than_the_k_shot_rows(tiny_bert, tmp_path):
    recipe = validate_recipe(self_training(tiny_bert, tmp_path))
    task, pool = load_task(recipe.data), read_unlabeled(recipe.data)
    everything = load_task(recipe.data.model_copy(update={"k": None}))
    assert not set(pool.texts) & set(task.train.texts)
    assert sorted(pool.texts + task.train.texts) == sorted(everything.train.texts)
    assert not set(pool.texts) & set(everything.test.texts)

    capped = recipe.data.model_copy(update={"unlabeled_rows": 5})
    drawn = read_unlabeled(capped).texts
    assert len(drawn) == 5 and set(drawn) <= set(pool.texts) and drawn == read_unlabeled(capped).texts
    assert drawn != read_unlabeled(capped.model_copy(update={"seed": 1})).texts


def test_unlabeled_files_and_what_is_refused(tmp_path):
    lines = tmp_path / "texts.txt"
    lines.write_text("first text\n\nsecond text\n")
    rows = tmp_path / "texts.jsonl"
    rows.write_text("".join(json.dumps({"body": t, "label": "ignored"}) + "\n" for t in ("a", "b", "c")))
    data = validate_recipe(self_training("minilm", tmp_path)).data
    assert read_unlabeled(data.model_copy(update={"unlabeled": str(lines)})).texts == ["first text", "second text"]
    from_jsonl = data.model_copy(update={"unlabeled": str(rows), "text_field": "body", "unlabeled_rows": 2})
    assert len(read_unlabeled(from_jsonl).texts) == 2

    sst2 = data.model_copy(update={"path": shared("sst2"), "unlabeled": f"{shared('sst2')}/test.jsonl"})
    with pytest.raises(DataError, match="is the test split"):
        read_unlabeled(sst2)
    with pytest.raises(DataError, match="one text a line"):
        read_unlabeled(data.model_copy(update={"unlabeled": str(lines), "text_pair_field": "hypothesis"}))
    with pytest.raises(DataError, match="data not found"):
        read_unlabeled(data.model_copy(update={"unlabeled": str(tmp_path / "missing.txt")}))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="no rows left to pseudo-label"):
        read_unlabeled(data.model_copy(update={"unlabeled": str(tmp_path / "empty.txt")}))


@pytest.mark.parametrize("change, message", [
    ({"data": {"unlabeled": None}}, "training.self_train and data.unlabeled go together"),
    ({"training": {"self_train": None}}, "training.self_train and data.unlabeled go together"),
    ({"data": {"k": None}}, "with data.k null every train row is labelled"),
    ({"training": {"checkpoint_every": 5}}, "cannot resume"),
    ({"training": {"self_train": {"threshold": 1.0}}}, "training.self_train.threshold: Input should be less than 1"),
    ({"training": {"self_train": {"keep_fraction": 0}}}, "training.self_train.keep_fraction: Input should be greater"),
    ({"training": {"self_train": {"rounds": 0}}}, "training.self_train.rounds: Input should be greater"),
    ({"training": {"self_train": {"labelled_share": 1}}}, "training.self_train.labelled_share: Input should be less"),
    ({"training": {"self_train": {"epochs": 3}}}, "training.self_train.epochs: unknown key"),
    ({"data": {"unlabeled_rows": 0}}, "data.unlabeled_rows: Input should be greater than 0"),
    ({"head": {"type": "generate"}, "data": {"target_field": "label"}}, "needs a classification task"),
])
def test_bad_fields_are_refused_by_name(change, message):
    raw = self_training("minilm", "store")
    for section, values in change.items():
        for key, value in values.items():
            if isinstance(value, dict):
                raw[section][key] = {**raw[section][key], **value}
            else:
                raw.setdefault(section, {})[key] = value
    with pytest.raises(RecipeError, match=message):
        validate_recipe(raw)


def test_self_training_reads_no_test_row_and_the_card_records_the_rounds(tiny_bert, tmp_path, monkeypatch):
    raw = self_training(tiny_bert, tmp_path, self_train={**SELF_TRAIN, "rounds": 2}, test_limit=4)
    recipe = validate_recipe(raw)
    task, pool = load_task(recipe.data), read_unlabeled(recipe.data)
    trained, scored = [], []  # every text a model trained on or scored
    real_batch, real_scores = AdapterModel.batch, AdapterModel.scores
    monkeypatch.setattr(AdapterModel, "batch", lambda self, rows, indices, *a, **kw: (
        trained.extend(rows.texts[i] for i in indices), real_batch(self, rows, indices, *a, **kw))[1])
    monkeypatch.setattr(AdapterModel, "scores", lambda self, texts, *a, **kw: (
        scored.append(list(texts)), real_scores(self, texts, *a, **kw))[1])
    result = train(recipe, show_progress=False)

    assert set(trained) <= set(task.train.texts) | set(pool.texts) and set(trained) & set(pool.texts)
    assert scored[:2] == [pool.texts, pool.texts] and scored[2] == task.test.texts  # two rounds, then the test
    record = read_card(result.adapter_path).self_training
    assert record["setting"] == f"k=4 labelled + {len(pool)} unlabeled" and record["unlabeled_rows"] == len(pool)
    assert [r["round"] for r in record["rounds"]] == [1, 2]
    for r in record["rounds"]:
        assert sum(r["kept_per_class"].values()) == r["kept"] and set(r["kept_per_class"]) == set(task.label_names)
        assert len(set(r["kept_per_class"].values())) == 1  # balanced
        assert r["training_rows"] == r["kept"] + r["labelled_repeats"] * len(task.train)
        assert r["steps"] == 1 * 3  # steps 1.0 x the k-shot run's max_steps 3
    assert record["seconds"] <= result.train_seconds


@pytest.mark.slow
def test_minilm_self_trained_on_real_unlabeled_rows_beats_zero_shot(tmp_path, capsys):
    """The recommended MiniLM recipe on MPQA with k=8 and 300 unlabeled train rows, a few epochs: the
    self-trained adapter beats the zero-shot classifier it started from on the same 300 test rows (a
    paired sign test), and the card records the pseudo-labels kept per class."""
    recipe = load_recipe(ROOT / "recipes" / "sst2-lora-minilm-tied.yaml", [
        f"data.path={shared('mpqa')}", "task=mpqa", "data.k=8", "data.test_limit=300", "training.epochs=10",
        "data.unlabeled=train", "data.unlabeled_rows=300", "training.self_train={threshold: 0.8}",
        f"output.store={tmp_path}", "output.name=st"])
    result = train(recipe, show_progress=False)
    record = read_card(result.adapter_path).self_training
    (kept,) = [r["kept_per_class"] for r in record["rounds"]]
    assert record["setting"] == "k=8 labelled + 300 unlabeled" and set(kept) == {"negative", "positive"}
    assert kept["negative"] == kept["positive"] > 0

    engine = Engine("minilm", tmp_path, dtype="float32")
    test = load_task(recipe.data).test
    wins, losses, _ = paired_counts(engine, "mpqa/st", test)
    with capsys.disabled():
        print(f"\nmpqa k=8 + 300 unlabeled: test {result.metrics['accuracy']:.3f}, kept {kept}, "
              f"{wins} rows won and {losses} lost against zero-shot, {result.train_seconds:.0f} s")
    assert wins - losses >= max(1.0, 2 * (wins + losses) ** 0.5)


def test_stored_teachers_label_the_first_round_instead_of_a_k_shot_run(tiny_bert, tmp_path, monkeypatch):
    from adapterlab.training import self_training as mode  # its k-shot run's fit and its rounds'

    teacher = train(validate_recipe(tiny_recipe(tiny_bert, tmp_path, output={"name": "teacher"})), show_progress=False)
    other = tiny_recipe(tiny_bert, tmp_path, task="topic", data={"path": "demo:topic", "k": 2}, output={"name": "t"})
    train(validate_recipe(other), show_progress=False)
    fits = []
    real_fit = mode.fit
    monkeypatch.setattr(mode, "fit", lambda model, rows, *a, **kw: (
        fits.append(len(rows)), real_fit(model, rows, *a, **kw))[1])
    ensemble = {**SELF_TRAIN, "teachers": ["sentiment/teacher", str(teacher.adapter_path)]}
    result = train(validate_recipe(self_training(tiny_bert, tmp_path, self_train=ensemble)), show_progress=False)
    record = read_card(result.adapter_path).self_training
    assert len(fits) == 1 and fits[0] == record["rounds"][0]["training_rows"]  # the retraining alone
    assert record["teachers"] == ensemble["teachers"] and record["rounds"][0]["kept"] > 0

    with pytest.raises(AdapterlabError, match="topic/t has labels"):
        train(validate_recipe(self_training(tiny_bert, tmp_path, self_train={**SELF_TRAIN, "teachers": ["topic/t"]})),
              show_progress=False)
