"""One forward pass for rows of different adapters: the base output is computed once for the whole
batch; each row then gets its own LoRA deltas, its own attention prefix, and its own head.

Rows may mix LoRA adapters, prefix adapters, and zero-shot rows (no adapter) freely: each row reads
its adapter's slot on the device (`adapter_slots`: LoRA deltas by batched matmuls in forward hooks,
zeros for rows without one; prefixes padded to the longest and masked per row). After the shared
backbone pass each row gets its own head's scores; heads that compute alike answer their rows together,
whatever their label counts. A row of an ensemble becomes one row per member in the same pass, and its
answer is the mean of the members' probabilities. The host waits for the device once, for the answers.
"""

import itertools
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from adapterlab.adapter_slots import AdapterSlots, upload
from adapterlab.backbones import Backbone, Features, features, tokenize
from adapterlab.heads import ClassifierHead, LabelWordHead, pool
from adapterlab.methods.base import AdapterWeights
from adapterlab.prompt_start_cache import PromptStarts
from adapterlab.prompts import PromptSettings


@dataclass(eq=False)
class Servable:
    """An adapter (or a zero-shot classifier) ready to answer: weights, head, prompt, labels."""

    key: str
    labels: list[str]
    weights: AdapterWeights
    head: nn.Module
    prompt: PromptSettings
    nbytes: int
    kind: str = "classify"  # or "generate": a generative adapter (its template is prompt.template)
    members: tuple["Servable", ...] = ()  # an ensemble: it answers with the mean of its members' probabilities


@dataclass
class Row:
    servable: Servable
    text: str
    text_pair: str | None = None


@torch.no_grad()
def forward_mixed(backbone: Backbone, slots: AdapterSlots, rows: list[Row],
                  starts: PromptStarts | None = None) -> tuple[list[list[float]], list[bool]]:
    """Label probabilities for each row, from its own adapter and head (an ensemble's: the mean of its
    members'), in one backbone pass that waits for the device once, for the answers; and whether each
    row's input was cut to its adapter's token limit. With `starts`, an LLM row whose head reads its last
    position runs only its tokens after its prompt's start, whose cache `starts` keeps per adapter."""
    counts = [len(row.servable.members) or 1 for row in rows]
    member_rows = [Row(member, row.text, row.text_pair) for row in rows for member in row.servable.members or [row.servable]]
    probabilities, truncated = _forward_rows(backbone, slots, member_rows, starts)
    ends = list(itertools.accumulate(counts))
    return ([probabilities[end - 1] if n == 1 else [sum(column) / n for column in zip(*probabilities[end - n:end])]
             for n, end in zip(counts, ends)],
            [any(truncated[end - n:end]) for n, end in zip(counts, ends)])


def _forward_rows(backbone: Backbone, slots: AdapterSlots, rows: list[Row],
                  starts: PromptStarts | None) -> tuple[list[list[float]], list[bool]]:
    weights = [row.servable.weights for row in rows]
    adapters = slots.batch(weights)
    need_hidden = any(row.servable.head.needs_hidden for row in rows)
    if backbone.kind != "decoder" or need_hidden:
        starts = None  # an encoder reads its text both ways; a pooling head reads every position
    batch, truncated, row_starts = _tokenize_rows(backbone, rows, starts)
    batch = {key: upload(value, backbone.device) for key, value in batch.items()}
    prefix = adapters.prefix() if starts is None else starts.prefix(backbone, adapters, weights, row_starts)
    if prefix is not None and "token_type_ids" in batch:  # peft drops them under prompt learning: so must we
        batch["token_type_ids"] = batch["token_type_ids"] * (prefix.lengths == 0)[:, None]
    with adapters.applied(backbone):
        feats = features(backbone, backbone.model, batch, need_hidden, prefix)
    return _head_probabilities(backbone, rows, feats), truncated


def _head_probabilities(backbone: Backbone, rows: list[Row], feats: Features) -> list[list[float]]:
    """Each row's label probabilities from its own head. Heads that compute alike (classifiers of one
    pooling and scale, label-word heads) answer together: their weights padded into one table, a row
    reading its head's by index, a few operations for a whole group whatever its number of heads. All
    answers are gathered on the device and copied to the host at once."""
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(_head_kind(row.servable.head), []).append(i)
    positions = [{head: n for n, head in enumerate(dict.fromkeys(rows[i].servable.head for i in members))}
                 for members in groups.values()]  # each group's heads, numbered in first-seen order
    heads = [list(numbered) for numbered in positions]
    which = [numbered[rows[i].servable.head] for numbered, members in zip(positions, groups.values()) for i in members]
    order = [i for members in groups.values() for i in members]
    index, which = upload(torch.tensor(order + which), backbone.device).split(len(rows))
    width = max(len(row.servable.labels) for row in rows)
    sizes = [len(members) for members in groups.values()]
    scores = [_group_scores(kind, group_heads, _select(feats, picked), chosen)
              for kind, group_heads, picked, chosen in zip(groups, heads, index.split(sizes), which.split(sizes))]
    logits = [nn.functional.pad(group, (0, width - group.shape[1]), value=float("-inf")) for group in scores]
    probabilities = torch.empty(len(rows), width, device=index.device).index_copy_(0, index, torch.cat(logits).softmax(-1))
    values = probabilities.tolist()  # the batch's one wait for the device
    return [values[i][:len(row.servable.labels)] for i, row in enumerate(rows)]


