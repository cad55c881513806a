"""Prefix-tuning: trained key/value vectors prepended at every attention layer (Li & Liang, 2021)."""

from typing import Literal

import torch
from peft import PrefixTuningConfig
from peft.utils.other import _prepare_prompt_learning_config
from pydantic import BaseModel, ConfigDict, Field

from adapterlab.errors import AdapterlabError
from adapterlab.methods.base import AdapterWeights

# Prefixes need a larger step than LoRA weights to move the frozen attention.
DEFAULT_LR = 1e-2
UNTRAINED_IS_BACKBONE = False  # any prefix, even from the task's words, is read before the text


class Config(BaseModel):
    """The `method:` section of a prefix-tuning recipe."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["prefix_tuning"] = "prefix_tuning"
    num_virtual_tokens: int = Field(16, gt=0, description="Prefix length (key/value pairs per layer).")
    projection: bool = Field(
        False, description="Produce the prefix through a 2-layer MLP (often more stable, more parameters).")
    projection_hidden_size: int = Field(256, gt=0, description="Hidden size of that MLP.")
    init: Literal["auto", "random", "words"] = Field(
        "auto", description="Where the prefix starts. words: the keys and values the backbone computes for the "
        "task's own words (the prompt and the label names), as prefix-tuning's authors recommend; a random "
        "prefix would start an LLM below its zero-shot prompt. random: peft's. auto: words on LLMs, random on "
        "encoders (whose random prefixes train well: docs/benchmarks.md).")


def peft_config(config: Config, backbone) -> PrefixTuningConfig:
    return PrefixTuningConfig(
        task_type=backbone.peft_task_type,
        num_virtual_tokens=config.num_virtual_tokens,
        prefix_projection=config.projection,
        encoder_hidden_size=config.projection_hidden_size,
    )


def fit_problems(state: dict[str, torch.Tensor], adapter_config: dict, config: Config, backbone) -> list[str]:
    """The prefix's length as the recipe trained it, and its layers, heads and width as this backbone's
    attention reads them (the rule peft applied when it was trained)."""
    expected = _prepare_prompt_learning_config(
        PrefixTuningConfig(task_type=backbone.peft_task_type, num_virtual_tokens=config.num_virtual_tokens),
        backbone.model.config)
    problems = [f"adapter_config.json says {key} {adapter_config.get(key)!r}, expected {getattr(expected, key)!r}"
                for key in ("num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads")
                if adapter_config.get(key) != getattr(expected, key)]
    embeddings = state.get("prompt_embeddings")
    wanted = (expected.num_virtual_tokens, expected.num_layers * 2 * expected.token_dim)
    if embeddings is None:
        problems.append("no prompt_embeddings in adapter_model.safetensors")
    elif tuple(embeddings.shape) != wanted:
        problems.append(f"prompt_embeddings has shape {tuple(embeddings.shape)}, this backbone's prefix {wanted}")
    if set(state) - {"prompt_embeddings"}:
        problems.append(f"tensors the engine would ignore: {', '.join(sorted(set(state) - {'prompt_embeddings'}))}")
    return problems


def start(peft_model, config: Config, backbone, template: str, label_descriptions: list[str]) -> None:
    """With init words (auto on LLMs): the prefix becomes the backbone's own keys and values for the
    task's words (the prompt `template` it will read and the labels' descriptions, cycled to the prefix's
    length), read at positions 0..P-1 as the text after it is read from P on."""
    if config.init == "random" or (config.init == "auto" and backbone.kind != "decoder"):
        return
    if backbone.kind != "decoder" or config.projection:
        raise AdapterlabError("prefix_tuning init 'words' needs an LLM backbone and projection: false")
    words = " ".join([template.replace("{text}", "").replace("{text_pair}", ""), *label_descriptions])
    ids = backbone.tokenizer(words, add_special_tokens=False, return_tensors="pt").input_ids[0]
    ids = ids.repeat(config.num_virtual_tokens // len(ids) + 1)[:config.num_virtual_tokens]
    with torch.no_grad():
        cache = backbone.model(input_ids=ids[None].to(backbone.device), use_cache=True).past_key_values
        layers = [(layer.keys[0], layer.values[0]) for layer in cache.layers]  # each (kv_heads, P, head_dim)
        stacked = torch.stack([t for pair in layers for t in pair])  # (layers * 2, kv_heads, P, head_dim)
        embedding = peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight
        embedding.copy_(stacked.permute(2, 0, 1, 3).reshape(embedding.shape))


def inference_weights(state: dict[str, torch.Tensor], adapter_config: dict) -> AdapterWeights:
    """Per-layer key/value prefixes, laid out as peft's `get_prompt` lays them out."""
    p, layers = adapter_config["num_virtual_tokens"], adapter_config["num_layers"]
    heads = adapter_config["num_attention_heads"]
    head_dim = adapter_config["token_dim"] // heads
    kv = state["prompt_embeddings"].view(p, layers * 2, heads, head_dim).permute(1, 2, 0, 3)
    return AdapterWeights(prefix=[(kv[2 * layer].contiguous(), kv[2 * layer + 1].contiguous())
                                  for layer in range(layers)])
