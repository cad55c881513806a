"""Adapters' weights on the device, packed into preallocated slots, as Punica, S-LoRA and vLLM serve many
LoRA adapters at once: per adapted module one A tensor (slots, rank, in) and one B tensor (slots, out,
rank), per attention layer one K and one V tensor (slots, kv_heads, length, head_dim). An adapter is
copied into a free slot once, when a batch first needs it on the device; a batch then moves one index of
its rows' slots to the device (asynchronously), and each adapted module gathers its rows' A and B by that
index: one gather and one batched matmul pair, however many adapters the batch mixes, and nothing waits
for the device.

Slot 0 holds zeros: the rows of zero-shot classifiers and of base generation read it; in a module that
an adapter leaves alone, its own slot holds zeros too. Ranks and prefix lengths differ between adapters:
each tensor is as wide as the largest seen, the rest of a smaller adapter's slot zeros, so that its delta
is its own. The least recently used adapters leave the device once the slots in use would pass
`max_bytes` (their weights stay on the host, in the engine's cache); a batch's own adapters always fit,
past the budget if they must. The tensors grow by doubling, up to the budget's count of slots; a wider
layout (a first higher rank, a new module or a longer prefix) widens them at the count they have.
"""

import heapq
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from adapterlab.backbones import Backbone, Prefix
from adapterlab.methods.base import AdapterWeights

DEFAULT_MAX_BYTES = 2**30


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the copy: to a CUDA device from page-locked memory,
    asynchronously (the stream orders it before the kernels that read it); elsewhere a plain copy (on
    the CPU, none)."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass
class LoraSlots:
    """One adapted module's slots: A (slots, rank, in) and B·scale (slots, out, rank)."""

    a: torch.Tensor
    b: torch.Tensor


@dataclass
class Layout:
    """The slot tensors' shapes: per module (in, out, rank); the prefix's (layers, kv_heads, length, head_dim)."""

    lora: dict[str, tuple[int, int, int]]
    prefix: tuple[int, int, int, int] | None

    def slot_bytes(self, element_size: int) -> int:
        lora = sum((inputs + outputs) * rank for inputs, outputs, rank in self.lora.values())
        layers, heads, length, width = self.prefix or (0, 0, 0, 0)
        return (lora + 2 * layers * heads * length * width) * element_size + 8  # + the slot's prefix length


