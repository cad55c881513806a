"""What a stored adapter contributes at inference, in the two forms the engine knows how to batch."""

from dataclasses import dataclass, field

import torch


@dataclass
class AdapterWeights:
    """`linear_deltas`: module path → (A (r, in), B·scale (out, r)), added to that Linear's output as
    x·Aᵀ·Bᵀ. `prefix`: per attention layer (K, V), each (kv_heads, P, head_dim), attended before the text."""

    linear_deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def prefix_length(self) -> int:
        return self.prefix[0][0].shape[1] if self.prefix else 0

    def to(self, device: torch.device, dtype: torch.dtype) -> "AdapterWeights":
        """The same weights on the backbone's device and in its dtype (the engine serves them there).
        An adapter has a hundred small tensors and a cold load pays per call: on the CPU a conversion
        per tensor costs least, onto an accelerator one transfer of them all in one piece."""
        tensors = [t for pair in self.linear_deltas.values() for t in pair] + [t for pair in self.prefix or () for t in pair]
        if all(t.device == device and t.dtype == dtype for t in tensors):
            return self
        if torch.device(device).type == "cpu":
            moved = iter([t.to(device, dtype) for t in tensors])
        else:
            flat = torch.cat([t.reshape(-1) for t in tensors]).to(device, dtype)
            moved = iter(piece.view(t.shape) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors))
        pairs = lambda count: [(next(moved), next(moved)) for _ in range(count)]  # noqa: E731
        deltas = dict(zip(self.linear_deltas, pairs(len(self.linear_deltas))))
        return AdapterWeights(deltas, pairs(len(self.prefix)) if self.prefix else None)

    def nbytes(self) -> int:
        tensors = [t for pair in self.linear_deltas.values() for t in pair]
        tensors += [t for pair in self.prefix or () for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors)
