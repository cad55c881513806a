"""Sentence-transformers folders are read as their authors meant: pooling, normalisation and the
default prompt come from modules.json, 1_Pooling/config.json and config_sentence_transformers.json,
for the head's start, zero-shot, training and serving alike; a recipe can still override."""

import json
import shutil

import pytest
import torch

from adapterlab.backbones import load_backbone, resolve_path
from adapterlab.backbones.sentence_folders import read_sentence_settings
from adapterlab.data import load_task
from adapterlab.engine import Engine, Request
from adapterlab.errors import AdapterlabError
from adapterlab.heads import label_embeddings
from adapterlab.loading import load_adapter
from adapterlab.model import build_adapter_model
from adapterlab.recipe import validate_recipe
from adapterlab.store import read_card
from adapterlab.training import train
from conftest import tiny_recipe

PROMPT = "query: "


@pytest.fixture
def cls_folder(tiny_bert, tmp_path):
    """The tiny BERT as a bge-style sentence-transformers folder: CLS pooling, Normalize, a default prompt."""
    folder = tmp_path / "cls-model"
    shutil.copytree(tiny_bert, folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": PROMPT, "document": ""}, "default_prompt_name": "query"}))
    return str(folder)


def test_packaged_minilm_reads_mean_pooling_and_normalize():
    settings = read_sentence_settings(resolve_path("minilm"))
    assert (settings.pooling, settings.normalize, settings.prompt) == ("mean", True, "")


def test_current_format_and_plain_folders(tmp_path):
    assert read_sentence_settings(tmp_path).pooling is None  # not a sentence-transformers folder
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "config.json").write_text(json.dumps({"pooling_mode": "lasttoken"}))
    (tmp_path / "modules.json").write_text(json.dumps([{"path": "pool", "type": "sentence_transformers.models.Pooling"}]))
    assert read_sentence_settings(tmp_path).pooling == "lasttoken"


def test_cls_folder_pools_and_prompts_everywhere_and_a_recipe_overrides(cls_folder, tmp_path):
    backbone = load_backbone(cls_folder)
    recipe = validate_recipe(tiny_recipe(cls_folder, tmp_path))
    task = load_task(recipe.data)
    model = build_adapter_model(recipe, backbone, task.label_names, task.label_descriptions)
    assert model.head.pooling == "cls" and model.head.normalize and model.text_prompt == PROMPT
    templates = recipe.head.label_templates
    cls_rows = label_embeddings(backbone, task.label_descriptions, templates, "cls", PROMPT)
    assert torch.allclose(model.head.linear.weight, cls_rows, atol=1e-6)  # the head starts at the CLS zero-shot
    for other in (label_embeddings(backbone, task.label_descriptions, templates, "mean", PROMPT),
                  label_embeddings(backbone, task.label_descriptions, templates, "cls", "")):
        assert not torch.allclose(cls_rows, other, atol=1e-5)  # so that the choice shows
    assert model.tokenize(["fine"])["input_ids"].tolist() == backbone.tokenizer([PROMPT + "fine"])["input_ids"]

    engine = Engine(backbone, tmp_path)
    zero_shot = engine.zero_shot(tuple(task.label_names), tuple(task.label_descriptions))
    assert zero_shot.head.pooling == "cls" and zero_shot.prompt.text_prompt == PROMPT
    assert torch.allclose(zero_shot.head.linear.weight, cls_rows, atol=1e-6)

    result = train(recipe, show_progress=False)
    head = read_card(result.adapter_path).recipe["head"]
    assert (head["pooling"], head["text_prompt"], head["normalize"]) == ("cls", PROMPT, True)
    texts = task.test.texts[:4]
    served = torch.tensor([list(p.scores.values()) for p in engine.predict(str(result.adapter_path), texts)])
    expected = load_adapter(result.adapter_path, load_backbone(cls_folder))[0].scores(texts)
    assert torch.allclose(served, expected, atol=1e-5)

    override = validate_recipe(tiny_recipe(cls_folder, tmp_path, head={"pooling": "mean", "text_prompt": ""}))
    model = build_adapter_model(override, load_backbone(cls_folder), task.label_names, task.label_descriptions)
    assert model.head.pooling == "mean" and model.text_prompt == ""


def test_a_pooling_adapterlab_does_not_compute_is_refused_in_one_line(cls_folder, tmp_path):
    pooling = f"{cls_folder}/1_Pooling/config.json"
    with open(pooling, "w") as handle:
        json.dump({"pooling_mode_max_tokens": True}, handle)
    recipe = validate_recipe(tiny_recipe(cls_folder, tmp_path))
    task = load_task(recipe.data)
    with pytest.raises(AdapterlabError, match="pools by 'max'.*set head.pooling"):
        build_adapter_model(recipe, load_backbone(cls_folder), task.label_names, task.label_descriptions)
    recipe = validate_recipe(tiny_recipe(cls_folder, tmp_path, head={"pooling": "mean"}))
    assert build_adapter_model(recipe, load_backbone(cls_folder), task.label_names,
                               task.label_descriptions).head.pooling == "mean"
    with pytest.raises(AdapterlabError, match="pools by 'max'"):
        Engine(load_backbone(cls_folder), tmp_path).predict_batch([Request(None, "x", labels=("a", "b"))])
