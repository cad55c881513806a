"""An LLM prompt's shared start run once (backbones/prompt_start.py): scores, losses and gradients equal
those of the whole prompts; the engine reuses each adapter's start; a label-word head without a template
reads a prompt written from the task's labels."""

import pytest
import torch

from adapterlab.backbones import load_backbone
from adapterlab.backbones.prompt_start import after_start
from adapterlab.data import load_task
from adapterlab.engine import Engine, Request
from adapterlab.zeroshot import ZeroShotConfig, zero_shot_servable
from adapterlab.model import build_adapter_model
from adapterlab.prompts import PLAIN_TEMPLATE, UNLISTED_TEMPLATE, template_of
from adapterlab.recipe import load_recipe, validate_recipe
from adapterlab.training import train
from conftest import ROOT, shared, tiny_recipe

TEXTS = ["a gorgeous, moving film", "dull", "the plot never lands and the actors look bored throughout",
         "fine", "one of the best films of the year, I laughed and cried", "it 's a charming journey ."]
TEMPLATE = "What is the sentiment of this review?\n\nReview: {text}"


def lora_model(folder: str, tmp_path, **head):
    recipe = validate_recipe(tiny_recipe(folder, tmp_path, method={"name": "lora", "r": 4, "dropout": 0.0},
                                         head={"type": "label_words", **head}))
    task = load_task(recipe.data)
    torch.manual_seed(0)
    model = build_adapter_model(recipe, load_backbone(folder), task.label_names, task.label_descriptions)
    for name, parameter in model.peft_model.named_parameters():  # LoRA's B starts at zero: move it
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    return model, task


@pytest.mark.parametrize("chat", [True, False])
def test_scores_with_the_start_run_once_equal_whole_prompts(tiny_llama, tmp_path, chat):
    model, _ = lora_model(tiny_llama, tmp_path, template=TEMPLATE, chat=chat)
    assert len(model.prompt_start) > 5
    cached = model.scores(TEXTS, batch_size=4)
    model.prompt_start = ()  # the whole prompts, as before
    whole = model.scores(TEXTS, batch_size=4)
    assert torch.allclose(cached, whole, atol=1e-5)
    assert cached.argmax(-1).tolist() == whole.argmax(-1).tolist()


def test_training_loss_and_gradients_with_the_start_run_once_equal_whole_prompts(tiny_llama, tmp_path):
    model, task = lora_model(tiny_llama, tmp_path, template=TEMPLATE)
    model.train()
    batch = model.batch(task.train, list(range(len(task.train))), 64)
    results = []
    for start in (model.prompt_start, ()):
        model.prompt_start = start
        model.peft_model.zero_grad()
        loss = model.loss(model, dict(batch))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.peft_model.named_parameters()
                                        if p.requires_grad}))
    (cached, cached_grads), (whole, whole_grads) = results
    assert torch.allclose(cached, whole, atol=1e-6)
    assert cached_grads.keys() == whole_grads.keys() and len(cached_grads) > 0
    for name in cached_grads:
        assert torch.allclose(cached_grads[name], whole_grads[name], atol=1e-6, rtol=1e-4), name


def test_rows_that_do_not_begin_with_the_start_run_whole(tiny_llama):
    backbone = load_backbone(tiny_llama)
    start = (1, 2, 3)
    batch = {"input_ids": torch.tensor([[0, 1, 2, 3, 9], [1, 2, 3, 7, 8]]),
             "attention_mask": torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])}
    rest = after_start(batch, start)
    assert rest["input_ids"].tolist() == [[0, 9], [7, 8]] and rest["attention_mask"].tolist() == [[0, 1], [1, 1]]
    assert after_start({**batch, "input_ids": batch["input_ids"].flip(1)}, start) is None
    assert after_start(batch, (1, 2, 3, 9)) is None  # a row with nothing after the start
    assert backbone.kind == "decoder"


