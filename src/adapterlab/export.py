"""Exporting an adapter as a folder that loads elsewhere, without adapterlab:

- peft: the adapter as the store holds it (adapter files, head, card, model card), naming its base model
  as other machines find it;
- vllm: adapter_config.json and adapter_model.safetensors alone, checked against what vLLM's LoRA
  loader takes (vllm/lora/peft_helper.py, lora_model.py), the layout `--lora-modules` and LoRAX read;
- sentence-transformers: an encoder with the adapter merged in, embedding texts as the head pools them;
- merged: the adapter folded into a standalone model (`merge.write_merged`; what `adapterlab merge` writes).

Each reads the adapter through the store's checked reader and writes a new folder atomically.
"""

from collections.abc import Callable
from pathlib import Path

from adapterlab.backbones import Backbone, load_backbone
from adapterlab.loading import load_adapter
from adapterlab.merge import write_merged
from adapterlab.store import (StoredAdapter, StoreError, check_folder, read_adapter, read_card, resolve,
                              save_lora_files, save_portable)

VLLM_MAX_LORA_RANK = 512  # the largest --max-lora-rank vLLM offers (vllm/config/lora.py)
# adapter_config.json settings vLLM refuses to load (PEFTHelper._validate_features)
_VLLM_REFUSES = {"modules_to_save": "modules_to_save", "use_dora": "DoRA", "lora_bias": "LoRA bias"}


def export_adapter(store: str | Path, reference: str, output: str | Path, export_format: str,
                   base_model: str | None = None) -> Path:
    """Write the adapter (TASK/NAME in the store, or a folder) to the new folder `output` in
    `export_format` (one of FORMATS); `base_model` replaces the base model its files name (default:
    the backbone's hub id where one is known, else its local folder)."""
    writer = FORMATS.get(export_format)
    if writer is None:
        raise StoreError(f"unknown export format {export_format!r}: use one of {', '.join(FORMATS)}")
    if Path(output).exists():  # before the backbone loads
        raise StoreError(f"{output} exists; exports are written to a new folder")
    folder = resolve(store, reference)
    check_folder(folder)
    return writer(folder, load_backbone(read_card(folder).backbone), Path(output), base_model)


def _peft(folder: Path, backbone: Backbone, output: Path, base_model: str | None) -> Path:
    model, card = load_adapter(folder, backbone)
    return save_portable(model, card, output, base_model)


def _vllm(folder: Path, backbone: Backbone, output: Path, base_model: str | None) -> Path:
    stored = read_adapter(folder, backbone)
    problems = vllm_problems(stored, backbone)
    if problems:
        name = f"{stored.card.task}/{stored.card.name}"
        raise StoreError(f"adapter {name} cannot be served by vLLM: {'; '.join(problems)}")
    return save_lora_files(stored, output, base_model or backbone.base_model)


def _sentence_transformers(folder: Path, backbone: Backbone, output: Path, base_model: str | None) -> Path:
    if backbone.kind != "encoder":
        raise StoreError(f"sentence-transformers embeds with encoders; {backbone.name!r} is a decoder LLM "
                         "(export it as merged or vllm)")
    return write_merged(folder, backbone, output, base_model)


FORMATS: dict[str, Callable[[Path, Backbone, Path, str | None], Path]] = {
    "peft": _peft, "vllm": _vllm, "sentence-transformers": _sentence_transformers, "merged": write_merged}


def vllm_problems(stored: StoredAdapter, backbone: Backbone) -> list[str]:
    """Why vLLM would refuse the adapter's files, or serve them without what gives its answers."""
    config, family = stored.adapter_config, backbone.family
    if config.get("peft_type") != "LORA":
        return [f"it is a {stored.card.method} adapter, and vLLM and LoRAX serve LoRA adapters only"]
    if backbone.kind != "decoder":
        return [f"it adapts an encoder ({family.name}), and vLLM serves LoRA adapters of decoder LLMs only "
                "(export it as peft or sentence-transformers)"]
    if family.vllm_lora_modules is None:
        return [f"vLLM serves no LoRA adapters on {family.name} models"]
    problems = []
    if any(True for _ in stored.head.parameters()):
        problems.append("its answers come from a trained classifier head (head.safetensors), which vLLM does not "
                        "apply (export it as peft)")
    modules = sorted({key.split(".")[-3] for key in stored.tensors})  # (...).<module>.lora_A.weight
    foreign = [module for module in modules if module not in family.vllm_lora_modules]
    if foreign:
        problems.append(f"it adapts {', '.join(foreign)}, and vLLM adapts only "
                        f"{', '.join(family.vllm_lora_modules)} on {family.name} models")
    if config["r"] > VLLM_MAX_LORA_RANK:
        problems.append(f"its rank {config['r']} is above {VLLM_MAX_LORA_RANK}, vLLM's largest --max-lora-rank")
    if config.get("bias", "none") != "none":
        problems.append(f"it trains biases (bias {config['bias']!r})")
    problems += [f"it uses {name}, which vLLM does not load" for key, name in _VLLM_REFUSES.items() if config.get(key)]
    return problems
