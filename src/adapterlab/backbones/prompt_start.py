"""An LLM prompt's shared start, run once. Every prompt of one template begins with the same tokens (the
chat template's system turn, any demonstrations, the template's words before {text}); their keys and
values are computed once, for one row, and each row runs only its own tokens after them, attending to
that cache (vLLM's prefix caching, within a batch). Math-equal to running the whole prompts: the start
keeps its positions, and each row's tokens attend to the same keys and values as before."""

import string

import torch

from adapterlab.backbones.forward import Features, Prefix, decoder_of, features, llm_prompt_format, model_inputs
from adapterlab.backbones.loading import Backbone
from adapterlab.prompts import PromptSettings

KeyValues = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (K, V), each (rows, kv_heads, P, head_dim)


def start_ids(tokenizer, prompt: PromptSettings) -> tuple[int, ...]:
    """The tokens that prompts of these settings start with: the prompt up to its first placeholder, less
    its last token, which may join the text's first ('Review:' + ' ' + 'it' reads 'Review', ':', ' it')."""
    form = llm_prompt_format(tokenizer, prompt.template, prompt.chat, prompt.demonstrations)
    literal = []
    for text, field, _, _ in string.Formatter().parse(form):
        literal.append(text)
        if field is not None:
            break
    return tuple(tokenizer("".join(literal), add_special_tokens=not prompt.chat).input_ids[:-1])


def after_start(batch: dict[str, torch.Tensor], start: tuple[int, ...]) -> dict[str, torch.Tensor] | None:
    """A left-padded batch of whole prompts without their shared `start`: each row's tokens after it,
    still left-padded; None unless every row begins with `start` and has a token after it."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    length, width = len(start), ids.shape[1]
    real = mask.sum(1)
    if not length or set(batch) != {"input_ids", "attention_mask"} or bool((real <= length).any()):
        return None
    first = (width - real)[:, None] + torch.arange(length, device=ids.device)
    if not bool((ids.gather(1, first) == torch.tensor(start, device=ids.device)).all()):
        return None
    kept = mask[:, :width - length]  # left padding: the rows' tokens after the start fill the last columns
    return {"input_ids": ids[:, length:] * kept, "attention_mask": kept}


def start_cache(backbone: Backbone, model: torch.nn.Module, start: tuple[int, ...],
                prefix: Prefix | None = None) -> KeyValues:
    """Keys and values of `start` read by `model` (after `prefix`, an adapter's own virtual tokens, which
    they then include), for one row."""
    batch = {"input_ids": torch.tensor([start]), "attention_mask": torch.ones(1, len(start), dtype=torch.long)}
    cache = decoder_of(model)(**model_inputs(backbone, batch, prefix), use_cache=True).past_key_values
    return [(layer.keys, layer.values) for layer in cache.layers]


def start_features(backbone: Backbone, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                   start: tuple[int, ...]) -> Features | None:
    """`features` at the last position of whole LLM prompts, their shared `start` run once and its cache
    expanded over the rows (under training, gradients flow back through it to the adapter's weights in
    the start's layers); None when the rows do not all begin with `start`."""
    rest = after_start(batch, start)
    if rest is None:
        return None
    rows, length = len(rest["input_ids"]), len(start)
    key_values = [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
                  for k, v in start_cache(backbone, model, start)]
    lengths = torch.full((rows,), length, device=backbone.device)
    prefix = Prefix(key_values, torch.ones(rows, length, dtype=torch.long, device=backbone.device), lengths)
    return features(backbone, model, rest, need_hidden=False, prefix=prefix)
