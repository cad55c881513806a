"""Choosing tokens on the device and decoding text a token at a time: greedy is argmax, a seeded row draws
the same tokens whatever shares its batch, draws follow the distribution and its top-p cut; the text grows
by whole characters only and always equals the sequence decoded at once, with or without a Rust backend."""

import random

import torch
from transformers import AutoTokenizer

from adapterlab.backbones import resolve_path
from adapterlab.detokenizer import Detokenizer
from adapterlab.sampling import Sampling, choose

MULTIBYTE = "naïve café 日本語のテキスト 😀👍🏽 — “quoted”\n\tand ½ more"


def test_greedy_rows_take_the_argmax_and_a_seeded_row_draws_the_same_beside_any_rows():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    greedy, sampled = Sampling(), Sampling(temperature=0.8, top_p=0.95, seed=3)
    samplings = [greedy, sampled, Sampling(temperature=1.0), greedy, sampled]
    generators = [None, torch.Generator().manual_seed(3), None, None, torch.Generator().manual_seed(3)]
    chosen = choose(logits, samplings, generators)
    assert chosen[[0, 3]].tolist() == logits[[0, 3]].argmax(-1).tolist()
    alone = choose(logits[1:2], [sampled], [torch.Generator().manual_seed(3)])
    assert chosen[1] == alone[0] and choose(logits[4:5], [sampled], [torch.Generator().manual_seed(3)])[0] == chosen[4]


def test_draws_follow_the_temperature_scaled_distribution_and_its_top_p_cut():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    generator = torch.Generator().manual_seed(0)
    for top_p, kept in ((1.0, 4), (0.8, 2)):
        sampling = Sampling(temperature=1.0, top_p=top_p)
        counts = torch.bincount(torch.cat([choose(logits[:1], [sampling], [generator]) for _ in range(4000)]),
                                minlength=4).float()
        probabilities = logits[0].softmax(-1)
        probabilities[kept:] = 0
        expected = probabilities / probabilities.sum() * 4000
        assert counts[kept:].sum() == 0
        assert ((counts - expected).abs()[:kept] < 4 * expected[:kept].sqrt() + 5).all(), (counts, expected)


class PythonOnly:
    """A tokenizer without a Rust backend: only `decode`."""

    def __init__(self, tokenizer):
        self.decode = tokenizer.decode


def test_text_grows_by_whole_characters_and_equals_the_whole_decode():
    tokenizer = AutoTokenizer.from_pretrained(resolve_path("smollm2-135m"))
    random.seed(0)
    cases = [tokenizer(MULTIBYTE, add_special_tokens=False).input_ids, [tokenizer.eos_token_id, 28, 29]]
    cases += [[random.randrange(len(tokenizer)) for _ in range(30)] for _ in range(40)]
    for ids in cases:
        for detokenizer in (Detokenizer(tokenizer), Detokenizer(PythonOnly(tokenizer))):
            for count, token in enumerate(ids, 1):
                new = detokenizer.add(token)
                assert "\ufffd" not in new or "\ufffd" in tokenizer.decode(ids[:count], skip_special_tokens=True)
                assert tokenizer.decode(ids[:count], skip_special_tokens=True).startswith(detokenizer.text)
            assert detokenizer.finish() == tokenizer.decode(ids, skip_special_tokens=True)
    whole = Detokenizer(tokenizer)
    assert "".join(whole.add(token) for token in cases[0]) == MULTIBYTE
