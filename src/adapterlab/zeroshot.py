"""Zero-shot classifiers: no adapter, no training, labels given at inference time. They are the
baseline every adapter is measured against, and what serves a task nobody has trained for yet.

Encoders: cosine similarity between a text's embedding and its labels' descriptions, each
description embedded through several templates and averaged. LLMs: the likelihood of each label's
word after a prompt that lists the labels, optionally after k in-context demonstrations per class.
"""

from collections import Counter

from pydantic import BaseModel, ConfigDict, Field

from adapterlab.backbones import Backbone
from adapterlab.data import k_shot_indices, load_task
from adapterlab.heads import build_head
from adapterlab.methods.base import AdapterWeights
from adapterlab.metrics import classification_metrics
from adapterlab.mixed_batch import Servable
from adapterlab.prompts import Demonstrations, label_word, label_words, lettered_words, prompt_settings, uses_chat
from adapterlab.recipe import HeadConfig


class ZeroShotConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    templates: list[str] = Field(
        HeadConfig.model_fields["label_templates"].default, min_length=1,
        description="Encoders: each label description is embedded through these, then averaged.")
    prompt: str = Field("Classify the text as one of: {labels}.\n\nText: {text}",
                        description="LLMs: {labels} lists the label words, {text} is the input.")
    chat: bool | None = Field(None, description="LLMs: use the chat template (null: when the tokenizer has one).")
    shots: int = Field(0, ge=0, description="LLMs: in-context demonstrations per class, from the train split.")
    seed: int = Field(0, description="Seed of the demonstrations' draw.")
    pool: int | None = Field(None, gt=0, description="LLMs: take the demonstrations among the k = pool rows per "
                             "class a training run with this seed draws (an adapter's own rows); null: shots.")
    max_length: int = Field(256, gt=0)
    scale: float = Field(20.0, gt=0, description="Encoders: cosine similarities are multiplied by this.")


def zero_shot_servable(backbone: Backbone, labels: list[str], descriptions: list[str],
                       config: ZeroShotConfig = ZeroShotConfig(), demonstrations: Demonstrations = ()) -> Servable:
    """A classifier over `labels` that the engine serves like an adapter with no weights."""
    head_config = _head_config(backbone, labels, config)
    head = build_head(head_config, backbone, list(labels), descriptions)
    prompt = prompt_settings(head_config, backbone, config.max_length, demonstrations)
    return Servable("base", list(labels), AdapterWeights(), head.eval(), prompt, 0)


def _head_config(backbone: Backbone, labels: list[str], config: ZeroShotConfig) -> HeadConfig:
    """The head section of a zero-shot classifier. Encoders: a cosine classifier on the label
    descriptions, the backbone's own pooling and prompt (its sentence-transformers settings). LLMs: the
    label words after a prompt listing them."""
    if backbone.kind == "encoder":
        return HeadConfig(type="classifier", dropout=0.0, cosine_scale=config.scale, label_templates=config.templates)
    words = zero_shot_words(backbone, labels, config)
    if words == lettered_words(len(labels)):  # names that start alike: the prompt lists each letter's label
        listed = ", ".join(f"{word} ({label})" for word, label in zip(words, labels))
        return HeadConfig(type="label_words", template=config.prompt.replace("{labels}", listed), chat=config.chat,
                          label_words=dict(zip(labels, words)))
    template = config.prompt.replace("{labels}", ", ".join(label_word(label, chat=False) for label in labels))
    return HeadConfig(type="label_words", template=template, chat=config.chat)


def evaluate_zero_shot(engine, data_config, config: ZeroShotConfig = ZeroShotConfig(), split: str = "test",
                       limit: int | None = None, descriptions: list[str] | None = None) -> dict:
    """Zero-shot metrics of the engine's backbone on a dataset: its label descriptions when it has
    them (or `descriptions`, for `data_config.labels`)."""
    task = load_task(data_config.model_copy(update={"k": None}))
    if descriptions is not None:
        task.label_descriptions = descriptions
    rows = task.test if split == "test" else task.train
    if limit is not None:
        rows = rows.select(list(range(min(limit, len(rows)))))
    demonstrations = ()
    if config.shots:
        chosen = task.train.select(demonstration_indices(task.train.labels, task.label_names, config))
        words = zero_shot_words(engine.backbone, task.label_names, config)
        demonstrations = tuple((text, words[label]) for text, label in zip(chosen.texts, chosen.labels))
    servable = zero_shot_servable(engine.backbone, task.label_names, task.label_descriptions, config, demonstrations)
    predictions = engine.classify(servable, rows.texts, rows.text_pairs)
    index = {label: i for i, label in enumerate(task.label_names)}
    return {"rows": len(rows), "shots": config.shots,
            **classification_metrics([index[p.label] for p in predictions], rows.labels, len(task.label_names))}


def demonstration_indices(labels: list[int], names: list[str], config: ZeroShotConfig) -> list[int]:
    """`shots` rows per class: the first of each class in the k-shot draw (k = pool, or shots) that a
    training run with the same seed takes, in that draw's order."""
    drawn = k_shot_indices(labels, max(config.shots, config.pool or 0), config.seed, names)
    taken = Counter()
    chosen = []
    for index in drawn:
        if taken[labels[index]] < config.shots:
            taken[labels[index]] += 1
            chosen.append(index)
    return chosen


def zero_shot_words(backbone: Backbone, labels: list[str], config: ZeroShotConfig) -> list[str]:
    """The words an LLM's zero-shot head scores (and demonstrations answer): the labels' names, or
    letters where names start alike (`label_words`)."""
    return label_words(backbone.tokenizer, list(labels), {}, uses_chat(config, backbone))
