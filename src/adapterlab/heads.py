"""Task heads: what turns backbone features into one score per label.

Encoders get a classifier (a linear layer on pooled token states); LLMs can score each label's
word as the next token (no new weights), or use a classifier on their last token's state.
"""

import torch
from torch import nn

from adapterlab.backbones import Features, features, tokenize
from adapterlab.backbones.sentence_folders import POOLING
from adapterlab.errors import AdapterlabError
from adapterlab.prompts import label_word_ids, label_words, text_prompt_of, uses_chat


class ClassifierHead(nn.Module):
    """A linear layer on pooled states; with `cosine_scale`, on unit vectors (a cosine classifier,
    steadier with a few examples, and one whose rows can start as label-description embeddings)."""

    needs_hidden = True

    def __init__(self, hidden_size: int, num_labels: int, pooling: str, dropout: float,
                 cosine_scale: float | None, normalize: bool = False):
        super().__init__()
        self.pooling = pooling
        self.normalize = normalize  # a plain linear layer on unit vectors (a sentence-transformers model's)
        self.cosine_scale = cosine_scale
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, num_labels)

    def forward(self, features: Features, rows: torch.Tensor | None = None,
                label_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Scores against the classifier's rows, or (tied training) against `rows`, the vectors of
        the labels `label_ids`, in their place."""
        pooled = self.dropout(pool(features, self.pooling))
        # The linear layer computes in its weight's dtype: float32, or bfloat16 where DeepSpeed has cast
        # the whole model without autocast (autocast, under DDP, picks the dtype itself).
        dtype = self.linear.weight.dtype
        if self.cosine_scale is None:
            return self.linear((nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled).to(dtype))
        weight = nn.functional.normalize(self.linear.weight if rows is None else rows, dim=-1)
        bias = self.linear.bias if label_ids is None else self.linear.bias[label_ids]
        return self.cosine_scale * nn.functional.normalize(pooled, dim=-1).to(weight.dtype) @ weight.T + bias

    @torch.no_grad()
    def scores_of_unit_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """A cosine classifier's scores of pooled vectors already of unit length (`AdapterModel.text_vectors`),
        as `forward` gives them in eval mode: cross-validation scores one fold's rows under several heads."""
        weight = nn.functional.normalize(self.linear.weight, dim=-1)
        return self.cosine_scale * vectors.to(weight.dtype) @ weight.T + self.linear.bias

    @torch.no_grad()
    def init_from(self, label_embeddings: torch.Tensor) -> None:
        """Start from the labels' own embeddings, so that step 0 is the zero-shot classifier."""
        self.linear.weight.copy_(label_embeddings)
        self.linear.bias.zero_()


class LabelWordHead(nn.Module):
    """Each label's word as the LLM's next token after the prompt: its logit, no weights of its own."""

    needs_hidden = False

    def __init__(self, token_ids: list[int]):
        super().__init__()
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long))

    def forward(self, features: Features) -> torch.Tensor:
        return features.label_logits(self.token_ids).float()


class TextHead(nn.Module):
    """A generation task's head: none of its own (the LLM's head writes the text); it has no weights."""

    needs_hidden = False


def pool(features: Features, pooling: str) -> torch.Tensor:
    """One float32 vector per row (a mean summed in bfloat16 would lose the states' precision)."""
    hidden, mask = features.hidden.float(), features.attention_mask
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":  # LLM inputs are left-padded: the last position is real
        return hidden[:, -1]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


class HeadMismatch(AdapterlabError):
    """Stored head tensors that do not fit the head their labels and backbone need."""


def build_head(config, backbone, label_names: list[str], label_descriptions: list[str],
               state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The head a recipe's `head:` section asks for, sized for `label_names`, on the backbone's device;
    given `state` (a stored head's tensors), loaded with them once their shapes are checked (its rows
    then start from them, not from the descriptions). Heads stay in float32 whatever the backbone's
    dtype: they are tiny, and they read pooled vectors summed in float32, so a bfloat16 backbone rounds
    its states but not the answer's last step."""
    if state is not None:
        config = config.model_copy(update={"init": "random"})
    head = _new_head(config, backbone, label_names, label_descriptions)
    if state is not None:
        wanted = {key: tuple(value.shape) for key, value in head.state_dict().items()}
        found = {key: tuple(value.shape) for key, value in state.items()}
        if wanted != found:
            raise HeadMismatch(f"holds {found}, but {len(label_names)} labels on this backbone need {wanted}")
        head.load_state_dict(state)
    return head


def _new_head(config, backbone, label_names: list[str], label_descriptions: list[str]) -> nn.Module:
    kind = config.type if config.type != "auto" else ("classifier" if backbone.kind == "encoder" else "label_words")
    if kind == "generate":
        if backbone.kind != "decoder":
            raise AdapterlabError("head.type generate needs an LLM backbone")
        return TextHead()
    if kind == "label_words":
        if backbone.kind != "decoder":
            raise AdapterlabError("head.type label_words needs an LLM backbone; encoders use 'classifier'")
        chat = uses_chat(config, backbone)
        words = label_words(backbone.tokenizer, label_names, config.label_words or {}, chat, config.template is None)
        head = LabelWordHead(label_word_ids(backbone.tokenizer, words, chat))
        return head.to(backbone.device)
    pooling = pooling_of(config, backbone)
    normalize = config.normalize if config.normalize is not None else backbone.sentence.normalize
    head = ClassifierHead(backbone.hidden_size, len(label_names), pooling, config.dropout, config.cosine_scale,
                          normalize).to(backbone.device)
    if config.init == "label_descriptions":
        head.init_from(label_embeddings(backbone, label_descriptions, config.label_templates, pooling,
                                        text_prompt_of(config, backbone)))
    return head


def pooling_of(config, backbone) -> str:
    """head.pooling, or for auto what the backbone folder says (sentence-transformers), else mean for
    encoders and the last token for LLMs."""
    if config.pooling != "auto":
        return config.pooling
    if backbone.sentence.pooling is None:
        return "mean" if backbone.kind == "encoder" else "last"
    if backbone.sentence.pooling not in POOLING:
        raise AdapterlabError(f"backbone {backbone.name!r} pools by {backbone.sentence.pooling!r} (its "
                              f"sentence-transformers settings), which adapterlab does not compute; set head.pooling "
                              f"to one of {', '.join(sorted(set(POOLING.values())))}")
    return POOLING[backbone.sentence.pooling]


def label_embeddings(backbone, descriptions: list[str], templates: list[str], pooling: str = "mean",
                     text_prompt: str = "", model=None) -> torch.Tensor:
    """Each description through each template, embedded by the bare backbone (or by `model`, the backbone
    under an adapter), unit-normalised, averaged over the templates."""
    batch = tokenize_label_texts(backbone, descriptions, templates, text_prompt)
    with torch.no_grad():
        pooled = pool(features(backbone, model or backbone.model, batch, need_hidden=True), pooling)
    return nn.functional.normalize(pooled, dim=-1).view(len(templates), len(descriptions), -1).mean(0)


def tokenize_label_texts(backbone, descriptions: list[str], templates: list[str],
                         text_prompt: str = "") -> dict[str, torch.Tensor]:
    """Every template filled with every description, template by template: (templates × labels) rows.
    Names written as identifiers (card_arrival) are read as words."""
    texts = [t.format(label=d.replace("_", " ")) for t in templates for d in descriptions]
    return tokenize(backbone, texts, None, "{text}", max_length=128, chat=False, text_prompt=text_prompt)
