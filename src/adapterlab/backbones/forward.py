"""Running a backbone: texts to token ids (LLM prompts included), and one forward pass to the
features heads read, with per-row attention prefixes (the engine's mixed batches) or from cached
lower-layer states (training's stem)."""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn
from transformers import DynamicCache

from adapterlab.backbones.loading import Backbone
from adapterlab.backbones.packing import can_pack, pack
from adapterlab.prompts import Demonstrations, prompt_format


@dataclass
class Features:
    """What heads read: token states (B, T, H) with their mask; for an LLM, its final state at the last
    position (B, H) and the vocabulary projection that turns it into next-token logits, or (where the
    model alters its logits after that projection) the next-token logits themselves (B, V)."""

    hidden: torch.Tensor | None
    attention_mask: torch.Tensor
    last_state: torch.Tensor | None = None
    output_head: torch.nn.Linear | None = None
    next_token_logits: torch.Tensor | None = None

    def label_logits(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits of `token_ids`, (L,) for every row or (B, L) per row: only those rows of the
        vocabulary projection are computed, never all V logits."""
        if self.next_token_logits is not None:
            logits = self.next_token_logits
            return logits[:, token_ids] if token_ids.dim() == 1 else logits.gather(1, token_ids)
        head = self.output_head
        if token_ids.dim() == 1:
            return nn.functional.linear(self.last_state, head.weight[token_ids],
                                        None if head.bias is None else head.bias[token_ids])
        logits = torch.bmm(head.weight[token_ids], self.last_state[:, :, None]).squeeze(2)
        return logits if head.bias is None else logits + head.bias[token_ids]


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


def tokenize(backbone: Backbone, texts: list[str], pairs: list[str] | None, template: str,
             max_length: int, chat: bool = False, demonstrations: Demonstrations = (),
             text_prompt: str = "", report_truncation: bool = False):
    """Encoders take (text, pair) natively, after `text_prompt` (a sentence-transformers model's
    'query: '). LLMs read the filled template (as a chat turn when `chat`), after any (text, answer)
    demonstrations, with the texts cut to fit `max_length`, padded on the left so that each row ends
    at its last token; never longer than the model can position. With `report_truncation`: (the
    batch, whether each row was cut)."""
    tokenizer = backbone.tokenizer
    max_length = min(max_length, backbone.max_tokens)
    if backbone.kind == "encoder":
        texts = [text_prompt + text for text in texts] if text_prompt else texts
        batch = dict(tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt"))
        if not report_truncation:
            return batch
        full = tokenizer(texts, pairs, truncation=False, verbose=False)["input_ids"]
        return batch, [len(ids) > max_length for ids in full]
    prompt = llm_prompt_format(tokenizer, template, chat, demonstrations)
    budget = max(8, max_length - len(tokenizer(prompt.format(text="", text_pair=""), add_special_tokens=False).input_ids))
    pairs = pairs or [""] * len(texts)
    joined = "{text_pair}" not in prompt  # no slot for the pair: its second text follows the first on a new line
    cut = [(_cut(tokenizer, text, budget // (2 if pair else 1)), _cut(tokenizer, pair, budget // 2 - joined))
           for text, pair in zip(texts, pairs)]
    tokenizer.padding_side = "left"
    filled = [prompt.format(text=f"{text}\n{pair}" if joined and pair else text, text_pair=pair) for text, pair in cut]
    batch = dict(tokenizer(filled, padding=True, add_special_tokens=not chat, return_tensors="pt"))
    if not report_truncation:
        return batch
    return batch, [(text, pair) != kept for text, pair, kept in zip(texts, pairs, cut)]


def llm_prompt_format(tokenizer, template: str, chat: bool, demonstrations: Demonstrations = ()) -> str:
    """The format string an LLM's texts are filled into: any demonstrations (each text cut to 64 tokens)
    before the template, as a chat turn when `chat`."""
    shown = tuple((_cut(tokenizer, text, 64), answer) for text, answer in demonstrations)
    return prompt_format(tokenizer, template, chat, shown)


def _cut(tokenizer, text: str, budget: int) -> str:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return text if len(ids) <= budget else tokenizer.decode(ids[:budget])


def features(backbone: Backbone, model: torch.nn.Module, batch: dict, need_hidden: bool,
             prefix: Prefix | None = None, stem: Stem | None = None, packed: bool = False) -> Features:
    """Run `model` (the backbone, possibly wrapped by an adapter) on a tokenized batch, on the
    backbone's device; optionally with per-row attention prefixes (the engine's way to serve prefix
    adapters in mixed batches), or from an encoder's `stem` states on (training's way to skip frozen
    layers it has run once). Positions are numbered as the family numbers them after each row's own
    prefix, so a row's answer does not depend on the prefixes of the others. `packed` (training, where
    the family allows and neither prefix nor stem is given): the rows run end to end, without padding
    (backbones/packing.py); the states come back in the padded layout."""
    mask = batch["attention_mask"].to(backbone.device)
    if packed and prefix is None and stem is None and can_pack(backbone):
        inputs, packing = pack(backbone, batch)
        hidden = model(**{key: value.to(backbone.device) for key, value in inputs.items()}).last_hidden_state
        return Features(packing.unpack(hidden), mask)
    inputs = model_inputs(backbone, batch, prefix)
    if backbone.kind == "encoder":
        with _from_layer(backbone, model, stem):
            return Features(model(**inputs).last_hidden_state, mask)
    if _alters_logits(model):
        out = model(**inputs, logits_to_keep=1, output_hidden_states=need_hidden)
        return Features(out.hidden_states[-1] if need_hidden else None, mask, next_token_logits=out.logits[:, -1])
    hidden = decoder_of(model)(**inputs).last_hidden_state
    return Features(hidden if need_hidden else None, mask, hidden[:, -1], model.get_output_embeddings())


# Config keys of decoders that change logits after the vocabulary projection (Gemma 2's soft cap, Cohere's scale)
LOGIT_CHANGES = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _alters_logits(model: torch.nn.Module) -> bool:
    """Whether the decoder alone does not give what the full model's logits read: peft's prompt learning
    (its forward adds the virtual tokens), a plain projection missing, or logits changed after it."""
    if isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning:
        return True
    config = model.config
    return (type(model.get_output_embeddings()) is not nn.Linear
            or any(getattr(config, key, None) not in (None, 1, 1.0) for key in LOGIT_CHANGES))


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer under a causal LM's vocabulary projection (through a peft wrapper)."""
    return (model.get_base_model() if isinstance(model, PeftModel) else model).get_decoder()


