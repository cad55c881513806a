"""Batched generation for rows of different adapters on one LLM backbone, with continuous batching.

Each decode step is one forward of every active row: LoRA rows get their own deltas through the same
per-row hooks as classification (`mixed_batch.lora_deltas`), prefix rows start from their own prefix in
the attention cache, base rows from nothing. Rows join between steps (their prompts prefilled as a
group, their caches padded on the left and stacked onto the running ones) and leave as they finish;
no peft model is built and the backbone is never modified.
"""

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from adapterlab.backbones import Backbone, model_inputs
from adapterlab.mixed_batch import Servable, lora_deltas, lora_rows, prefix_of


@dataclass
class Sampling:
    """How a row picks its next token: greedy at temperature 0, else sampled (top-p) from its own seed."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(eq=False)
class Sequence:
    """One row being generated: its servable, prompt ids and sampling, and what it has produced."""

    servable: Servable
    prompt_ids: list[int]
    sampling: Sampling
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (end of text or a stop string) or "length"
    generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Decoder:
    """The running batch of one backbone. `add` queues sequences; each `step` decodes one token for
    every active row, then prefills the queued ones into the batch (their first token), and returns the
    sequences that advanced; finished ones leave the batch."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.waiting: list[Sequence] = []
        self.active: list[Sequence] = []
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (rows, kv_heads, width, head_dim)
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # (rows, width): which cache entries are real
        self.next_ids = torch.zeros(0, dtype=torch.long)  # each active row's token to read next
        self.lora_stacks: tuple[tuple[Servable, ...], dict] = ((), {})  # whose rows they are, the stacks
        tokenizer = backbone.tokenizer
        config = getattr(backbone.model, "generation_config", None)  # encoders have none (and never generate)
        ends = config.eos_token_id if config is not None else None
        self.end_ids = set(ends if isinstance(ends, list) else [ends] if ends is not None else [])
        self.end_ids |= {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()

    def add(self, sequence: Sequence) -> Sequence:
        if sequence.sampling.seed is not None:
            sequence.generator = torch.Generator().manual_seed(sequence.sampling.seed)
        self.waiting.append(sequence)
        return sequence

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    @torch.no_grad()
    def step(self) -> list[Sequence]:
        """One token for every active row, then the waiting rows' first; the rows that advanced."""
        advanced = list(self.active)
        if self.active:
            self._decode()
        if self.waiting:
            joining, self.waiting = self.waiting, []
            self._prefill(joining)
            advanced += joining
        self._drop_finished()
        return advanced

    def run(self) -> None:
        while self.busy:
            self.step()

    # --- the two kinds of forward ------------------------------------------------------------------
    def _prefill(self, joining: list[Sequence]) -> None:
        """Read the joining rows' prompts (left-padded, each after its own prefix) in one forward, pick
        their first tokens, and stack their caches onto the running batch."""
        servables = list(dict.fromkeys(s.servable for s in joining))
        slots = torch.tensor([servables.index(s.servable) for s in joining])
        width = max(len(s.prompt_ids) for s in joining)
        pad = self.backbone.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(s.prompt_ids)) + s.prompt_ids for s in joining])
        mask = torch.tensor([[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in joining])
        batch = {"input_ids": ids, "attention_mask": mask}
        prefix = prefix_of(servables, slots)
        inputs = model_inputs(self.backbone, batch, prefix)
        with lora_deltas(self.backbone, lora_rows(servables, slots)):
            out = self.backbone.model(**inputs, use_cache=True, logits_to_keep=1)
        cache = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        self._join(cache, inputs["attention_mask"].cpu())
        self.active += joining
        self._choose(joining, out.logits[:, -1])

    def _decode(self) -> None:
        """One token for every active row: each reads the token it chose last."""
        device = self.backbone.device
        positions = self.mask.sum(-1, keepdim=True)  # real entries so far: prefix, prompt, generated
        self.mask = torch.cat([self.mask, torch.ones(len(self.active), 1, dtype=self.mask.dtype)], dim=1)
        inputs = {"input_ids": self.next_ids[:, None].to(device), "attention_mask": self.mask.to(device),
                  "position_ids": positions.to(device), "past_key_values": DynamicCache(self.cache)}
        with lora_deltas(self.backbone, self._lora_rows()):
            out = self.backbone.model(**inputs, use_cache=True, logits_to_keep=1)
        self.cache = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        self._choose(self.active, out.logits[:, -1])

    def _lora_rows(self) -> dict:
        """The active rows' LoRA stacks, built again only when rows joined or left (decode steps between
        reuse them)."""
        rows = tuple(s.servable for s in self.active)
        if self.lora_stacks[0] != rows:
            servables = list(dict.fromkeys(rows))
            self.lora_stacks = rows, lora_rows(servables, torch.tensor([servables.index(s) for s in rows]))
        return self.lora_stacks[1]

    # --- the batch's cache -------------------------------------------------------------------------
    def _join(self, cache: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        """Stack new rows' cache and mask onto the running ones, the shorter side padded on the left."""
        if not self.active:
            self.cache, self.mask = cache, mask
            self.next_ids = torch.zeros(0, dtype=torch.long)
            return
        width = max(self.mask.shape[1], mask.shape[1])
        self.cache = [(torch.cat([_pad_left(k, width, 2), _pad_left(nk, width, 2)]),
                       torch.cat([_pad_left(v, width, 2), _pad_left(nv, width, 2)]))
                      for (k, v), (nk, nv) in zip(self.cache, cache)]
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self.active) if not s.done]
        if len(keep) == len(self.active):
            return
        self.active = [self.active[i] for i in keep]
        index = torch.tensor(keep, dtype=torch.long)
        columns = self.mask[index].any(0).nonzero().squeeze(1)  # entries no remaining row attends to go
        device = self.backbone.device
        self.cache = [(k[index.to(device)][:, :, columns.to(device)], v[index.to(device)][:, :, columns.to(device)])
                      for k, v in self.cache]
        self.mask = self.mask[index][:, columns]
        self.next_ids = self.next_ids[index]

    # --- choosing tokens ---------------------------------------------------------------------------
    def _choose(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        """Each row's next token from its logits, appended, checked for an end; the new tokens are what
        the active rows read next."""
        logits = logits.float().cpu()
        chosen = [_pick(row_logits, s.sampling, s.generator) for row_logits, s in zip(logits, rows)]
        for sequence, token in zip(rows, chosen):
            self._append(sequence, token)
        position = {id(s): i for i, s in enumerate(self.active)}
        next_ids = self.next_ids.tolist() + [0] * (len(self.active) - len(self.next_ids))
        for sequence, token in zip(rows, chosen):
            next_ids[position[id(sequence)]] = token
        self.next_ids = torch.tensor(next_ids, dtype=torch.long)

    def _append(self, sequence: Sequence, token: int) -> None:
        if token in self.end_ids:
            sequence.finish_reason = "stop"
            return
        sequence.token_ids.append(token)
        text = self.backbone.tokenizer.decode(sequence.token_ids, skip_special_tokens=True)
        cut = min((text.find(stop) for stop in sequence.sampling.stop if stop and stop in text), default=-1)
        if cut >= 0:
            sequence.text, sequence.finish_reason = text[:cut], "stop"
            return
        sequence.text = text
        if len(sequence.token_ids) >= sequence.sampling.max_tokens:
            sequence.finish_reason = "length"


def _pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    if sampling.temperature <= 0:
        return int(logits.argmax())
    probabilities = (logits / sampling.temperature).softmax(-1)
    if sampling.top_p < 1:
        ordered, order = probabilities.sort(descending=True)
        outside = ordered.cumsum(-1) - ordered > sampling.top_p  # keep the smallest set reaching top_p
        probabilities = probabilities.clone()
        probabilities[order[outside]] = 0
    return int(torch.multinomial(probabilities, 1, generator=generator))


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
