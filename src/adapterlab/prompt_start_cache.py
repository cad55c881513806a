"""The engine's cache of LLM prompt starts: for each adapter and prompt start (backbones/prompt_start.py),
its keys and values on the device, computed by the adapter on first use, kept for the batches after it.
A batch's rows then run only their tokens after the start, each row attending to its own adapter's cache
(padded to the longest start and masked, like prefix-tuning's virtual tokens, which it includes)."""

from collections import OrderedDict

import torch

from adapterlab.adapter_slots import AdapterSlots, BatchAdapters, upload
from adapterlab.backbones import Backbone, Prefix
from adapterlab.backbones.prompt_start import KeyValues, start_cache, start_ids
from adapterlab.methods.base import AdapterWeights
from adapterlab.prompts import PromptSettings

DEFAULT_STARTS = 64  # a SmolLM2 chat prompt's start: ~2 MB in float32


class PromptStarts:
    """Starts' keys and values per (adapter weights, start tokens); least recently used out past `max_entries`."""

    def __init__(self, max_entries: int = DEFAULT_STARTS):
        self.max_entries = max_entries
        self._ids: dict[PromptSettings, tuple[int, ...]] = {}  # the engine's one tokenizer reads them
        self._cache: OrderedDict[tuple[AdapterWeights, tuple[int, ...]], KeyValues] = OrderedDict()

    def start_of(self, tokenizer, prompt: PromptSettings) -> tuple[int, ...]:
        if prompt not in self._ids:
            self._ids[prompt] = start_ids(tokenizer, prompt)
        return self._ids[prompt]

    def discard(self, weights: AdapterWeights) -> None:
        """Drop an adapter's starts (it left the engine)."""
        for key in [key for key in self._cache if key[0] is weights]:
            del self._cache[key]

    def key_values(self, backbone: Backbone, slots: AdapterSlots, weights: AdapterWeights,
                   start: tuple[int, ...]) -> KeyValues:
        """The start's cache under `weights` (already in a slot: its batch put it there), on first use computed."""
        key = (weights, start)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        adapter = slots.batch([weights])
        with torch.no_grad(), adapter.applied(backbone):
            self._cache[key] = start_cache(backbone, backbone.model, start, adapter.prefix())
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return self._cache[key]

    def prefix(self, backbone: Backbone, adapters: BatchAdapters, weights: list[AdapterWeights],
               starts: list[tuple[int, ...]]) -> Prefix | None:
        """Each row's attention prefix, padded to the longest and masked: its adapter's start cache where
        the row began with `starts[row]` (its virtual tokens included), else its adapter's virtual tokens."""
        if not any(starts):
            return adapters.prefix()
        lengths = [virtual + len(start) for virtual, start in zip(adapters.prefix_lengths, starts)]
        own = adapters.prefix() if any(length and not start for start, length in zip(starts, lengths)) else None
        sources = []  # per row: per layer (K, V) of (kv_heads, length, head_dim), or None
        for row, (w, start) in enumerate(zip(weights, starts)):
            if start:
                sources.append([(k[0], v[0]) for k, v in self.key_values(backbone, adapters.slots, w, start)])
            else:
                sources.append(None if own is None else [(k[row], v[row]) for k, v in own.key_values])
        template = next(source for source in sources if source is not None)
        longest = max(lengths)
        key_values = []
        for layer, pair in enumerate(template):
            stacked = []
            for kind, sample in enumerate(pair):
                out = sample.new_zeros(len(starts), sample.shape[0], longest, sample.shape[2])
                for row, source in enumerate(sources):
                    if source is not None:
                        out[row, :, :lengths[row]] = source[layer][kind][:, :lengths[row]]
                stacked.append(out)
            key_values.append(tuple(stacked))
        lengths_tensor = torch.tensor(lengths)
        mask = (torch.arange(longest)[None, :] < lengths_tensor[:, None]).long()
        return Prefix(key_values, upload(mask, backbone.device), upload(lengths_tensor, backbone.device))
