"""Training batches without padding: an encoder batch's rows laid end to end in a few sequences, each
row attending only to itself. A k-shot batch of short texts is about half padding (SST-2 k=16: 59 % of
its token positions), and every linear layer computes those positions; packed, it computes real tokens
only, while attention costs no more than padded (a sequence is never longer than the longest row)."""

from dataclasses import dataclass

import torch

from adapterlab.backbones.loading import Backbone

PACKABLE_POSITIONS = ("absolute", "padding_offset")  # families whose position ids can be given per token


@dataclass
class Packing:
    """Where each real token of a right-padded (B, T) batch (`mask`) lies in the packed (P, W) one:
    `pack` and `place`, each (N,), for the N real tokens in the order of `mask`."""

    mask: torch.Tensor
    pack: torch.Tensor
    place: torch.Tensor

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(P, W, H) states of the packed batch → (B, T, H) in the padded layout, zeros at padding."""
        hidden = packed.new_zeros(*self.mask.shape, packed.shape[-1])
        hidden[self.mask] = packed[self.pack, self.place]
        return hidden


def can_pack(backbone: Backbone) -> bool:
    return backbone.kind == "encoder" and backbone.family.positions in PACKABLE_POSITIONS


def pack(backbone: Backbone, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Packing]:
    """The model's inputs for `batch` packed: rows placed longest first into the first sequence with
    room (first fit, sequences as long as the longest row), each token at the position id it had in
    the padded batch, under a block-diagonal mask: a row attends to itself, padding to padding (so that
    no softmax row is empty). Math-equal to the padded forward, token by token."""
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(1).tolist()
    width = mask.shape[1]
    fill, starts, packs = [], [0] * len(lengths), [0] * len(lengths)
    for row in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        pack_index = next((p for p, used in enumerate(fill) if used + lengths[row] <= width), len(fill))
        if pack_index == len(fill):
            fill.append(0)
        packs[row], starts[row] = pack_index, fill[pack_index]
        fill[pack_index] += lengths[row]
    device = mask.device
    rows = mask.nonzero()[:, 0]
    pack_of = torch.tensor(packs, device=device)[rows]
    place = torch.tensor(starts, device=device)[rows] + (mask.long().cumsum(1) - 1)[mask]
    shape = (len(fill), max(fill))
    no_prefix = torch.zeros(len(lengths), dtype=torch.long, device=device)
    positions = backbone.family.position_ids(batch["input_ids"], mask.long(), no_prefix, backbone.model.config.pad_token_id)
    inputs = {"position_ids": positions}
    inputs.update({key: value for key, value in batch.items() if key != "attention_mask"})
    packed = {}
    for key, value in inputs.items():
        packed[key] = value.new_zeros(shape)
        packed[key][pack_of, place] = value[mask]
    segment = torch.full(shape, -1, device=device)  # padding: its own segment
    segment[pack_of, place] = rows
    packed["attention_mask"] = (segment[:, :, None] == segment[:, None, :])[:, None]
    return packed, Packing(mask, pack_of, place)
