"""Prompts: how a task's texts are put to a backbone. An LLM reads a text filled into a template, as a
user turn of its chat template or as plain text, after any in-context demonstrations, and answers with
a label word or a completion; an encoder reads the text after its folder's prompt (e5's 'query: ').
One `PromptSettings` holds these for an adapter, a baseline or a zero-shot classifier, whoever runs it:
training's models, the engine, the prompting baselines.
"""

from dataclasses import dataclass

from adapterlab.errors import AdapterlabError

Demonstrations = tuple[tuple[str, str], ...]  # in-context (text, answer) pairs


@dataclass(frozen=True)
class PromptSettings:
    template: str
    chat: bool
    max_length: int
    demonstrations: Demonstrations = ()  # for LLMs
    text_prompt: str = ""  # encoders: before every text (a sentence-transformers model's prompt)


PLAIN_TEMPLATE = "Text: {text}\nLabel:"  # a template-less head without labels to list (generation, classifier)
# A label-word head's written prompt where the labels' descriptions only repeat their names: a trained prefix
# read the labels' list as a distraction (seed 0 of seven shared datasets: 2-10 points lower on six)
UNLISTED_TEMPLATE = "Classify this text.\n\nText: {text}"


def prompt_settings(head_config, backbone, max_length: int, demonstrations: Demonstrations = (),
                    label_names: list[str] = (), label_descriptions: list[str] = ()) -> PromptSettings:
    """The settings a head config (a recipe's `head:` section) gives on `backbone` for a task of
    `label_names` (described by `label_descriptions`)."""
    return PromptSettings(template_of(head_config, label_names, label_descriptions, backbone),
                          uses_chat(head_config, backbone), max_length, demonstrations,
                          text_prompt_of(head_config, backbone))


def template_of(head_config, label_names: list[str] = (), label_descriptions: list[str] = (), backbone=None) -> str:
    """head.template, or when the recipe gives none: for a label-word head, a prompt written from the labels
    (`labels_template`); otherwise `PLAIN_TEMPLATE`."""
    if head_config.template is not None:
        return head_config.template
    decoder = backbone is not None and backbone.kind == "decoder"
    if not label_names or not (head_config.type == "label_words" or (head_config.type == "auto" and decoder)):
        return PLAIN_TEMPLATE
    chat = decoder and uses_chat(head_config, backbone)
    tokenizer = backbone.tokenizer if decoder else None
    words = label_words(tokenizer, label_names, head_config.label_words or {}, chat)
    return labels_template(words, list(label_descriptions) or list(label_names), label_names)


def labels_template(words: list[str], descriptions: list[str], names: list[str]) -> str:
    """'Classify the text as one of: positive (a positive opinion), negative (...).' then the text, where a
    label's description says more than its name (a description that only repeats it is left out) or the
    labels are lettered (the letters need their key); else `UNLISTED_TEMPLATE`."""
    lettered = words == lettered_words(len(names))
    if not lettered and all(_repeats(description, name, word) for word, description, name in
                            zip(words, descriptions, names)):
        return UNLISTED_TEMPLATE
    listed = [f"{word} ({description.rstrip('.')})" if lettered or not _repeats(description, name, word) else word
              for word, description, name in zip(words, descriptions, names)]
    return f"Classify the text as one of: {_escape(', '.join(listed))}.\n\nText: {{text}}"


def _repeats(description: str, name: str, word: str) -> bool:
    """Whether a label's description says no more than its name or word."""
    return description.replace("_", " ").lower() in (name.replace("_", " ").lower(), word.lower())


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def uses_chat(config, backbone) -> bool:
    """Whether LLM prompts go through the chat template (config.chat, or: the tokenizer has one)."""
    if backbone.kind != "decoder":
        return False
    return config.chat if config.chat is not None else has_chat_template(backbone.tokenizer)


def text_prompt_of(config, backbone) -> str:
    """head.text_prompt, or for null the backbone folder's default prompt (e5's 'query: ')."""
    if backbone.kind != "encoder":
        return ""
    return config.text_prompt if config.text_prompt is not None else backbone.sentence.prompt


