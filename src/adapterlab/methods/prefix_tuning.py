"""Prefix-tuning: trained key/value vectors prepended at every attention layer (Li & Liang, 2021)."""

from typing import Literal

import torch
from peft import PrefixTuningConfig
from pydantic import BaseModel, ConfigDict, Field

from adapterlab.methods.base import AdapterWeights

# Prefixes need a larger step than LoRA weights to move the frozen attention.
DEFAULT_LR = 1e-2


class Config(BaseModel):
    """The `method:` section of a prefix-tuning recipe."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["prefix_tuning"] = "prefix_tuning"
    num_virtual_tokens: int = Field(16, gt=0, description="Prefix length (key/value pairs per layer).")
    projection: bool = Field(
        False, description="Produce the prefix through a 2-layer MLP (often more stable, more parameters).")
    projection_hidden_size: int = Field(256, gt=0, description="Hidden size of that MLP.")


def peft_config(config: Config, backbone) -> PrefixTuningConfig:
    return PrefixTuningConfig(
        task_type=backbone.peft_task_type,
        num_virtual_tokens=config.num_virtual_tokens,
        prefix_projection=config.projection,
        encoder_hidden_size=config.projection_hidden_size,
    )


def inference_weights(state: dict[str, torch.Tensor], adapter_config: dict) -> AdapterWeights:
    """Per-layer key/value prefixes, laid out as peft's `get_prompt` lays them out."""
    p, layers = adapter_config["num_virtual_tokens"], adapter_config["num_layers"]
    heads = adapter_config["num_attention_heads"]
    head_dim = adapter_config["token_dim"] // heads
    kv = state["prompt_embeddings"].view(p, layers * 2, heads, head_dim).permute(1, 2, 0, 3)
    return AdapterWeights(prefix=[(kv[2 * layer].contiguous(), kv[2 * layer + 1].contiguous())
                                  for layer in range(layers)])
