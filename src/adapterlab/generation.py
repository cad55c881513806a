"""Batched generation for rows of different adapters on one LLM backbone, with continuous batching.

Each decode step is one forward of every active row: LoRA rows read their adapters' device slots through
the same per-row hooks as classification (`adapter_slots`), prefix rows start from their own prefix in
the attention cache, base rows from nothing. Tokens are chosen on the device (`sampling`) and only their
ids come to the host, once a step, where each row's text grows by its new token alone (`detokenizer`).
Rows join between steps (their prompts prefilled as a group) and leave as they finish; no peft model is
built and the backbone is never modified.

The attention cache is transformers' `DynamicCache`: each step appends a column to every row, and a
join pads the running rows' cache or the new rows' on the left to one width and stacks them, a copy of
the whole cache at each join (as the cache's own step copies it); a preallocated, paged cache would
avoid both, at the cost of attention kernels of its own.
"""

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from adapterlab.adapter_slots import AdapterSlots, BatchAdapters, upload
from adapterlab.backbones import Backbone, model_inputs
from adapterlab.detokenizer import Detokenizer
from adapterlab.mixed_batch import Servable
from adapterlab.sampling import Sampling, choose


@dataclass(eq=False)
class Sequence:
    """One row being generated: its servable, prompt ids and sampling, and what it has produced."""

    servable: Servable
    prompt_ids: list[int]
    sampling: Sampling
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (end of text or a stop string) or "length"
    generator: torch.Generator | None = None  # its seed's, on the backbone's device
    detokenizer: Detokenizer | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Decoder:
    """The running batch of one backbone. `add` queues sequences; each `step` decodes one token for
    every active row, then prefills the queued ones into the batch (their first token), and returns the
    sequences that advanced; finished ones leave the batch. Adapters come from `slots` (the engine's:
    `Engine.decoder()`), or from slots of its own."""

    def __init__(self, backbone: Backbone, slots: AdapterSlots | None = None):
        self.backbone = backbone
        self.slots = slots if slots is not None else AdapterSlots(backbone.device, backbone.dtype)
        self.waiting: list[Sequence] = []
        self.active: list[Sequence] = []
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (rows, kv_heads, width, head_dim)
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # (rows, width) on the host: which cache entries are real
        self.device_mask = self.mask.to(backbone.device)  # the same, as the model reads it
        self.next_ids = torch.zeros(0, dtype=torch.long, device=backbone.device)  # each active row's next token
        self.adapters: BatchAdapters | None = None  # the active rows', while their slots stay the same
        tokenizer = backbone.tokenizer
        config = getattr(backbone.model, "generation_config", None)  # encoders have none (and never generate)
        ends = config.eos_token_id if config is not None else None
        self.end_ids = set(ends if isinstance(ends, list) else [ends] if ends is not None else [])
        self.end_ids |= {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()

    def add(self, sequence: Sequence) -> Sequence:
        if sequence.sampling.seed is not None:
            sequence.generator = torch.Generator(self.backbone.device).manual_seed(sequence.sampling.seed)
        sequence.detokenizer = Detokenizer(self.backbone.tokenizer)
        self.waiting.append(sequence)
        return sequence

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    @torch.no_grad()
    def step(self) -> list[Sequence]:
        """One token for every active row, then the waiting rows' first; the rows that advanced."""
        chosen = [self._decode()] if self.active else []
        if self.waiting:
            joining, self.waiting = self.waiting, []
            chosen.append(self._prefill(joining))
        advanced = list(self.active)
        self.next_ids = torch.cat(chosen) if chosen else self.next_ids
        for sequence, token in zip(advanced, self.next_ids.tolist()):  # the step's one wait for the device
            self._append(sequence, token)
        self._drop_finished()
        return advanced

    def run(self) -> None:
        while self.busy:
            self.step()

    # --- the two kinds of forward ------------------------------------------------------------------
    def _prefill(self, joining: list[Sequence]) -> torch.Tensor:
        """Read the joining rows' prompts (left-padded, each after its own prefix) in one forward, stack
        their caches onto the running batch, and choose their first tokens (on the device)."""
        adapters = self.slots.batch([s.servable.weights for s in joining])
        width = max(len(s.prompt_ids) for s in joining)
        pad = self.backbone.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(s.prompt_ids)) + s.prompt_ids for s in joining])
        mask = torch.tensor([[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in joining])
        batch = {"input_ids": upload(ids, self.backbone.device), "attention_mask": upload(mask, self.backbone.device)}
        inputs = model_inputs(self.backbone, batch, adapters.prefix())
        with adapters.applied(self.backbone):
            out = self.backbone.model(**inputs, use_cache=True, logits_to_keep=1)
        cache = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        self._join(cache, torch.cat([adapters.prefix_mask(), mask], dim=1), inputs["attention_mask"])
        self.active += joining
        return choose(out.logits[:, -1], [s.sampling for s in joining], [s.generator for s in joining])

    def _decode(self) -> torch.Tensor:
        """One token for every active row, each reading the token it chose last; the tokens (on the device)."""
        positions = self.device_mask.sum(-1, keepdim=True)  # real entries so far: prefix, prompt, generated
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.active), 1)], dim=1)
        self.device_mask = torch.cat([self.device_mask, self.device_mask.new_ones(len(self.active), 1)], dim=1)
        inputs = {"input_ids": self.next_ids[:, None], "attention_mask": self.device_mask,
                  "position_ids": positions, "past_key_values": DynamicCache(self.cache)}
        with self._active_adapters().applied(self.backbone):
            out = self.backbone.model(**inputs, use_cache=True, logits_to_keep=1)
        self.cache = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return choose(out.logits[:, -1], [s.sampling for s in self.active], [s.generator for s in self.active])

    def _active_adapters(self) -> BatchAdapters:
        """The active rows' slots, moved to the device again only when they changed (rows joined or left,
        or an adapter was evicted and copied in again elsewhere between steps)."""
        weights = [s.servable.weights for s in self.active]
        if self.adapters is None or self.slots.slots_of(weights) != self.adapters.numbers:
            self.adapters = self.slots.batch(weights)
        return self.adapters

    # --- the batch's cache -------------------------------------------------------------------------
    def _join(self, cache: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor, device_mask: torch.Tensor) -> None:
        """Stack new rows' cache and mask onto the running ones, the shorter side padded on the left."""
        if not self.active:
            self.cache, self.mask, self.device_mask = cache, mask, device_mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        self.cache = [(torch.cat([_pad_left(k, width, 2), _pad_left(nk, width, 2)]),
                       torch.cat([_pad_left(v, width, 2), _pad_left(nv, width, 2)]))
                      for (k, v), (nk, nv) in zip(self.cache, cache)]
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.device_mask = torch.cat([_pad_left(self.device_mask, width, 1), _pad_left(device_mask, width, 1)])

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self.active) if not s.done]
        if len(keep) == len(self.active):
            return
        self.active = [self.active[i] for i in keep]
        self.adapters = None
        rows = torch.tensor(keep, dtype=torch.long)
        columns = self.mask[rows].any(0).nonzero().squeeze(1)  # entries no remaining row attends to go (host)
        self.mask = self.mask[rows][:, columns]
        rows, columns = upload(rows, self.backbone.device), upload(columns, self.backbone.device)
        self.cache = [(k.index_select(0, rows).index_select(2, columns), v.index_select(0, rows).index_select(2, columns))
                      for k, v in self.cache]
        self.device_mask = self.device_mask.index_select(0, rows).index_select(1, columns)
        self.next_ids = self.next_ids.index_select(0, rows)

    # --- the text ----------------------------------------------------------------------------------
    def _append(self, sequence: Sequence, token: int) -> None:
        if token in self.end_ids:
            sequence.text, sequence.finish_reason = sequence.detokenizer.finish(), "stop"
            return
        sequence.token_ids.append(token)
        before = len(sequence.text)
        text = sequence.text + sequence.detokenizer.add(token)
        if len(sequence.token_ids) >= sequence.sampling.max_tokens:
            text, sequence.finish_reason = sequence.detokenizer.finish(), "length"
        cut = _first_stop(text, sequence.sampling.stop, before)
        if cut >= 0:
            text, sequence.finish_reason = text[:cut], "stop"
        sequence.text = text


def _first_stop(text: str, stops: tuple[str, ...], before: int) -> int:
    """Where the first stop string in `text` starts, -1 if none; the text up to `before` had none, so
    only a stop that ends after it can be new."""
    found = [text.find(stop, max(0, before - len(stop) + 1)) for stop in stops if stop]
    return min((at for at in found if at >= 0), default=-1)


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