def model_inputs(backbone: Backbone, batch: dict, prefix: Prefix | None = None) -> dict:
    """A tokenized batch as the model takes it, on the backbone's device: with each row's prefix as
    the start of its attention cache (masked where a row's prefix is shorter), and positions numbered
    as the family numbers them after that prefix (decoders always: real tokens only, so that answers
    do not depend on padding)."""
    inputs = {key: value.to(backbone.device) for key, value in batch.items()}
    mask = inputs["attention_mask"]
    if backbone.kind == "decoder":
        inputs["position_ids"] = backbone.family.position_ids(inputs["input_ids"], mask, torch.zeros_like(mask[:, 0]),
                                                              None)
    if prefix is not None:
        inputs["past_key_values"] = DynamicCache(prefix.key_values)
        inputs["attention_mask"] = torch.cat([prefix.mask.to(mask), mask], dim=1)
        inputs["position_ids"] = backbone.family.position_ids(inputs["input_ids"], mask, prefix.lengths.to(mask.device),
                                                              backbone.model.config.pad_token_id)
    return inputs


@torch.no_grad()
def stem_states(backbone: Backbone, model: torch.nn.Module, batch: dict, layers: int) -> torch.Tensor:
    """Hidden states of a tokenized batch after the encoder's first `layers` layers (the output of
    layer `layers - 1`, before anything the model applies after its last layer)."""
    layer_list = backbone.family.layer_list(model)
    captured = []
    handle = layer_list[layers - 1].register_forward_hook(
        lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else output))
    try:
        with _layers_kept(backbone, model, slice(0, layers)):
            model(**{key: value.to(backbone.device) for key, value in batch.items()})
    finally:
        handle.remove()
    return captured[0]


@contextmanager
def _from_layer(backbone: Backbone, model: torch.nn.Module, stem: Stem | None):
    """Run only the layers from `stem.layers` on, the first of them fed `stem.states` in place of
    what reaches it. The model's own forward still embeds, builds masks and positions, so nothing of
    it is re-implemented here; the states only replace the input of the first layer kept."""
    if stem is None:
        yield
        return
    first = backbone.family.layer_list(model)[stem.layers]

    def feed(module, args, kwargs):
        if args:
            return (stem.states.to(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": stem.states.to(kwargs["hidden_states"])}

    handle = first.register_forward_pre_hook(feed, with_kwargs=True)
    try:
        with _layers_kept(backbone, model, slice(stem.layers, None)):
            yield
    finally:
        handle.remove()


@contextmanager
def _layers_kept(backbone: Backbone, model: torch.nn.Module, kept: slice):
    owner, attribute = backbone.family.layer_owner(model)
    layers = getattr(owner, attribute)
    setattr(owner, attribute, layers[kept])
    try:
        yield
    finally:
        setattr(owner, attribute, layers)
