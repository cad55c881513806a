"""One forward pass for rows of different adapters: the base output is computed once for the whole
batch; each row then gets its own LoRA deltas, its own attention prefix, and its own head.

Rows may mix LoRA adapters, prefix adapters, and zero-shot rows (no adapter) freely: LoRA deltas are
added per row by batched matmuls in forward hooks (rows without a delta get zeros), prefixes are
padded to the longest and masked per row. Heads differ in label count, so each group of rows goes
through its own head after the shared backbone pass. A row of an ensemble becomes one row per member
in the same pass, and its answer is the mean of the members' probabilities.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from adapterlab.backbones import Backbone, Features, Prefix, features, tokenize
from adapterlab.methods.base import AdapterWeights
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
def forward_mixed(backbone: Backbone, rows: list[Row]) -> tuple[list[torch.Tensor], list[bool]]:
    """Label probabilities for each row, from its own adapter and head (an ensemble's: the mean of its
    members'), in one backbone pass; and whether each row's input was cut to its adapter's token limit."""
    counts = [len(row.servable.members) or 1 for row in rows]
    member_rows = [Row(member, row.text, row.text_pair) for row in rows for member in row.servable.members or [row.servable]]
    probabilities, truncated = _forward_rows(backbone, member_rows)
    ends = torch.tensor(counts).cumsum(0).tolist()
    return ([probabilities[end - n] if n == 1 else torch.stack(probabilities[end - n:end]).mean(0)
             for n, end in zip(counts, ends)],
            [any(truncated[end - n:end]) for n, end in zip(counts, ends)])


def _forward_rows(backbone: Backbone, rows: list[Row]) -> tuple[list[torch.Tensor], list[bool]]:
    servables = list(dict.fromkeys(row.servable for row in rows))  # unique, in first-seen order
    slot = {servable: i for i, servable in enumerate(servables)}
    row_slots = torch.tensor([slot[row.servable] for row in rows])
    batch, truncated = _tokenize_rows(backbone, rows)
    prefix = prefix_of(servables, row_slots)
    if prefix is not None and "token_type_ids" in batch:  # peft drops them under prompt learning: so must we
        batch["token_type_ids"] = batch["token_type_ids"] * (prefix.lengths == 0)[:, None]
    need_hidden = any(servable.head.needs_hidden for servable in servables)
    with lora_deltas(backbone, lora_rows(servables, row_slots)):
        feats = features(backbone, backbone.model, batch, need_hidden, prefix)
    results: list[torch.Tensor | None] = [None] * len(rows)
    for servable in servables:
        index = (row_slots == slot[servable]).nonzero().squeeze(1)
        logits = servable.head(_select(feats, index.to(backbone.device)))
        for i, probabilities in zip(index.tolist(), logits.float().softmax(-1)):
            results[i] = probabilities.cpu()
    return results, truncated


def _select(feats: Features, index: torch.Tensor) -> Features:
    pick = lambda t: t[index] if t is not None else None  # noqa: E731
    return Features(pick(feats.hidden), feats.attention_mask[index], pick(feats.next_token_logits))


def _tokenize_rows(backbone: Backbone, rows: list[Row]) -> tuple[dict[str, torch.Tensor], list[bool]]:
    """Tokenize each prompt-settings group its own way, then pad all rows to one batch (on the
    right for encoders, on the left for LLMs, as `backbones.tokenize` does); and which rows were cut."""
    groups: dict[tuple[PromptSettings, bool], list[int]] = {}  # pairs and single texts tokenize apart
    for i, row in enumerate(rows):
        groups.setdefault((row.servable.prompt, row.text_pair is not None), []).append(i)
    per_row: list[dict[str, torch.Tensor]] = [{}] * len(rows)
    truncated = [False] * len(rows)
    for (prompt, paired), indices in groups.items():
        pairs = [rows[i].text_pair for i in indices] if paired else None
        encoded, cut = tokenize(backbone, [rows[i].text for i in indices], pairs, prompt.template, prompt.max_length,
                                prompt.chat, prompt.demonstrations, prompt.text_prompt, report_truncation=True)
        for j, i in enumerate(indices):
            keep = encoded["attention_mask"][j].bool()
            per_row[i] = {key: value[j][keep] for key, value in encoded.items()}
            truncated[i] = cut[j]
    left = backbone.kind == "decoder"
    pad_id = backbone.tokenizer.pad_token_id or 0
    width = max(len(r["input_ids"]) for r in per_row)
    batch = {}
    for key in per_row[0]:
        fill = pad_id if key == "input_ids" else 0
        batch[key] = torch.stack([_pad(r[key], width, fill, left) for r in per_row])
    return batch, truncated


def _pad(values: torch.Tensor, width: int, fill: int, left: bool) -> torch.Tensor:
    padding = values.new_full((width - len(values),), fill)
    return torch.cat([padding, values] if left else [values, padding])


def prefix_of(servables: list[Servable], row_slots: torch.Tensor) -> Prefix | None:
    """Prefixes of the batch's prefix adapters, zero-padded to the longest and masked per row."""
    lengths = torch.tensor([s.weights.prefix_length for s in servables])
    longest = int(lengths.max())
    if longest == 0:
        return None
    template = next(s.weights.prefix for s in servables if s.weights.prefix)
    slots = row_slots.to(template[0][0].device)
    key_values = []
    for layer, (key, _) in enumerate(template):
        stacked = key.new_zeros(2, len(servables), key.shape[0], longest, key.shape[2])
        for i, servable in enumerate(servables):
            if servable.weights.prefix:
                k, v = servable.weights.prefix[layer]
                stacked[0, i, :, :k.shape[1]], stacked[1, i, :, :v.shape[1]] = k, v
        key_values.append((stacked[0][slots], stacked[1][slots]))
    row_lengths = lengths[row_slots]
    mask = (torch.arange(longest)[None, :] < row_lengths[:, None]).long()
    return Prefix(key_values, mask, row_lengths)


def lora_rows(servables: list[Servable], row_slots: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each adapted module's A and B for every row, (rows, r, in) and (rows, out, r): its adapter's
    own (zero-padded to the batch's largest rank), zeros for rows whose adapter leaves the module alone."""
    modules = sorted({name for s in servables for name in s.weights.linear_deltas})
    return {name: _stack_rows(name, servables, row_slots) for name in modules}


@contextmanager
def lora_deltas(backbone: Backbone, rows: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """While active, each adapted Linear adds x·Aᵀ·Bᵀ with every row's own (A, B) from `lora_rows`: one
    batched matmul pair per module, whatever the number of adapters in the batch."""
    handles = []
    try:
        for name, (a_rows, b_rows) in rows.items():
            handles.append(backbone.modules[name].register_forward_hook(_add_delta(a_rows, b_rows)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _stack_rows(name: str, servables: list[Servable], row_slots: torch.Tensor):
    pairs = [s.weights.linear_deltas.get(name) for s in servables]
    a0, b0 = next(pair for pair in pairs if pair is not None)
    rank = max(pair[0].shape[0] for pair in pairs if pair is not None)
    a = a0.new_zeros(len(servables), rank, a0.shape[1])
    b = b0.new_zeros(len(servables), b0.shape[0], rank)
    for i, pair in enumerate(pairs):
        if pair is not None:
            a[i, :pair[0].shape[0]], b[i, :, :pair[1].shape[1]] = pair
    slots = row_slots.to(a.device)
    return a[slots], b[slots]


def _add_delta(a_rows: torch.Tensor, b_rows: torch.Tensor):
    def hook(module, inputs, output):
        x = inputs[0].reshape(len(a_rows), -1, a_rows.shape[2])  # (B, tokens, in), tokens may be 1
        delta = torch.bmm(torch.bmm(x, a_rows.transpose(1, 2)), b_rows.transpose(1, 2))
        return output + delta.reshape(output.shape)

    return hook
