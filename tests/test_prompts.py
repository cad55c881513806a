"""Prompts: one format of in-context demonstrations and one application of the chat template, for the
texts a classifier scores in batches and the prompts a generation request carries alike."""

import pytest
from transformers import AutoTokenizer

from adapterlab.backbones import load_backbone
from adapterlab.backbones.forward import tokenize
from adapterlab.errors import AdapterlabError
from adapterlab.heads import build_head
from adapterlab.prompts import (chat_text, label_words, prompt_format, prompt_ids, prompt_request, request_ids,
                                template_of)
from adapterlab.recipe import HeadConfig
from adapterlab.zeroshot import zero_shot_servable

TEMPLATE = "Review: {text}\nLabel:"
SHOWN = (("tasty soup", "positive"), ("cold and late", "negative"))


def test_plain_demonstrations_read_alike_for_label_words_and_completions():
    """Without a chat template a demonstration is its filled template, a space and its answer (where a
    label word is scored: ' word'), then a blank line; the text to answer ends the prompt."""
    request = prompt_request(TEMPLATE, False, "fine", SHOWN)
    assert request == {"prompt": "Review: tasty soup\nLabel: positive\n\nReview: cold and late\nLabel: negative\n\n"
                                 "Review: fine\nLabel:"}
    assert prompt_format(None, TEMPLATE, False, SHOWN).format(text="fine", text_pair="") == request["prompt"]


def test_chat_demonstrations_are_earlier_turns_through_one_chat_template(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    messages = prompt_request(TEMPLATE, True, "fine", SHOWN)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[1] == {"role": "assistant", "content": "positive"}
    assert prompt_format(tokenizer, TEMPLATE, True, SHOWN).format(text="fine", text_pair="") == chat_text(tokenizer,
                                                                                                         messages)
    ids = prompt_ids(tokenizer, TEMPLATE, True, "fine", SHOWN)
    assert ids == list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False))
    assert request_ids(tokenizer, prompt="Review: fine") == tokenizer("Review: fine").input_ids


def test_an_llm_reads_both_texts_of_a_pair_whatever_the_template(tiny_llama):
    """A template with {text_pair} places the second text there; one without it (the prompt written from
    the labels, or a user's) shows it on the line after the first, never drops it; both fit max_length."""
    backbone = load_backbone(tiny_llama)
    decode = backbone.tokenizer.batch_decode
    premise, hypothesis = "A man is playing a guitar on stage.", "Someone makes music."
    slotted = tokenize(backbone, [premise], [hypothesis], "Premise: {text}\nHypothesis: {text_pair}", 96)
    assert f"Premise: {premise}\nHypothesis: {hypothesis}" in decode(slotted["input_ids"])[0]
    joined = tokenize(backbone, [premise, "Short."], [hypothesis, ""], "Text: {text}", 96)
    rows = decode(joined["input_ids"], skip_special_tokens=True)
    assert rows[0].endswith(f"Text: {premise}\n{hypothesis}") and rows[1].endswith("Text: Short.")
    long = " ".join(["word"] * 200)
    for template in ("Text: {text}", "Premise: {text}\nHypothesis: {text_pair}"):
        assert tokenize(backbone, [long], [long], template, 64)["input_ids"].shape[1] <= 64


SST5 = ["very negative", "negative", "neutral", "positive", "very positive"]


def test_labels_that_start_alike_are_lettered_in_a_written_prompt(tiny_llama):
    """SST-5's 'very negative' and 'very positive' open with one token: where the prompt is written from
    the labels they become A-E, each listed with its label, for a trained head and a zero-shot one alike;
    a user's template keeps its words and must name them apart (head.label_words)."""
    backbone = load_backbone(tiny_llama)
    tokenizer = backbone.tokenizer
    written = HeadConfig(type="label_words")
    assert template_of(written, SST5, SST5, backbone).startswith(
        "Classify the text as one of: A (very negative), B (negative), C (neutral), D (positive), E (very positive).")
    head = build_head(written, backbone, SST5, SST5)
    assert head.token_ids.tolist() == [tokenizer(letter, add_special_tokens=False).input_ids[0] for letter in "ABCDE"]
    assert len(set(head.token_ids.tolist())) == 5
    zero_shot = zero_shot_servable(backbone, SST5, SST5)
    assert "A (very negative), B (negative)" in zero_shot.prompt.template
    assert zero_shot.head.token_ids.tolist() == head.token_ids.tolist()
    # names that start apart keep their words
    assert template_of(written, ["negative", "positive"], ["negative, that is bad", "positive"], backbone).startswith(
        "Classify the text as one of: Negative (negative, that is bad), Positive.")
    with pytest.raises(AdapterlabError, match="start with the same token; set head.label_words"):
        build_head(HeadConfig(type="label_words", template="Review: {text}"), backbone, SST5, SST5)
    given = HeadConfig(type="label_words", label_words={"very negative": "awful", "very positive": "great"})
    assert label_words(tokenizer, SST5, given.label_words, chat=True) == [
        "awful", "Negative", "Neutral", "Positive", "great"]