class AdapterSlots:
    """The adapters on one device, in slots; least recently used first out past `max_bytes` (None: no bound)."""

    def __init__(self, device: torch.device | str, dtype: torch.dtype, max_bytes: int | None = DEFAULT_MAX_BYTES):
        self.device, self.dtype, self.max_bytes = torch.device(device), dtype, max_bytes
        self.capacity = 1  # slot 0, the zeros
        self.lora: dict[str, LoraSlots] = {}
        self.prefix: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (K, V)
        self.prefix_lengths = torch.zeros(1, dtype=torch.long, device=self.device)
        self._slots: OrderedDict[AdapterWeights, int] = OrderedDict()  # least recently used first
        self._free: list[int] = []  # a heap: the lowest free slot is taken first
        self.stats = {"device_loads": 0, "device_evictions": 0}

    def __contains__(self, weights: AdapterWeights) -> bool:
        return weights in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def nbytes(self) -> int:
        """Bytes the slot tensors hold on the device."""
        return self.capacity * self._layout().slot_bytes(self._element_size())

    def slots_of(self, weights: list[AdapterWeights]) -> list[int]:
        """Each adapter's slot (0 for no weights), copying the missing ones in; they become the most
        recently used, and none of them leaves to make room for another."""
        needed = {w for w in weights if not w.empty}
        for w in dict.fromkeys(w for w in weights if not w.empty):
            if w in self._slots:
                self._slots.move_to_end(w)
            else:
                self._load(w, needed)
        return [0 if w.empty else self._slots[w] for w in weights]

    def batch(self, weights: list[AdapterWeights]) -> "BatchAdapters":
        """The adapters of a batch's rows (one `AdapterWeights` a row), ready for its forward."""
        numbers = self.slots_of(weights)
        modules = tuple(sorted({name for w in weights for name in w.linear_deltas}))
        return BatchAdapters(self, numbers, upload(torch.tensor(numbers), self.device), modules,
                             [w.prefix_length for w in weights])

    def discard(self, weights: AdapterWeights) -> None:
        """Free the adapter's slot (the host dropped it; a batch that still holds it copies it in again)."""
        slot = self._slots.pop(weights, None)
        if slot is not None:
            heapq.heappush(self._free, slot)

    # --- filling slots -----------------------------------------------------------------------------
    def _load(self, weights: AdapterWeights, needed: set[AdapterWeights]) -> None:
        layout = self._layout_with(weights)
        budget = None if self.max_bytes is None else self.max_bytes // layout.slot_bytes(self._element_size())
        while budget is not None and len(self._slots) + 2 > budget and self._evict(needed):
            pass  # + 2: the new adapter and the zeros
        capacity = self.capacity
        if not self._free:  # full: doubled, up to the budget (one more past it when a batch needs it)
            capacity = max(capacity + 1, 2 * capacity if budget is None else min(2 * capacity, budget))
            self._free = list(range(self.capacity, capacity))
        if layout != self._layout() or capacity != self.capacity:
            self._allocate(layout, capacity)
        slot = heapq.heappop(self._free)
        self._write(slot, weights)
        self._slots[weights] = slot
        self.stats["device_loads"] += 1

    def _evict(self, needed: set[AdapterWeights]) -> bool:
        """Free the least recently used slot not `needed`; False when every slot is."""
        victim = next((w for w in self._slots if w not in needed), None)
        if victim is None:
            return False
        self.discard(victim)
        self.stats["device_evictions"] += 1
        return True

    def _write(self, slot: int, weights: AdapterWeights) -> None:
        """Copy an adapter into `slot` (asynchronously from pinned host memory), zeros where it has nothing."""
        move = lambda t: t.to(self.device, self.dtype, non_blocking=True)  # noqa: E731
        for name, tensors in self.lora.items():
            pair = weights.linear_deltas.get(name)
            rank = 0 if pair is None else pair[0].shape[0]
            if pair is not None:
                tensors.a[slot, :rank].copy_(move(pair[0]))
                tensors.b[slot, :, :rank].copy_(move(pair[1]))
            tensors.a[slot, rank:].zero_()
            tensors.b[slot, :, rank:].zero_()
        length = weights.prefix_length
        for layer, slots in enumerate(self.prefix):
            for kind, tensor in enumerate(slots):
                if length:
                    tensor[slot, :, :length].copy_(move(weights.prefix[layer][kind]))
                tensor[slot, :, length:].zero_()
        self.prefix_lengths[slot] = length

    # --- the tensors' shapes -----------------------------------------------------------------------
    def _layout(self) -> Layout:
        lora = {name: (t.a.shape[2], t.b.shape[1], t.a.shape[1]) for name, t in self.lora.items()}
        prefix = None if not self.prefix else (len(self.prefix), *self.prefix[0][0].shape[1:])
        return Layout(lora, prefix)

    def _layout_with(self, weights: AdapterWeights) -> Layout:
        """The layout that also holds `weights`: new modules, higher ranks, a longer prefix."""
        layout = self._layout()
        for name, (a, b) in weights.linear_deltas.items():
            inputs, outputs, rank = layout.lora.get(name, (a.shape[1], b.shape[0], 0))
            layout.lora[name] = (inputs, outputs, max(rank, a.shape[0]))
        if weights.prefix:
            heads, length, width = weights.prefix[0][0].shape
            longest = max(length, layout.prefix[2] if layout.prefix else 0)
            layout.prefix = (len(weights.prefix), heads, longest, width)
        return layout

    def _allocate(self, layout: Layout, capacity: int) -> None:
        """New zeroed slot tensors of `layout` and `capacity`, what the old ones held copied in."""
        old = self._layout()
        zeros = lambda *shape: torch.zeros(shape, dtype=self.dtype, device=self.device)  # noqa: E731
        kept = min(capacity, self.capacity)
        for name, (inputs, outputs, rank) in layout.lora.items():
            tensors = LoraSlots(zeros(capacity, rank, inputs), zeros(capacity, outputs, rank))
            if name in self.lora:
                held = old.lora[name][2]
                tensors.a[:kept, :held].copy_(self.lora[name].a[:kept])
                tensors.b[:kept, :, :held].copy_(self.lora[name].b[:kept])
            self.lora[name] = tensors
        if layout.prefix is not None:
            layers, heads, length, width = layout.prefix
            prefix = [(zeros(capacity, heads, length, width), zeros(capacity, heads, length, width))
                      for _ in range(layers)]
            held = old.prefix[2] if old.prefix else 0
            for new, former in zip(prefix, self.prefix):
                for tensor, before in zip(new, former):
                    tensor[:kept, :, :held].copy_(before[:kept])
            self.prefix = prefix
        lengths = torch.zeros(capacity, dtype=torch.long, device=self.device)
        lengths[:kept] = self.prefix_lengths[:kept]
        self.prefix_lengths, self.capacity = lengths, capacity

    def _element_size(self) -> int:
        return self.dtype.itemsize


@dataclass
class BatchAdapters:
    """A batch's rows as its forward reads them from the slots: each row's slot (a host list, and on the
    device), the modules any row adapts, each row's prefix length."""

    slots: AdapterSlots
    numbers: list[int]
    rows: torch.Tensor
    modules: tuple[str, ...]
    prefix_lengths: list[int]

    @contextmanager
    def applied(self, backbone: Backbone):
        """While active, each adapted module adds x·Aᵀ·Bᵀ with every row's own A and B."""
        handles = [backbone.modules[name].register_forward_hook(self._add_delta(self.slots.lora[name]))
                   for name in self.modules]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _add_delta(self, tensors: LoraSlots):
        def hook(module, inputs, output):
            a, b = tensors.a.index_select(0, self.rows), tensors.b.index_select(0, self.rows)
            x = inputs[0].reshape(len(self.numbers), -1, a.shape[2])  # (rows, tokens, in), tokens may be 1
            delta = torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))
            return output + delta.reshape(output.shape)

        return hook

    def prefix(self) -> Prefix | None:
        """Each row's prefix, as long as the batch's longest (masked past the row's own); None without any."""
        longest = max(self.prefix_lengths, default=0)
        if not longest:
            return None
        key_values = [(k[:, :, :longest].index_select(0, self.rows), v[:, :, :longest].index_select(0, self.rows))
                      for k, v in self.slots.prefix]
        lengths = self.slots.prefix_lengths.index_select(0, self.rows)
        mask = (torch.arange(longest, device=lengths.device)[None, :] < lengths[:, None]).long()
        return Prefix(key_values, mask, lengths)

    def prefix_mask(self) -> torch.Tensor:
        """`prefix().mask` on the host, from the lengths the host knows."""
        longest = max(self.prefix_lengths, default=0)
        return (torch.arange(longest)[None, :] < torch.tensor(self.prefix_lengths)[:, None]).long()
