"""The engine on the real backbones with adapters trained on ../shared/data (briefly: these tests
check serving, not accuracy): mixed batches equal separate runs, eviction changes nothing, merged
equals served, combinations report, and other backbones are refused."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from adapterlab.backbones import load_backbone
from adapterlab.engine import Engine, Request
from adapterlab.merge import combine_adapters, load_merged, merge_adapter
from adapterlab.precision import cpu_capability
from adapterlab.recipe import load_recipe
from adapterlab.store import StoreError, verify
from adapterlab.training import train
from conftest import ROOT, assert_same_scores, shared

pytestmark = pytest.mark.slow

MINILM = {  # task: (recipe, data, k)
    "sst2": ("sst2-lora-minilm.yaml", "sst2", 4),
    "imdb": ("sst2-lora-minilm.yaml", "imdb", 4),
    "emotion": ("sst2-lora-minilm.yaml", "emotion", 4),
    "banking77": ("sst2-lora-minilm.yaml", "banking77", 2),
    "sst2-prefix": ("sst2-prefix-minilm.yaml", "sst2", 4),
}
SMOLLM2 = {"sst2-llm": ("sst2-lora-smollm2.yaml", 2), "sst2-llm-prefix": ("sst2-prefix-smollm2.yaml", 2)}


def _train(store, recipe_file, task, data, k, steps):
    recipe = load_recipe(ROOT / "recipes" / recipe_file, [
        f"task={task}", f"data.path={shared(data)}", f"data.k={k}", "data.test_limit=16",
        f"training.max_steps={steps}", f"output.store={store}", "output.name=a"])
    train(recipe, show_progress=False)
    return f"{task}/a"


@pytest.fixture(scope="module")
def minilm_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("real-minilm")
    refs = [_train(store, recipe, task, data, k, 6) for task, (recipe, data, k) in MINILM.items()]
    return store, refs


@pytest.fixture(scope="module")
def texts():
    rows = [json.loads(line) for line in open(shared("emotion") + "/test.jsonl")][:6]
    return [row["text"] for row in rows] + ["I want to freeze my card", "a dull, lifeless film"]


def assert_same(mixed, alone):
    for m, a in zip(mixed, alone):
        assert m.label == a.label
        assert_same_scores(m.scores, a.scores)


def test_minilm_mixed_batch_lora_prefix_heads_and_base(minilm_store, texts):
    store, refs = minilm_store
    engine = Engine("minilm", store, dtype="float32")
    requests = [Request(refs[i % len(refs)], text) for i, text in enumerate(texts * 2)]
    requests += [Request(None, text, labels=("happy", "sad")) for text in texts[:2]]
    mixed = engine.predict_batch(requests)
    assert_same(mixed, [engine.predict_batch([r])[0] for r in requests])
    assert {len(m.scores) for m in mixed} == {2, 6, 77}


def test_minilm_eviction_and_reload(minilm_store, texts):
    store, refs = minilm_store
    engine = Engine("minilm", store, max_adapters=2, dtype="float32")
    first = [engine.predict(ref, texts) for ref in refs]
    again = [engine.predict(ref, texts) for ref in refs]
    assert engine.stats["evictions"] >= len(refs)
    for a, b in zip(first, again):
        assert_same(a, b)


def test_minilm_merge_and_combine(minilm_store, texts, tmp_path):
    store, refs = minilm_store
    merged = load_merged(merge_adapter(store, "sst2/a", tmp_path / "merged")).scores(texts)
    served = Engine("minilm", store, dtype="float32").predict("sst2/a", texts)
    assert max(abs(float(merged[i, j]) - list(p.scores.values())[j]) for i, p in enumerate(served)
               for j in range(2)) < 1e-4
    path, report = combine_adapters(store, ["sst2/a", "imdb/a"], [0.5, 0.5], "ties", "sentiment",
                                    task="sentiment", density=0.5, report_rows=50)
    assert [p["adapter"] for p in report["parents"]] == ["sst2/a", "imdb/a"]
    engine = Engine("minilm", store, dtype="float32")  # the report's figures are full precision's
    for parent in report["parents"]:
        assert parent["accuracy_after"] == engine.evaluate(str(path), parent["data"], limit=50)["accuracy"]
    with pytest.raises(StoreError, match="different label sets"):
        combine_adapters(store, ["sst2/a", "emotion/a"], [0.5, 0.5], "linear", "bad")


def test_smollm2_mixed_batch_lora_prefix_and_base(tmp_path, texts, minilm_store):
    refs = [_train(tmp_path, recipe, task, "sst2", k, 2) for task, (recipe, k) in SMOLLM2.items()]
    engine = Engine("smollm2-135m", tmp_path, dtype="float32")
    requests = [Request(refs[i % 2], text) for i, text in enumerate(texts)]
    requests += [Request(None, texts[0], labels=("Positive", "Negative"))]
    assert_same(engine.predict_batch(requests), [engine.predict_batch([r])[0] for r in requests])
    minilm_refs = minilm_store[1]
    with pytest.raises(StoreError, match="trained on backbone 'minilm'"):
        engine.predict(str(minilm_store[0] / minilm_refs[0]), texts[:1])


def test_minilm_damaged_adapter_is_refused_and_long_reviews_are_flagged(minilm_store, tmp_path):
    """On the real backbone too: an adapter with NaN weights and one whose head lost a label are named
    by verify and refused by the engine; an IMDB review longer than 128 tokens is answered, flagged."""
    store, _ = minilm_store
    backbone = load_backbone("minilm")
    for name, damage, fragment in (
            ("nan", lambda t: t["linear.weight"].fill_(float("nan")), "not finite"),
            ("short", lambda t: t.update({k: v[:1] for k, v in t.items()}), "head.safetensors holds")):
        folder = tmp_path / "sst2" / name
        shutil.copytree(store / "sst2" / "a", folder)
        head = load_file(folder / "head.safetensors")
        damage(head)
        save_file(head, folder / "head.safetensors")
        assert any(fragment in problem for problem in verify(folder, backbone))
        with pytest.raises(StoreError, match=fragment):
            Engine(backbone, store).predict(str(folder), ["fine"])
    review = next(json.loads(line)["text"] for line in open(shared("imdb") + "/test.jsonl")
                  if len(json.loads(line)["text"]) > 2000)
    long, short = Engine(backbone, store).predict("imdb/a", [review, "a fine film"])
    assert long.truncated and not short.truncated


@pytest.mark.parametrize("task", ["sst2", "sst2-prefix"])
def test_minilm_in_bfloat16_answers_within_half_a_point_of_float32(minilm_store, task):
    """1,000 SST-2 rows (the first of its train split; the adapter saw 8 of 67,349) served in bfloat16
    and in float32: LoRA deltas or prefixes, head and backbone all in the engine's dtype. Where the CPU
    has no fast bf16 (AVX2 alone: ~30x slower than float32) the first 200 rows, so that the suite keeps
    its time there."""
    store, _ = minilm_store
    rows = 1000 if cpu_capability()["fast_bf16"] else 200
    accuracy = {dtype: Engine("minilm", store, dtype=dtype).evaluate(f"{task}/a", shared("sst2"), "train", rows)
                for dtype in ("bfloat16", "float32")}
    assert accuracy["bfloat16"]["rows"] == rows
    rows_apart = round(abs(accuracy["bfloat16"]["accuracy"] - accuracy["float32"]["accuracy"]) * rows)
    assert rows_apart <= 0.005 * rows, accuracy  # counted in rows: at 200 rows half a point is one row, no float slack