def _head_kind(head: nn.Module) -> tuple:
    """Heads of one kind compute alike and answer their rows together; any other head answers alone."""
    if isinstance(head, ClassifierHead):
        return "classifier", head.pooling, head.cosine_scale, head.normalize
    if isinstance(head, LabelWordHead):
        return ("label_words",)
    return "own", id(head)


def _group_scores(kind: tuple, heads: list[nn.Module], feats: Features, which: torch.Tensor) -> torch.Tensor:
    """Label scores (rows, the group's most labels; -inf past a head's own) of rows whose heads are of
    one kind, row r read by heads[which[r]], as each head's own forward computes them."""
    if kind[0] == "classifier":
        _, pooling, cosine_scale, normalize = kind
        pooled = pool(feats, pooling)
        weights = pad_sequence([head.linear.weight for head in heads], batch_first=True)
        bias = pad_sequence([head.linear.bias for head in heads], batch_first=True, padding_value=float("-inf"))
        if cosine_scale is not None:
            pooled, weights = cosine_scale * nn.functional.normalize(pooled, dim=-1), nn.functional.normalize(weights, dim=-1)
        elif normalize:
            pooled = nn.functional.normalize(pooled, dim=-1)
        return torch.bmm(weights.index_select(0, which), pooled[:, :, None]).squeeze(2) + bias.index_select(0, which)
    if kind[0] == "label_words":
        ids = pad_sequence([head.token_ids for head in heads], batch_first=True, padding_value=-1).index_select(0, which)
        return feats.label_logits(ids.clamp(min=0)).float().masked_fill(ids < 0, float("-inf"))
    return heads[0](feats).float()


def _select(feats: Features, index: torch.Tensor) -> Features:
    pick = lambda t: t[index] if t is not None else None  # noqa: E731
    return Features(pick(feats.hidden), feats.attention_mask[index], pick(feats.last_state), feats.output_head,
                    pick(feats.next_token_logits))


def _tokenize_rows(backbone: Backbone, rows: list[Row], starts: PromptStarts | None
                   ) -> tuple[dict[str, torch.Tensor], list[bool], list[tuple[int, ...]]]:
    """Tokenize each prompt-settings group its own way, then pad all rows to one batch (on the
    right for encoders, on the left for LLMs, as `backbones.tokenize` does); which rows were cut; and
    with `starts`, the prompt start each row began with and lost (its cache stands for it), else ()."""
    groups: dict[tuple[PromptSettings, bool], list[int]] = {}  # pairs and single texts tokenize apart
    for i, row in enumerate(rows):
        groups.setdefault((row.servable.prompt, row.text_pair is not None), []).append(i)
    per_row: list[dict[str, torch.Tensor]] = [{}] * len(rows)
    truncated = [False] * len(rows)
    row_starts: list[tuple[int, ...]] = [()] * len(rows)
    for (prompt, paired), indices in groups.items():
        pairs = [rows[i].text_pair for i in indices] if paired else None
        encoded, cut = tokenize(backbone, [rows[i].text for i in indices], pairs, prompt.template, prompt.max_length,
                                prompt.chat, prompt.demonstrations, prompt.text_prompt, report_truncation=True)
        for j, i in enumerate(indices):
            keep = encoded["attention_mask"][j].bool()
            per_row[i] = {key: value[j][keep] for key, value in encoded.items()}
            truncated[i] = cut[j]
        if starts is not None:
            start = starts.start_of(backbone.tokenizer, prompt)
            for i in indices:
                ids = per_row[i]["input_ids"]
                if start and len(ids) > len(start) and tuple(ids[:len(start)].tolist()) == start:
                    per_row[i] = {key: value[len(start):] for key, value in per_row[i].items()}
                    row_starts[i] = start
    left = backbone.kind == "decoder"
    pad_id = backbone.tokenizer.pad_token_id or 0
    width = max(len(r["input_ids"]) for r in per_row)
    batch = {}
    for key in per_row[0]:
        fill = pad_id if key == "input_ids" else 0
        batch[key] = torch.stack([_pad(r[key], width, fill, left) for r in per_row])
    return batch, truncated, row_starts


def _pad(values: torch.Tensor, width: int, fill: int, left: bool) -> torch.Tensor:
    padding = values.new_full((width - len(values),), fill)
    return torch.cat([padding, values] if left else [values, padding])
