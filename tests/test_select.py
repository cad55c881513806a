"""Which rows to label (`adapterlab select`): the choice on a tiny random BERT and on synthetic scores,
the file a person labels (and trains on), the errors, and on MiniLM a choice that covers the pool."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from adapterlab.cli import app
from adapterlab.data import load_task, read_pool
from adapterlab.engine import Engine
from adapterlab.recipe import validate_recipe
from adapterlab.selection import choose_rows, embed_and_guess, select_rows
from adapterlab.training import train
from adapterlab.zeroshot import zero_shot_servable
from conftest import shared, tiny_recipe


def run_select(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["select", *map(str, args)])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def tiny_engine(tiny_bert) -> Engine:
    return Engine(tiny_bert, "unused-store", dtype="float32")


@pytest.fixture(scope="module")
def agnews_pool():
    return read_pool(shared("agnews"), limit=300)


def test_choose_rows_takes_k_per_guessed_class_and_fills_a_rare_one_with_its_nearest_rows():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(102, 8)).astype(np.float32)
    scores = rng.uniform(size=(102, 3)).astype(np.float32)
    scores[:50, 0] += 2  # class 0 guessed for rows 0-49, class 1 for 50-99, class 2 for rows 100 and 101
    scores[50:100, 1] += 2
    scores[100:, 2] += 2
    chosen = choose_rows(vectors, scores, k=5, seed=0)
    guesses = scores[chosen].argmax(1)
    assert len(chosen) == 15 and len(set(chosen)) == 15
    assert Counter(guesses[:12].tolist()) == {0: 5, 1: 5, 2: 2} and set(chosen[10:12]) == {100, 101}
    unchosen = [i for i in np.argsort(-scores[:, 2], kind="stable") if i not in chosen[:12]]
    assert chosen[12:] == unchosen[:3]  # the rest of class 2's share: the rows it scores highest


def test_k_rows_per_label_distinct_and_reproducible(tiny_engine, agnews_pool):
    names, descriptions = agnews_pool.label_names, agnews_pool.label_descriptions
    first = select_rows(tiny_engine, agnews_pool, names, descriptions, k=4, seed=0)
    again = select_rows(tiny_engine, agnews_pool, names, descriptions, k=4, seed=0)
    other = select_rows(tiny_engine, agnews_pool, names, descriptions, k=4, seed=1)
    assert len(first.indices) == 16 and len(set(first.indices)) == 16
    assert first == again and first.indices != other.indices
    classifier = zero_shot_servable(tiny_engine.backbone, names, descriptions)
    guesses = [p.label for p in tiny_engine.classify(classifier, agnews_pool.texts)]
    assert first.suggested_labels == [guesses[i] for i in first.indices]  # the engine's own zero-shot answers
    for name in names:  # k of each class guessed often enough; all of a rarer one's
        assert first.suggested_labels.count(name) >= min(4, guesses.count(name))


def test_the_file_to_label_trains_once_labelled(tiny_bert, tmp_path):
    out = tmp_path / "to-label.jsonl"
    code, output = run_select("--data", shared("agnews"), "--limit", 300, "--k", 2, "--backbone", tiny_bert,
                              "--out", out, "--json", "--dtype", "float32")
    assert code == 0, output
    report = json.loads(output.strip().splitlines()[-1])
    assert report["rows"] == 8 and sum(report["per_suggested_label"].values()) == 8
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8 and all(r["label"] is None and r["suggested_label"] in report["per_suggested_label"]
                                  for r in rows)
    names = json.loads((Path(shared("agnews")) / "labels.json").read_text())
    truth = [json.loads(line) for line in (Path(shared("agnews")) / "train.jsonl").open()][:300]
    for row in rows:  # the person's labels: the data's own
        assert row["text"] == truth[row["pool_index"]]["text"]
        row["label"] = names[truth[row["pool_index"]]["label"]]
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = validate_recipe(tiny_recipe(tiny_bert, tmp_path / "store", task="agnews", data={
        "path": str(out), "k": None, "labels": names, "test_path": str(Path(shared("agnews")) / "test.jsonl"),
        "test_limit": 20}))
    assert len(load_task(recipe.data).train) == 8
    result = train(recipe, show_progress=False)
    assert result.adapter_path.is_dir() and 0 <= result.metrics["accuracy"] <= 1


@pytest.mark.parametrize("case, expected", [
    ("too_many", "the pool has 10"), ("no_labels", "no label names"), ("empty", "no rows to choose from"),
    ("not_utf8", "not UTF-8"), ("missing", "data not found")])
def test_errors_are_named(tiny_bert, tmp_path, case, expected):
    pool = tmp_path / "pool" / "texts.jsonl"
    pool.parent.mkdir()
    pool.write_text("".join(json.dumps({"text": f"text {i}"}) + "\n" for i in range(10)))
    if case != "no_labels":
        (pool.parent / "labels.json").write_text('["a", "b"]')
    if case == "empty":
        pool.write_text("")
    if case == "not_utf8":
        pool.write_bytes(b'{"text": "caf\xe9"}\n')
    if case == "missing":
        pool = tmp_path / "nowhere.jsonl"
    code, output = run_select("--data", pool, "--k", 8, "--backbone", tiny_bert, "--out", tmp_path / "out.jsonl")
    assert code == 2 and expected in output, output
    assert not (tmp_path / "out.jsonl").exists()


def test_minilm_picks_cover_every_class_and_the_pool_better_than_random_draws():
    """On 500 AG News rows, k=4: the picks' true labels include every class, and they represent the pool
    (mean cosine similarity of each pool row to its nearest pick) better than 95% of random draws of the
    same size."""
    engine = Engine("minilm", "unused-store", dtype="float32")
    pool = read_pool(shared("agnews"), limit=500)
    truth = [json.loads(line)["label"] for line in (Path(shared("agnews")) / "train.jsonl").open()][:500]
    classifier = zero_shot_servable(engine.backbone, pool.label_names, pool.label_descriptions)
    vectors, scores = embed_and_guess(engine, classifier, pool)
    chosen = choose_rows(vectors, scores, k=4, seed=0)
    assert {truth[i] for i in chosen} == set(range(len(pool.label_names)))

    def coverage(rows) -> float:
        return float((vectors @ vectors[rows].T).max(1).mean())

    rng = np.random.default_rng(0)
    random_draws = [coverage(rng.choice(len(pool), len(chosen), replace=False)) for _ in range(200)]
    assert coverage(chosen) > np.quantile(random_draws, 0.95), (coverage(chosen), max(random_draws))
