"""Merging into the backbone and combining adapters, on a tiny random BERT."""

import pytest
import torch

from adapterlab.engine import Engine
from adapterlab.merge import combine_adapters, load_merged, merge_adapter
from adapterlab.recipe import validate_recipe
from adapterlab.store import StoreError, read_card
from adapterlab.training import train
from conftest import tiny_recipe

TEXTS = ["the soup was cold", "loved every minute", "fine, I guess"]


@pytest.fixture(scope="module")
def store(tiny_bert, tmp_path_factory):
    store = tmp_path_factory.mktemp("merge-store")
    for name, data, method in [("a", "demo:sentiment", {"name": "lora", "r": 4}),
                               ("b", "demo:sentiment", {"name": "lora", "r": 4}),
                               ("r8", "demo:sentiment", {"name": "lora", "r": 8}),
                               ("prefix", "demo:sentiment", {"name": "prefix_tuning", "num_virtual_tokens": 4}),
                               ("topic", "demo:topic", {"name": "lora", "r": 4})]:
        raw = tiny_recipe(tiny_bert, store, task="sent", method=method, data={"path": data, "seed": len(name)},
                          training={"max_steps": 4, "lr": 0.05, "seed": len(name)}, output={"name": name})
        train(validate_recipe(raw), show_progress=False)
    return store


def test_merged_model_equals_the_adapter(store, tiny_bert, tmp_path):
    exported = merge_adapter(store, "sent/a", tmp_path / "merged")
    merged = load_merged(exported).scores(TEXTS)
    served = Engine(tiny_bert, store, dtype="float32").predict("sent/a", TEXTS)
    assert torch.allclose(merged, torch.tensor([list(p.scores.values()) for p in served]), atol=1e-5)
    assert read_card(exported).merged_from == "sent/a"


def test_a_merged_folder_is_read_through_the_stores_checks(store, tmp_path):
    """`load_merged` reads a merged folder's card and head as the store reads an adapter's: a head that
    lost a label is refused by name, and an adapter folder is not taken for a merged model."""
    from safetensors.torch import load_file, save_file

    exported = merge_adapter(store, "sent/b", tmp_path / "merged")
    head = load_file(exported / "head.safetensors")
    save_file({key: value[:1].contiguous() for key, value in head.items()}, exported / "head.safetensors")
    with pytest.raises(StoreError, match="head.safetensors holds"):
        load_merged(exported)
    with pytest.raises(StoreError, match="not a merged model"):
        load_merged(store / "sent" / "a")


def test_prefix_adapters_cannot_be_merged(store, tmp_path):
    with pytest.raises(StoreError, match="adds no weight updates and cannot be merged"):
        merge_adapter(store, "sent/prefix", tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("combination", ["linear", "ties", "dare_linear", "dare_ties", "svd"])
def test_combination_is_a_servable_adapter_with_a_report(store, tiny_bert, combination):
    path, report = combine_adapters(store, ["sent/a", "sent/b"], [0.6, 0.4], combination, f"ab-{combination}",
                                    density=0.5 if "dare" in combination or combination == "ties" else None,
                                    report_rows=8)
    card = read_card(path)
    assert [p["adapter"] for p in card.parents] == ["sent/a", "sent/b"] and card.combination["type"] == combination
    assert [p["adapter"] for p in report["parents"]] == ["sent/a", "sent/b"]
    engine = Engine(tiny_bert, store, dtype="float32")
    for parent in report["parents"]:  # the report's figures are the engine's, parent and combination
        data, limit = parent["data"], 8
        assert parent["accuracy_before"] == engine.evaluate(parent["adapter"], data, limit=limit)["accuracy"]
        assert parent["accuracy_after"] == engine.evaluate(str(path), data, limit=limit)["accuracy"]
    answers = engine.predict(f"sent/ab-{combination}", TEXTS)
    assert len(answers) == 3 and set(answers[0].scores) == {"negative", "positive"}


def test_linear_combination_adds_the_weighted_updates(store, tiny_bert):
    # peft's linear weights A and B each by sqrt(w): an adapter combined with itself at 0.25 + 0.25
    # has the update (sqrt(.25) + sqrt(.25))^2 = 1 times the original, i.e. is that adapter.
    combine_adapters(store, ["sent/a", "sent/a"], [0.25, 0.25], "linear", "aa", report_rows=4)
    same = Engine(tiny_bert, store, dtype="float32")
    a, aa = same.predict("sent/a", TEXTS), same.predict("sent/aa", TEXTS)
    for x, y in zip(a, aa):
        assert max(abs(x.scores[k] - y.scores[k]) for k in x.scores) < 1e-4


@pytest.mark.parametrize("refs, combination, fragment", [
    (["sent/a", "sent/topic"], "linear", "different label sets cannot share one head"),
    (["sent/a", "sent/r8"], "ties", "needs equal LoRA ranks"),
    (["sent/a"], "linear", "at least two adapters"),
    (["sent/a", "sent/prefix"], "svd", "cannot be combined"),
])
def test_refused_combinations(store, refs, combination, fragment):
    with pytest.raises((StoreError, ValueError), match=fragment):
        combine_adapters(store, refs, [1.0] * len(refs), combination, "bad")
    assert not (store / "sent" / "bad").exists()


def test_cli_merge_and_combine(store, tmp_path):
    import json

    from typer.testing import CliRunner

    from adapterlab.cli import app

    runner = CliRunner()
    merged = runner.invoke(app, ["merge", "sent/b", "--output", str(tmp_path / "m"), "--store", str(store), "--json"])
    assert merged.exit_code == 0, merged.output
    assert (tmp_path / "m" / "model.safetensors").exists()
    combined = runner.invoke(app, ["combine", "sent/a", "sent/b", "--name", "cli", "--combination", "svd",
                                   "--limit", "4", "--store", str(store), "--json"])
    assert combined.exit_code == 0, combined.output
    assert len(json.loads(combined.stdout.strip().splitlines()[-1])["parents"]) == 2
    refused = runner.invoke(app, ["combine", "sent/a", "sent/topic", "--name", "x", "--store", str(store)])
    assert refused.exit_code == 2 and "different label sets" in refused.stderr


def test_adapters_of_different_backbones_are_not_combined(store):
    import json
    import shutil

    foreign = store / "sent" / "foreign"
    shutil.copytree(store / "sent" / "b", foreign)
    card = json.loads((foreign / "card.json").read_text())
    (foreign / "card.json").write_text(json.dumps({**card, "name": "foreign", "backbone": "other",
                                                   "backbone_fingerprint": "sha256:" + "0" * 64}))
    with pytest.raises(StoreError, match="trained on different backbones cannot be combined: .*on other"):
        combine_adapters(store, ["sent/a", "sent/foreign"], [0.5, 0.5], "linear", "bad")
    shutil.rmtree(foreign)
