"""Model families: how each numbers positions after a prefix, where its layers are, which methods
work on it. The entries live in families.yaml, keyed by a config's `model_type`; a family missing
there still loads, with what can be told from its config, and refuses what cannot be told."""

import functools
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict

from adapterlab.errors import AdapterlabError


class Family(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    kind: Literal["encoder", "decoder"]
    layers: str | None = None
    positions: Literal["absolute", "padding_offset", "real_tokens"] | None = None
    lora_targets: list[str] | None = None
    refuses: dict[str, str] = {}
    stem_unless: dict[str, str] = {}
    vllm_lora_modules: list[str] | None = None
    known: bool = True

    def check_method(self, method: str) -> None:
        """Refuse, in one line naming family and method, a method that cannot train right here."""
        reason = self.refuses.get(method)
        if reason is None and method == "prefix_tuning" and self.positions is None:
            reason = (f"adapterlab does not know how {self.name} numbers positions after a prefix "
                      f"(known families: {', '.join(FAMILIES)})")
        if reason:
            raise AdapterlabError(f"{method} cannot train on a {self.name} backbone: {reason}")

    def stem_blocker(self, config) -> str | None:
        """Why an encoder's frozen lower layers cannot be skipped exactly, or None when they can."""
        if self.kind != "encoder":
            return "only encoders skip frozen layers"
        if self.layers is None:
            return f"adapterlab does not know where a {self.name} model keeps its layers"
        return next((why for key, why in self.stem_unless.items() if getattr(config, key, None)), None)

    def layer_list(self, model: torch.nn.Module) -> torch.nn.ModuleList | None:
        """The transformer layers of `model` (a bare model or a peft wrapper of one), or None."""
        owner, attribute = self.layer_owner(model)
        layers = getattr(owner, attribute, None)
        return layers if isinstance(layers, torch.nn.ModuleList) else None

    def layer_owner(self, model: torch.nn.Module) -> tuple[torch.nn.Module | None, str]:
        """The module holding the layer list, and the list's attribute name."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        *path, attribute = (self.layers or "").split(".")
        try:
            return functools.reduce(getattr, path, base), attribute
        except AttributeError:
            return None, attribute

    def position_ids(self, input_ids: torch.Tensor, mask: torch.Tensor, offsets: torch.Tensor,
                     pad_token_id: int | None) -> torch.Tensor:
        """Position ids of a right- or left-padded batch whose rows follow `offsets` (B,) prefix
        tokens, as the model numbers them itself when one prefix of that length precedes the batch."""
        if self.positions == "absolute":
            return torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] + offsets[:, None]
        if self.positions == "padding_offset":  # RoBERTa's create_position_ids_from_input_ids
            real = input_ids.ne(pad_token_id).long()
            return (real.cumsum(-1) + offsets[:, None]) * real + pad_token_id
        if self.positions == "real_tokens":  # left padding: a row's first real token is position 0
            return (mask.long().cumsum(-1) - 1).clamp(min=0) + offsets[:, None]
        raise AdapterlabError(f"adapterlab does not know how {self.name} numbers positions after a prefix")


@functools.cache
def _entries() -> dict[str, Family]:
    raw = yaml.safe_load((Path(__file__).with_name("families.yaml")).read_text())
    return {name: Family(name=name, **entry) for name, entry in raw.items()}


FAMILIES = tuple(_entries())


def family_of(config) -> Family:
    """The family entry of a model config; for a family adapterlab has no entry for, what its
    architecture tells (decoders number positions by their real tokens, as every HF decoder does)."""
    family = _entries().get(config.model_type)
    if family is not None:
        return family
    decoder = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures or ())
    return Family(name=config.model_type, kind="decoder" if decoder else "encoder",
                  positions="real_tokens" if decoder else None, known=False)
