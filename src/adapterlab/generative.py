"""GenerativeModel: the frozen LLM under one PEFT adapter, trained to write a task's completions
(few-shot supervised fine-tuning, the loss on the completion's tokens only)."""

import torch
from peft import get_peft_model
from torch import nn

from adapterlab.backbones import Backbone, model_inputs
from adapterlab.data import Pairs
from adapterlab.errors import AdapterlabError
from adapterlab.heads import TextHead
from adapterlab.methods import method_module
from adapterlab.prompts import prompt_ids, prompt_settings, template_of

IGNORED = -100  # the label of tokens the loss does not read (cross_entropy's ignore_index)


class GenerativeModel(nn.Module):
    """Completions for inputs: each input filled into the recipe's template (a user turn of the chat
    template when the tokenizer has one), the completion after it, ended by the end-of-text token."""

    def __init__(self, backbone: Backbone, peft_model, head_config, max_length: int):
        super().__init__()
        self.backbone = backbone  # a plain attribute: its model is already inside peft_model
        self.peft_model = peft_model
        self.head = TextHead()  # no weights: the store still writes an (empty) head file
        self.prompt = prompt_settings(head_config, backbone, max_length)
        self.template, self.chat = self.prompt.template, self.prompt.chat  # as training reads and records them
        self.max_length, self.max_new_tokens = max_length, head_config.max_new_tokens

    def prompt_ids(self, text: str) -> list[int]:
        return prompt_ids(self.backbone.tokenizer, self.prompt.template, self.prompt.chat, text)

    def batch(self, rows: Pairs, indices: list[int], max_length: int, stem=None) -> dict[str, torch.Tensor]:
        """Prompt and completion ids of the chosen rows, right-padded; labels only on the completion
        (and its end token). Long rows lose the prompt's start first, then the completion's end."""
        tokenizer, end = self.backbone.tokenizer, self.backbone.tokenizer.eos_token_id
        rows_ids, rows_labels = [], []
        for i in indices:
            target = tokenizer(rows.targets[i], add_special_tokens=False).input_ids[:max_length - 1] + [end]
            prompt = self.prompt_ids(rows.inputs[i])[-(max_length - len(target)):] if len(target) < max_length else []
            rows_ids.append(prompt + target)
            rows_labels.append([IGNORED] * len(prompt) + target)
        width = max(map(len, rows_ids))
        pad = tokenizer.pad_token_id or 0
        return {"input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids in rows_ids]),
                "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in rows_ids]),
                "labels": torch.tensor([labels + [IGNORED] * (width - len(labels)) for labels in rows_labels])}

    def forward(self, input_ids, attention_mask, labels) -> torch.Tensor:
        """The mean cross-entropy of each completion token given everything before it."""
        inputs = model_inputs(self.backbone, {"input_ids": input_ids, "attention_mask": attention_mask})
        logits = self.peft_model(**inputs).logits[:, :-1]
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                           ignore_index=IGNORED)

    def loss(self, prepared, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return prepared(**batch)

    @torch.no_grad()
    def generate(self, inputs: list[str], batch_size: int = 16) -> list[str]:
        """Greedy completions of the inputs, `max_new_tokens` at most, in eval mode (peft's generate)."""
        was_training = self.training
        self.eval()
        tokenizer, texts = self.backbone.tokenizer, []
        for start in range(0, len(inputs), batch_size):
            prompts = [self.prompt_ids(text) for text in inputs[start:start + batch_size]]
            width = max(map(len, prompts))
            pad = tokenizer.pad_token_id or 0
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.backbone.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.backbone.device)
            out = self.peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                           do_sample=False, pad_token_id=pad)
            texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        self.train(was_training)
        return texts


def build_generative_model(recipe, backbone: Backbone) -> GenerativeModel:
    """A fresh, trainable adapter for a generation recipe on an LLM backbone."""
    backbone.family.check_method(recipe.method.name)
    if backbone.tokenizer.eos_token_id is None:  # completions are trained to end with it, and decoding stops at it
        raise AdapterlabError(f"{backbone.name!r}: its tokenizer has no end-of-sequence token (eos_token), which a "
                              "generation head trains completions to end with; use a chat or causal-LM tokenizer")
    method = method_module(recipe.method.name)
    peft_model = get_peft_model(backbone.model, method.peft_config(recipe.method, backbone))
    method.start(peft_model, recipe.method, backbone, template_of(recipe.head), [])
    return GenerativeModel(backbone, peft_model, recipe.head, recipe.training.inference_max_length)
