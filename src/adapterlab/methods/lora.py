"""LoRA: low-rank updates added to the backbone's linear layers (Hu et al., 2021)."""

import math
from typing import Literal

import torch
from peft import LoraConfig
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from pydantic import BaseModel, ConfigDict, Field

from adapterlab.errors import AdapterlabError
from adapterlab.methods.base import AdapterWeights

DEFAULT_LR = 1e-3
UNTRAINED_IS_BACKBONE = True  # B starts at zero


class Config(BaseModel):
    """The `method:` section of a LoRA recipe."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0, description="Rank of the update matrices.")
    alpha: float = Field(16, gt=0, description="Scale: the update is multiplied by alpha / r.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="Module names to adapt; null takes the family's default (BERT: query, value; "
        "Llama: q_proj, v_proj; DistilBERT: q_lin, v_lin; backbones/families.yaml, else peft's); "
        "'all-linear' adapts every linear layer.")
    layers: list[int] | None = Field(
        None, description="Adapt only these transformer layers (0 = nearest the input); null: all. "
        "Top layers only train faster: the backward pass stops at the lowest adapted layer.")


def peft_config(config: Config, backbone) -> LoraConfig:
    family = backbone.family
    if config.target_modules is None and family.lora_targets is None and \
            family.name not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        raise AdapterlabError(f"lora on a {family.name} backbone needs method.target_modules: neither peft nor "
                              "adapterlab's families.yaml knows its attention projections (e.g. [query, value], "
                              "or all-linear)")
    return LoraConfig(
        task_type=backbone.peft_task_type,
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules or backbone.family.lora_targets,
        layers_to_transform=config.layers,
        # The family's layer list names the index's place in module names ("layers.1." at the top of
        # ModernBERT, where peft's own guess needs a parent before it).
        layers_pattern=backbone.family.layers.rsplit(".", 1)[-1] if config.layers and backbone.family.layers else None,
        # An encoder's pooler feeds nothing here (heads pool token states themselves), so LoRA on it
        # ('all-linear', or a name like 'dense') would never get a gradient: wasted weights on one
        # process, and under several an error from DDP at the second step (peft issue 951).
        exclude_modules=_pooler_modules(backbone.model) or None,
    )


def _pooler_modules(model) -> list[str]:
    """Names of the pooler and its layers (BERT, RoBERTa: pooler.dense; ALBERT: pooler itself)."""
    return [name for name, _ in model.named_modules() if name == "pooler" or name.startswith("pooler.")]


def start(peft_model, config: Config, backbone, template: str, label_descriptions: list[str]) -> None:
    """LoRA starts as peft starts it: B at zero, so step 0 is the bare backbone."""


def fit_problems(state: dict[str, torch.Tensor], adapter_config: dict, config: Config, backbone) -> list[str]:
    """Rank and alpha as the recipe trained them, each A/B pair on an existing linear layer of the
    backbone with its shapes, nothing the engine would silently drop."""
    r, alpha = adapter_config.get("r"), adapter_config.get("lora_alpha")
    problems = [f"adapter_config.json says {key} {value!r}, its recipe {expected!r}"
                for key, value, expected in (("r", r, config.r), ("lora_alpha", alpha, config.alpha)) if value != expected]
    unsupported = [key for key in ("use_dora", "rank_pattern", "alpha_pattern") if adapter_config.get(key)]
    if unsupported:
        problems.append(f"adapter_config.json uses {', '.join(unsupported)}, which the engine does not serve")
    modules = backbone.modules
    pairs = [key for key in state if key.endswith(".lora_A.weight")]
    strays = set(state) - set(pairs) - {key.replace(".lora_A.", ".lora_B.") for key in pairs}
    if strays:
        problems.append(f"tensors the engine would ignore: {', '.join(sorted(strays)[:3])}")
    if not pairs:
        problems.append("no LoRA tensors (lora_A/lora_B) in adapter_model.safetensors")
    for key in pairs:
        path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        shape = _in_out(modules.get(path))
        b = state.get(key.replace(".lora_A.", ".lora_B."))
        if shape is None:
            problems.append(f"{key} names no linear layer of the backbone ({path})")
        elif b is None:
            problems.append(f"{key} has no lora_B beside it")
        elif tuple(state[key].shape) != (r, shape[0]) or tuple(b.shape) != (shape[1], r):
            problems.append(f"{path}: lora_A {tuple(state[key].shape)} and lora_B {tuple(b.shape)} do not fit "
                            f"rank {r} on a {shape[0]}→{shape[1]} layer")
    return problems


def _in_out(module) -> tuple[int, int] | None:
    """(inputs, outputs) of a linear layer: torch's Linear, or GPT-2's Conv1D (weight stored in × out)."""
    module = getattr(module, "base_layer", module)  # a layer peft has wrapped: the linear inside
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        return tuple(module.weight.shape)
    return None


def inference_weights(state: dict[str, torch.Tensor], adapter_config: dict) -> AdapterWeights:
    """The saved A/B matrices keyed by the backbone module they adapt, the LoRA scale folded into B."""
    unsupported = [key for key in ("use_dora", "rank_pattern", "alpha_pattern") if adapter_config.get(key)]
    if unsupported:
        raise AdapterlabError(f"LoRA adapters with {', '.join(unsupported)} are not supported by the engine")
    r = adapter_config["r"]
    scale = adapter_config["lora_alpha"] / (math.sqrt(r) if adapter_config.get("use_rslora") else r)
    deltas = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = state[key.replace(".lora_A.", ".lora_B.")]
            deltas[module] = (a, b.mul_(scale))  # in place: the loaded tensors are ours, no second copy
    return AdapterWeights(linear_deltas=deltas)