def test_a_label_word_head_without_a_template_lists_the_labels_with_their_descriptions(tiny_llama, tmp_path):
    recipe = validate_recipe(tiny_recipe(tiny_llama, tmp_path, output={"store": str(tmp_path), "name": "a"}))
    assert recipe.head.template is None
    written = ("Classify the text as one of: Negative (The text expresses a negative opinion about a product, "
               "restaurant, or movie), Positive (The text expresses a positive opinion about a product, restaurant, "
               "or movie).\n\nText: {text}")
    model, _ = lora_model(tiny_llama, tmp_path)
    assert model.prompt.template == written
    train(recipe, show_progress=False)
    engine = Engine(tiny_llama, tmp_path, dtype="float32")
    assert engine.card("sentiment/a").recipe["head"]["template"] == written  # the recipe as it ran
    assert engine.servable("sentiment/a").prompt.template == written
    bare_names = validate_recipe(tiny_recipe(tiny_llama, tmp_path, data={"path": "demo:sentiment", "k": 4}))
    assert template_of(bare_names.head, ["neg", "pos"], ["neg", "pos"], load_backbone(tiny_llama)) == (
        UNLISTED_TEMPLATE)  # descriptions that only repeat the names: no list
    assert template_of(bare_names.head, ["neg", "pos"], ["neg", "pos"], None) == PLAIN_TEMPLATE  # not an LLM


def test_labels_that_only_name_themselves_are_not_listed_and_a_prefix_starts_from_the_prompt(tiny_llama, tmp_path):
    """Descriptions that repeat the names add nothing to list: the written prompt is UNLISTED_TEMPLATE, and a
    prefix starts as the backbone reading that prompt's words and the labels', not some other prompt's."""
    method = {"name": "prefix_tuning", "num_virtual_tokens": 6}
    recipe = validate_recipe(tiny_recipe(tiny_llama, tmp_path, method=method))
    backbone = load_backbone(tiny_llama)
    names = ["negative", "positive"]
    model = build_adapter_model(recipe, backbone, names, names)
    assert model.prompt.template == UNLISTED_TEMPLATE
    ids = backbone.tokenizer(" ".join([UNLISTED_TEMPLATE.replace("{text}", ""), *names]), add_special_tokens=False,
                             return_tensors="pt").input_ids[0]
    prefix = ids.repeat(6 // len(ids) + 1)[:6]
    text = backbone.tokenizer("a fine film", add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        adapted = model.peft_model(input_ids=text, attention_mask=torch.ones_like(text)).logits[0, -1]
        read = backbone.model(input_ids=torch.cat([prefix[None], text], 1)).logits[0, -1]
    assert torch.allclose(adapted, read, atol=1e-4)


def test_engine_rows_of_lora_prefix_and_zero_shot_with_starts_equal_whole_prompts(tiny_llama, tmp_path):
    methods = {"lora": {"name": "lora", "r": 4}, "prefix": {"name": "prefix_tuning", "num_virtual_tokens": 3,
                                                             "init": "random"}}
    for name, method in methods.items():
        train(validate_recipe(tiny_recipe(tiny_llama, tmp_path, method=method, head={"template": TEMPLATE},
                                          output={"store": str(tmp_path), "name": name},
                                          training={"max_steps": 3, "batch_size": 8, "lr": 5e-2})),
              show_progress=False)
    engine = Engine(tiny_llama, tmp_path, dtype="float32", batch_size=7)
    requests = [Request(f"sentiment/{name}", text) for name in methods for text in TEXTS]
    requests += [Request(None, text, labels=("good", "bad")) for text in TEXTS]
    cached = [p.scores for p in engine.predict_batch(requests)]
    assert len(engine.starts._cache) == 3  # one start per adapter and zero-shot classifier
    engine.starts = None
    whole = [p.scores for p in engine.predict_batch(requests)]
    for a, b in zip(cached, whole):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a), (a, b)


@pytest.mark.slow
def test_smollm2_scores_with_the_start_run_once_equal_whole_prompts(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "sst2-lora-smollm2.yaml", [f"data.path={shared('sst2')}", "data.test_limit=8"])
    task = load_task(recipe.data)
    backbone = load_backbone(recipe.backbone)
    torch.manual_seed(0)
    model = build_adapter_model(recipe, backbone, task.label_names, task.label_descriptions)
    for name, parameter in model.peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    cached = model.scores(task.test.texts, batch_size=4)
    model.prompt_start = ()
    whole = model.scores(task.test.texts, batch_size=4)
    assert torch.allclose(cached, whole, atol=1e-4) and cached.argmax(-1).tolist() == whole.argmax(-1).tolist()
    model.release_backbone()

    engine = Engine(backbone, tmp_path)
    zero_shot = zero_shot_servable(backbone, task.label_names, task.label_descriptions, ZeroShotConfig())
    cached = [p.scores for p in engine.classify(zero_shot, task.test.texts)]
    engine.starts = None
    whole = [p.scores for p in engine.classify(zero_shot, task.test.texts)]
    assert all(abs(a[k] - b[k]) < 1e-4 for a, b in zip(cached, whole) for k in a)
