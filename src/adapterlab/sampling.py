"""How each row of a decode step picks its next token, on the device: greedy rows by argmax, sampled rows
by temperature and top-p from their own seed's generator. Nothing waits for the device here; the
decoder copies the chosen ids to the host once a step."""

from dataclasses import dataclass

import torch

from adapterlab.adapter_slots import upload


@dataclass
class Sampling:
    """How a row picks its next token: greedy at temperature 0, else sampled (top-p) from its own seed."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


def choose(logits: torch.Tensor, samplings: list[Sampling], generators: list[torch.Generator | None]) -> torch.Tensor:
    """The next token of each row of `logits` (rows, vocabulary), on their device. A sampled row draws
    by the exponential race (argmax of p / E, E ~ Exp(1): a draw from p, as vLLM samples), its noise from
    its own generator when it has a seed, so that its tokens do not depend on the rows beside it."""
    chosen = logits.argmax(-1)
    drawn = [i for i, sampling in enumerate(samplings) if sampling.temperature > 0]
    if not drawn:
        return chosen
    device = logits.device
    rows = upload(torch.tensor(drawn), device)
    settings = upload(torch.tensor([[samplings[i].temperature, samplings[i].top_p if samplings[i].top_p < 1 else
                                     float("inf")] for i in drawn]), device)  # inf: no top-p cut at all
    probabilities = (logits.index_select(0, rows).float() / settings[:, :1]).softmax(-1)
    if any(samplings[i].top_p < 1 for i in drawn):
        probabilities = _top_p(probabilities, settings[:, 1:])
    noise = torch.empty_like(probabilities).exponential_()  # rows without a seed: the device's own generator
    for row, i in enumerate(drawn):
        if generators[i] is not None:
            noise[row].exponential_(generator=generators[i])
    picks = (probabilities / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(-1)
    return chosen.index_copy(0, rows, picks)


def _top_p(probabilities: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Each row's smallest set of most likely tokens whose probabilities reach its `top_p` (rows, 1);
    the others at zero."""
    ordered, order = probabilities.sort(-1, descending=True)
    ordered = ordered.masked_fill(ordered.cumsum(-1) - ordered > top_p, 0)
    return torch.zeros_like(probabilities).scatter_(-1, order, ordered)