def chat_text(tokenizer, messages: list[dict]) -> str:
    """`messages` through the tokenizer's chat template, ending where the assistant's answer starts."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def demonstration_messages(shown: Demonstrations) -> list[dict]:
    """Filled-in (turn, answer) pairs as earlier turns of a chat."""
    return [message for turn, answer in shown
            for message in ({"role": "user", "content": turn}, {"role": "assistant", "content": answer})]


def demonstration_text(shown: Demonstrations) -> str:
    """Filled-in (turn, answer) pairs as earlier blocks of a plain prompt: each answer after its turn and
    a space, where a label word is scored (' word', `label_word_ids`), a blank line after each."""
    return "".join(f"{turn} {answer}\n\n" for turn, answer in shown)


def prompt_request(template: str, chat: bool, text: str, demonstrations: Demonstrations = ()) -> dict:
    """{"messages": a chat} or {"prompt": a plain text}: the filled template after the demonstrations;
    what a generation request carries (`engine.GenerationRequest(None, **prompt_request(...))` is the
    zero-shot or in-context prompting baseline of an adapter's task)."""
    shown = tuple((template.format(text=given, text_pair=""), answer) for given, answer in demonstrations)
    turn = template.format(text=text, text_pair="")
    if chat:
        return {"messages": demonstration_messages(shown) + [{"role": "user", "content": turn}]}
    return {"prompt": demonstration_text(shown) + turn}


def request_ids(tokenizer, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
    """The token ids of a plain prompt, read as is, or of a chat through the chat template."""
    if messages is not None:
        return tokenizer(chat_text(tokenizer, messages), add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids


def prompt_ids(tokenizer, template: str, chat: bool, text: str, demonstrations: Demonstrations = ()) -> list[int]:
    """An input's prompt as token ids: `prompt_request` tokenized."""
    return request_ids(tokenizer, **prompt_request(template, chat, text, demonstrations))


def prompt_format(tokenizer, template: str, chat: bool, demonstrations: Demonstrations) -> str:
    """A format string with {text} and {text_pair} left open, for texts tokenized in batches: the
    demonstrations first, as earlier chat turns or as filled-in examples."""
    shown = tuple((template.format(text=text, text_pair=""), answer) for text, answer in demonstrations)
    if not chat:
        return _escape(demonstration_text(shown)) + template
    marker = "\x00TEMPLATE\x00"  # the chat template wraps the template, placeholders intact
    wrapped = chat_text(tokenizer, demonstration_messages(shown) + [{"role": "user", "content": marker}])
    return _escape(wrapped).replace(marker, template)


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def label_word(name: str, chat: bool) -> str:
    """A label's default word: its name, '_' read as a space, capitalised when it opens a chat answer."""
    word = name.replace("_", " ")
    return word.capitalize() if chat else word


def lettered_words(count: int) -> list[str]:
    return list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:count])


def label_words(tokenizer, label_names: list[str], given: dict[str, str], chat: bool, written: bool = True) -> list[str]:
    """Each label's word: head.label_words (`given`), else its name (`label_word`). Where the prompt is
    `written` from the labels, no word is given and two names would start with the same token (SST-5's
    'very negative' and 'very positive'), the labels are lettered A, B, C, ... in order instead (up to
    26), and the prompt lists each letter with its label. `tokenizer` None: the names, unchecked."""
    unknown = set(given) - set(label_names)
    if unknown:
        raise AdapterlabError(f"head.label_words names unknown labels: {', '.join(sorted(unknown))}")
    words = [given.get(name, label_word(name, chat)).strip() for name in label_names]
    if given or not written or tokenizer is None or len(label_names) > 26 or not _clashes(tokenizer, words, chat):
        return words
    return lettered_words(len(label_names))


def label_word_ids(tokenizer, words: list[str], chat: bool) -> list[int]:
    """First token of each label's word (`label_words`): ' word' after a plain prompt, 'Word' opening a chat
    answer. Labels must start with different tokens."""
    clashes = _clashes(tokenizer, words, chat)
    if clashes:
        raise AdapterlabError(f"label words {sorted(clashes)} start with the same token; set head.label_words")
    return _first_tokens(tokenizer, words, chat)


def _first_tokens(tokenizer, words: list[str], chat: bool) -> list[int]:
    return [tokenizer(word if chat else " " + word, add_special_tokens=False)["input_ids"][0] for word in words]


def _clashes(tokenizer, words: list[str], chat: bool) -> set[str]:
    ids = _first_tokens(tokenizer, words, chat)
    return {word for word, first in zip(words, ids) if ids.count(first) > 1}
