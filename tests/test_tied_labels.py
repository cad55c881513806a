"""head.tie_labels: training scores texts against the label descriptions embedded through the adapted
backbone, then writes those vectors into a plain classifier."""

import pytest
import torch

from adapterlab.backbones import load_backbone
from adapterlab.data import load_task
from adapterlab.engine import Engine
from adapterlab.loading import load_adapter
from adapterlab.model import _step_labels, build_adapter_model, parameter_counts
from adapterlab.recipe import RecipeError, validate_recipe
from adapterlab.store import save_adapter
from adapterlab.training import train
from adapterlab.training.builders import setup
from adapterlab.training.loop import fit, schedule
from adapterlab.training.result import make_card
from conftest import tiny_recipe

TIED = {"tie_labels": True}


def test_tied_scores_start_as_the_zero_shot_classifier(tiny_bert, tmp_path):
    """Before training the adapter is the identity, so the descriptions embedded through it are the
    head's first rows: tied and plain scores agree."""
    recipe = validate_recipe(tiny_recipe(tiny_bert, tmp_path, head=TIED, data={"path": "demo:intent", "k": 4}))
    task = load_task(recipe.data)
    model = build_adapter_model(recipe, load_backbone(tiny_bert), task.label_names, task.label_descriptions)
    batch = model.batch(task.train, [0, 3, 7, 11], max_length=128)
    batch.pop("labels")
    model.eval()
    every_label = torch.arange(len(task.label_names))
    assert torch.allclose(model(**batch, label_ids=every_label), model(**batch), atol=1e-5)
    some = torch.tensor([1, 4])
    assert torch.allclose(model(**batch, label_ids=some), model(**batch)[:, some], atol=1e-5)
    assert not model.head.linear.weight.requires_grad  # the descriptions, not the rows, are learnt
    model.train()
    model(**batch, label_ids=some).sum().backward()  # DDP needs a gradient on every trainable parameter
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_tied_training_packs_texts_and_descriptions_in_one_forward(tiny_bert, tmp_path):
    """Training runs the texts and the descriptions end to end in one packed forward (model.py, backbones/
    packing.py): without dropout it scores as the padded, separate forwards of evaluation do, and its
    gradients are theirs."""
    recipe = validate_recipe(tiny_recipe(tiny_bert, tmp_path, method={"name": "lora", "r": 4, "dropout": 0.0},
                                         head={**TIED, "dropout": 0.0}, data={"path": "demo:intent", "k": 4}))
    task = load_task(recipe.data)
    model = build_adapter_model(recipe, load_backbone(tiny_bert), task.label_names, task.label_descriptions)
    for module in model.modules():  # the backbone's own dropout too: the layouts draw different masks
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with torch.no_grad():
        for name, parameter in model.peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    batch = model.batch(task.train, [0, 3, 7, 11, 12], max_length=128)
    batch.pop("labels")
    some = torch.tensor([1, 3, 4])
    scores, grads = [], []
    for training in (True, False):
        model.train(training)
        scores.append(model(**batch, label_ids=some))
        scores[-1].square().sum().backward()
        grads.append([p.grad.clone() for p in model.peft_model.parameters() if p.requires_grad])
        model.zero_grad()
    assert model.packs_rows
    assert torch.allclose(scores[0], scores[1], atol=1e-5)
    assert all((a - b).abs().max() <= 1e-5 * a.abs().max() for a, b in zip(*grads))  # float rounding alone


def test_trained_rows_are_the_last_tied_vectors_and_reload(tiny_bert, tmp_path):
    recipe = validate_recipe(tiny_recipe(tiny_bert, tmp_path, head={**TIED, "prototype_weight": 0},
                                         data={"path": "demo:intent", "k": 4},
                                         training={"max_steps": 4, "batch_size": 8, "lr": 5e-2}))
    accelerator, task, model = setup(recipe)
    start = model.head.linear.weight.clone()
    fit(model, task.train, recipe, accelerator, show_progress=False)
    rows = model.head.linear.weight
    assert not torch.allclose(rows, start, atol=1e-3)  # the descriptions moved with the adapter
    with torch.no_grad():
        described = torch.nn.functional.normalize(model.label_vectors(torch.arange(len(task.label_names))), dim=-1)
    assert torch.allclose(described, rows, atol=1e-6)

    folder, _ = save_adapter(model, make_card(recipe, task, model, *parameter_counts(model), 0.0, {}), tmp_path)
    reloaded, _ = load_adapter(folder, load_backbone(tiny_bert))  # a plain classifier: nothing tied
    assert not reloaded.tied
    texts = task.test.texts
    expected = model.scores(texts)
    assert torch.allclose(reloaded.scores(texts), expected, atol=1e-5)
    served = Engine(tiny_bert, tmp_path, dtype="float32").predict(str(folder), texts)
    assert torch.allclose(torch.tensor([list(p.scores.values()) for p in served]), expected, atol=1e-5)


