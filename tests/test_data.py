import json
from collections import Counter

import pytest

from adapterlab.data import DataError, load_task
from adapterlab.recipe import DataConfig
from conftest import shared


def config(**values) -> DataConfig:
    return DataConfig.model_validate(values)


def test_k_shot_is_balanced_and_reproducible():
    data = config(path=shared("agnews"), k=8, seed=3)
    first, second = load_task(data), load_task(data)
    assert Counter(first.train.labels) == {0: 8, 1: 8, 2: 8, 3: 8}
    assert first.train.texts == second.train.texts
    other_seed = load_task(config(path=shared("agnews"), k=8, seed=4))
    assert other_seed.train.texts != first.train.texts
    assert first.label_names == json.loads(open(shared("agnews") + "/labels.json").read())
    assert len(first.test) == 2000


def test_k_too_large_names_the_class():
    with pytest.raises(DataError, match=r"class '\w+' has only 12 training examples, k=13"):
        load_task(config(path="demo:sentiment", k=13))


def test_sentence_pairs_are_read():
    task = load_task(config(path=shared("rte"), text_pair_field="text_pair", k=4))
    assert task.train.text_pairs is not None and len(task.train.text_pairs) == 8


def test_demo_data_has_descriptions():
    task = load_task(config(path="demo:intent", k=None))
    assert len(task.label_names) == 5 and len(task.train) == 60
    assert all(d != n for d, n in zip(task.label_descriptions, task.label_names))


def test_csv_file_with_label_names(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\ngood,pos\nbad,neg\nfine,pos\nawful,neg\n")
    task = load_task(config(path=str(tmp_path / "train.csv"), labels=["neg", "pos"], k=2))
    assert sorted(task.train.labels) == [0, 0, 1, 1] and task.test is None


@pytest.mark.parametrize("rows, labels, fragment", [
    ('{"text": "a", "label": "maybe"}\n', ["no", "yes"], "label 'maybe' is not in the label list (no, yes)"),
    ('{"text": "a", "label": 5}\n', ["no", "yes"], "label 5 is not in the label list"),
    ('{"txt": "a", "label": 0}\n', ["no", "yes"], "no column 'text'"),
    ('not json\n', ["no", "yes"], "train.jsonl:1: not a JSON object"),
])
def test_bad_rows_name_the_problem(tmp_path, rows, labels, fragment):
    (tmp_path / "train.jsonl").write_text(rows)
    with pytest.raises(DataError) as error:
        load_task(config(path=str(tmp_path), labels=labels, k=None))
    assert fragment in str(error.value)


def test_missing_data_and_unknown_demo():
    with pytest.raises(DataError, match="data not found: nowhere/train.jsonl"):
        load_task(config(path="nowhere/train.jsonl"))
    with pytest.raises(DataError, match="unknown demo dataset 'demo:nope'"):
        load_task(config(path="demo:nope"))


def test_labels_that_disagree_with_labels_json():
    with pytest.raises(DataError, match="differ from the expected labels"):
        load_task(config(path=shared("sst2"), labels=["bad", "good"]))


def test_hub_dataset_offline_is_a_clear_error():
    # Offline here: the hub path must fail with a message naming the dataset, not a traceback.
    with pytest.raises(DataError, match="'someone/some-dataset' is not a local path"):
        load_task(config(path="someone/some-dataset"))
