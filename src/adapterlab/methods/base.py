"""What a stored adapter contributes at inference, in the two forms the engine knows how to batch."""

from dataclasses import dataclass, field

import torch


@dataclass(eq=False)  # compared and hashed by identity: the device slots are keyed by the weights they hold
class AdapterWeights:
    """`linear_deltas`: module path → (A (r, in), B·scale (out, r)), added to that Linear's output as
    x·Aᵀ·Bᵀ. `prefix`: per attention layer (K, V), each (kv_heads, P, head_dim), attended before the text."""

    linear_deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def prefix_length(self) -> int:
        return self.prefix[0][0].shape[1] if self.prefix else 0

    @property
    def empty(self) -> bool:
        """No weights: the row reads the bare backbone (a zero-shot classifier, base generation)."""
        return not self.linear_deltas and not self.prefix

    def on_host(self, dtype: torch.dtype, pinned: bool = False) -> "AdapterWeights":
        """The same weights in host memory in `dtype`, where the engine keeps every resident adapter;
        `pinned` (for a CUDA backbone): in one page-locked block, so that packing them into the device's
        slots is an asynchronous copy. An adapter has a hundred small tensors and a cold load pays per
        call: unpinned, a conversion per tensor costs least; pinned, one block of them all."""
        tensors = self._tensors()
        if not pinned:
            if all(t.device.type == "cpu" and t.dtype == dtype for t in tensors):
                return self
            return self._rebuilt(iter([t.to("cpu", dtype) for t in tensors]))
        flat = torch.cat([t.reshape(-1).to("cpu", dtype) for t in tensors]).pin_memory()
        return self._rebuilt(piece.view(t.shape) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors))

    def _tensors(self) -> list[torch.Tensor]:
        return [t for pair in self.linear_deltas.values() for t in pair] + [t for pair in self.prefix or () for t in pair]

    def _rebuilt(self, tensors) -> "AdapterWeights":
        """These weights with their tensors replaced, in `_tensors` order."""
        pairs = lambda count: [(next(tensors), next(tensors)) for _ in range(count)]  # noqa: E731
        deltas = dict(zip(self.linear_deltas, pairs(len(self.linear_deltas))))
        return AdapterWeights(deltas, pairs(len(self.prefix)) if self.prefix else None)