def test_prototypes_pull_each_row_towards_its_examples(tiny_bert, tmp_path):
    """With head.prototype_weight the settled rows move from the descriptions towards the mean vector of
    each label's training texts, by that weight; scores follow the new rows."""
    recipe = validate_recipe(tiny_recipe(tiny_bert, tmp_path, head={**TIED, "prototype_weight": 0.5},
                                         data={"path": "demo:intent", "k": 4},
                                         training={"max_steps": 4, "batch_size": 8, "lr": 5e-2}))
    accelerator, task, model = setup(recipe)
    fit(model, task.train, recipe, accelerator, show_progress=False)
    normalize = torch.nn.functional.normalize
    with torch.no_grad():
        described = normalize(model.label_vectors(torch.arange(len(task.label_names))), dim=-1)
    vectors, labels = model.text_vectors(task.train.texts), torch.tensor(task.train.labels)
    prototypes = normalize(torch.stack([vectors[labels == c].mean(0) for c in range(len(task.label_names))]), dim=-1)
    rows = model.head.linear.weight
    assert torch.allclose(rows, described + 0.5 * prototypes, atol=1e-5)
    closer = (normalize(rows, dim=-1) * prototypes).sum(-1) > (described * prototypes).sum(-1)
    assert closer.all()
    cosine = normalize(vectors, dim=-1) @ normalize(rows, dim=-1).T
    expected = (recipe.head.cosine_scale * cosine + model.head.linear.bias).softmax(-1)
    assert torch.allclose(model.scores(task.train.texts), expected, atol=1e-5)


def test_prototypes_are_the_rows_the_steps_drew(tiny_bert, tmp_path):
    """A run of training.max_steps that draws only part of its rows (a library adapter: 500 steps on a
    whole split) settles each label's prototype from the rows it trained on, not the whole split; a label
    none of whose rows were drawn keeps its description alone."""
    recipe = validate_recipe(tiny_recipe(tiny_bert, tmp_path, head={**TIED, "prototype_weight": 0.5},
                                         data={"path": "demo:intent", "k": 8},
                                         training={"max_steps": 1, "batch_size": 4, "lr": 5e-2}))
    accelerator, task, model = setup(recipe)
    fit(model, task.train, recipe, accelerator, show_progress=False)
    _, order = schedule(len(task.train), recipe.training, processes=1)
    drawn = task.train.select(sorted(set(order)))
    assert len(drawn) == 4 < len(task.train)
    normalize = torch.nn.functional.normalize
    with torch.no_grad():
        described = normalize(model.label_vectors(torch.arange(len(task.label_names))), dim=-1)
    vectors, labels = model.text_vectors(drawn.texts), torch.tensor(drawn.labels)
    expected = described.clone()
    for label in labels.unique():
        expected[label] += 0.5 * normalize(vectors[labels == label].mean(0), dim=-1)
    assert len(labels.unique()) < len(task.label_names)  # some labels were never drawn
    assert torch.allclose(model.head.linear.weight, expected, atol=1e-5)


def test_many_labels_are_sampled_per_step():
    labels = torch.tensor([7, 2, 7, 40])
    assert torch.equal(_step_labels(labels, 10, limit=32), torch.arange(10))
    torch.manual_seed(0)
    chosen = _step_labels(labels, 77, limit=8)
    assert len(chosen) == 8 and len(chosen.unique()) == 8 and torch.equal(chosen, chosen.sort().values)
    assert {2, 7, 40} <= set(chosen.tolist())
    assert torch.equal(chosen[torch.searchsorted(chosen, labels)], labels)  # the loss's targets
    torch.manual_seed(0)
    assert torch.equal(_step_labels(labels, 77, limit=8), chosen)  # drawn from the seeded stream
    assert len(_step_labels(torch.arange(12), 77, limit=8)) == 12  # a batch's own labels always stay


def test_sampled_tied_run_is_repeatable(tiny_bert, tmp_path):
    """Four labels a step out of five (the batch's own, then drawn); the same run twice gives the same adapter (resuming: test_checkpoint)."""
    def run(store):
        recipe = validate_recipe(tiny_recipe(tiny_bert, store, head={**TIED, "tie_labels_per_step": 4},
                                             data={"path": "demo:intent", "k": 4},
                                             training={"max_steps": 3, "batch_size": 4}))
        return load_adapter(train(recipe, show_progress=False).adapter_path, load_backbone(tiny_bert))[0]
    first, second = run(tmp_path / "a"), run(tmp_path / "b")
    assert torch.equal(first.head.linear.weight, second.head.linear.weight)


@pytest.mark.parametrize("head, problem", [({"cosine_scale": None}, "cosine"), ({"init": "random"}, "label_descriptions"),
                                           ({"type": "label_words"}, "classifier")])
def test_tie_labels_without_description_rows_is_refused(tiny_bert, tmp_path, head, problem):
    with pytest.raises(RecipeError, match=f"head: .*tie_labels needs .*{problem}"):
        validate_recipe(tiny_recipe(tiny_bert, tmp_path, head={**TIED, **head}))


@pytest.mark.parametrize("per_step, tied", [(5, True), (4, False)])
def test_auto_ties_when_every_label_fits_in_a_step(tiny_bert, tmp_path, per_step, tied):
    """demo:intent has 5 labels; the card records what auto chose."""
    recipe = validate_recipe(tiny_recipe(tiny_bert, tmp_path, data={"path": "demo:intent", "k": 4},
                                         head={"tie_labels": "auto", "tie_labels_per_step": per_step}))
    task = load_task(recipe.data)
    assert build_adapter_model(recipe, load_backbone(tiny_bert), task.label_names, task.label_descriptions).tied is tied
    _, card = load_adapter(train(recipe, show_progress=False).adapter_path, load_backbone(tiny_bert))
    assert card.recipe["head"]["tie_labels"] is tied
