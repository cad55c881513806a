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
        """The same weights on the backbone's device and in its dtype (the engine serves them there)."""
        move = lambda pair: tuple(t.to(device, dtype) for t in pair)  # noqa: E731
        return AdapterWeights({name: move(pair) for name, pair in self.linear_deltas.items()},
                              [move(pair) for pair in self.prefix] if self.prefix else None)

    def nbytes(self) -> int:
        tensors = [t for pair in self.linear_deltas.values() for t in pair]
        tensors += [t for pair in self.prefix or () for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors)
