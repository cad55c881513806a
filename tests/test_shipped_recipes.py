"""Each shipped recipe, trained for real on ../shared/data (AG News, 4 classes).

Asserts that the adapter beats the zero-shot classifier it started from on the same held-out rows (a
paired test, `assert_beats_its_start`), that only adapter and head parameters moved, that the saved
adapter reloads to identical predictions, and that the other backbone refuses it.
"""

import pytest
import torch

from adapterlab.backbones import load_backbone
from adapterlab.engine import Engine
from adapterlab.loading import load_adapter
from adapterlab.recipe import load_recipe
from adapterlab.store import StoreError, save_adapter
from adapterlab.training.builders import setup
from adapterlab.training.loop import evaluate, fit
from adapterlab.training.result import make_card
from adapterlab.model import parameter_counts
from conftest import ROOT, assert_beats_its_start, shared

AGNEWS_LLM = ["head.template=Classify the topic of this news article as world, sports, business or science."
              "\n\nArticle: {text}", "head.label_words={Sci/Tech: Science}"]
# The LLM runs are kept short (k=8, 3 epochs, 100 test rows): a 135M model trains slowly on 2 cores.
CASES = {
    # recipe: (overrides, k, test rows)
    "sst2-lora-minilm.yaml": ([], 16, 200),
    "sst2-lora-minilm-all-layers.yaml": ([], 8, 200),
    "sst2-lora-minilm-tied.yaml": ([], 8, 200),
    "sst2-prefix-minilm.yaml": ([], 16, 200),
    "sst2-lora-smollm2.yaml": (AGNEWS_LLM + ["training.epochs=3"], 8, 100),
    "sst2-prefix-smollm2.yaml": (AGNEWS_LLM + ["training.epochs=3"], 8, 100),
}
OTHER = {"minilm": "smollm2-135m", "smollm2-135m": "minilm"}


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_shipped_recipe_learns_saves_and_reloads(name, tmp_path):
    overrides, k, test_rows = CASES[name]
    recipe = load_recipe(ROOT / "recipes" / name, overrides + [
        f"data.path={shared('agnews')}", f"data.k={k}", f"data.test_limit={test_rows}", f"output.store={tmp_path}"])
    accelerator, task, model = setup(recipe)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable, total = parameter_counts(model)
    assert trainable / (total - trainable) < 0.01

    fit(model, task.train, recipe, accelerator, show_progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    allowed = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("head.") or "lora_" in n or "prompt_encoder" in n for n in allowed)
    if model.tied:  # the head's rows are written once, at the end, from the tied label descriptions
        allowed.add("head.linear.weight")
    assert changed and changed <= allowed

    if model.tied:  # settled rows lean from the descriptions towards their labels' training texts
        with torch.no_grad():
            described = torch.nn.functional.normalize(model.label_vectors(torch.arange(len(task.label_names))), dim=-1)
        vectors, labels = model.text_vectors(task.train.texts), torch.tensor(task.train.labels)
        prototypes = torch.stack([vectors[labels == c].mean(0) for c in range(len(task.label_names))])
        rows = torch.nn.functional.normalize(model.head.linear.weight, dim=-1)
        assert ((rows * prototypes).sum(-1) > (described * prototypes).sum(-1)).all()

    metrics = evaluate(model, task.test, recipe)
    folder, _ = save_adapter(model, make_card(recipe, task, model, trainable, total, 0.0, metrics), tmp_path)

    texts = task.test.texts[:16]
    expected = model.scores(texts)
    engine = Engine(recipe.backbone, tmp_path, dtype="float32")  # a fresh backbone, as another process loads it
    reloaded = torch.tensor([list(p.scores.values()) for p in engine.predict(str(folder), texts)])
    assert torch.allclose(reloaded, expected, atol=1e-5)
    assert assert_beats_its_start(engine, str(folder), task.test) == metrics["accuracy"]  # the engine's answers

    with pytest.raises(StoreError, match=f"trained on backbone '{recipe.backbone}'"):
        load_adapter(folder, load_backbone(OTHER[recipe.backbone]))
