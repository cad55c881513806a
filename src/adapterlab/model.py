"""AdapterModel: the frozen backbone under one PEFT adapter, plus the task's head."""

import functools
import logging

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from adapterlab.backbones import Backbone, Features, Stem, features, stem_states, tokenize
from adapterlab.backbones.prompt_start import start_features, start_ids
from adapterlab.data import Split
from adapterlab.errors import AdapterlabError
from adapterlab.heads import ClassifierHead, build_head, pool, tokenize_label_texts
from adapterlab.methods import method_module
from adapterlab.prompts import prompt_settings, template_of, text_prompt_of

log = logging.getLogger("adapterlab")


class AdapterModel(nn.Module):
    """Label scores for texts: backbone + adapter → features → head.

    With `label_texts` (tokenized label descriptions, `head.tie_labels`), training scores texts against
    the labels' descriptions embedded through the adapted backbone, so that the adapter learns both
    sides, as a bi-encoder; `settle_label_vectors` then writes them into the head's rows."""

    def __init__(self, backbone: Backbone, peft_model: PeftModel, head: nn.Module, label_names: list[str],
                 head_config, max_length: int, label_texts: dict[str, torch.Tensor] | None = None,
                 label_descriptions: list[str] | None = None):
        super().__init__()
        self.backbone = backbone  # a plain attribute: its model is already inside peft_model
        self.peft_model = peft_model
        self.head = head
        self.label_names = label_names
        self.prompt = prompt_settings(head_config, backbone, max_length, label_names=label_names,
                                      label_descriptions=label_descriptions or label_names)
        # the settings' parts as training reads and records them
        self.template, self.chat, self.text_prompt = self.prompt.template, self.prompt.chat, self.prompt.text_prompt
        self.max_length = max_length
        self.tied = label_texts is not None
        self.labels_per_step = head_config.tie_labels_per_step
        if self.tied:  # buffers, so that they follow the model to its device; not part of any saved state
            self.register_buffer("label_input_ids", label_texts["input_ids"], persistent=False)
            self.register_buffer("label_attention_mask", label_texts["attention_mask"], persistent=False)

    def tokenize(self, texts: list[str], pairs: list[str] | None = None,
                 max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Inputs as the model reads them: `max_length` tokens (default: its inference length)."""
        prompt = self.prompt
        return tokenize(self.backbone, texts, pairs, prompt.template, max_length or prompt.max_length, prompt.chat,
                        text_prompt=prompt.text_prompt)

    def forward(self, input_ids, attention_mask, stem_states: torch.Tensor | None = None,
                label_ids: torch.Tensor | None = None, **extra) -> torch.Tensor:
        """Scores over all labels; with `label_ids` (tied training), over those labels, against their
        description vectors. Training packs its rows (`packs_rows`); tied, the descriptions then run in
        the same packed forward as the texts, filling the room their padding left."""
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, **extra}
        packed = self.training and self.packs_rows and stem_states is None
        if label_ids is not None and packed:
            descriptions = self._description_batch(label_ids)
            joined = features(self.backbone, self.peft_model, _joined(batch, descriptions, self.backbone), True,
                              packed=True)
            texts = len(input_ids)
            hidden = Features(joined.hidden[:texts], joined.attention_mask[:texts])
            described = Features(joined.hidden[texts:], joined.attention_mask[texts:])
            return self.head(hidden, self._description_vectors(described, len(label_ids)), label_ids)
        stem = Stem(self.stem_layers, stem_states) if stem_states is not None else None
        hidden = None
        if self.prompt_start and stem is None:
            hidden = start_features(self.backbone, self.peft_model, batch, self.prompt_start)
        if hidden is None:
            hidden = features(self.backbone, self.peft_model, batch, self.head.needs_hidden, stem=stem, packed=packed)
        if label_ids is None:
            return self.head(hidden)
        return self.head(hidden, self.label_vectors(label_ids), label_ids)

    def batch(self, rows: Split, indices: list[int], max_length: int,
              stem: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """A training batch of the chosen rows: their tokens and labels, and their `stem` states (each
        row's states after the frozen lower layers, computed once) when there are any."""
        chosen = rows.select(indices)
        batch = self.tokenize(chosen.texts, chosen.text_pairs, max_length)
        batch["labels"] = torch.tensor(chosen.labels)
        if stem is not None:  # encoders pad on the right: each row's states fill its first positions
            mask = batch["attention_mask"]
            states = torch.zeros(*mask.shape, stem[0].shape[-1], dtype=stem[0].dtype)
            for row, index in enumerate(indices):
                states[row, :len(stem[index])] = stem[index]
            batch["stem_states"] = states
        return batch

    def loss(self, prepared, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy over all labels, or for a tied model over the labels this step embeds;
        `prepared` is this model as Accelerate wraps it."""
        labels = batch.pop("labels")
        if not self.tied:
            return nn.functional.cross_entropy(prepared(**batch), labels)
        label_ids = _step_labels(labels, len(self.label_names), self.labels_per_step)
        return nn.functional.cross_entropy(prepared(**batch, label_ids=label_ids), torch.searchsorted(label_ids, labels))

    def label_vectors(self, label_ids: torch.Tensor) -> torch.Tensor:
        """The descriptions of `label_ids` through the adapted backbone: unit vectors averaged over the
        templates, as the head's rows were first computed on the bare backbone."""
        described = features(self.backbone, self.peft_model, self._description_batch(label_ids), need_hidden=True,
                             packed=self.training and self.packs_rows)
        return self._description_vectors(described, len(label_ids))

    def _description_batch(self, label_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tokenized descriptions of `label_ids`, template by template."""
        templates = self.label_input_ids.shape[0] // len(self.label_names)
        rows = (torch.arange(templates, device=label_ids.device)[:, None] * len(self.label_names) + label_ids).flatten()
        mask = self.label_attention_mask[rows]
        keep = mask.any(0)  # drop the columns that are padding in every chosen row
        return {"input_ids": self.label_input_ids[rows][:, keep], "attention_mask": mask[:, keep]}

    def _description_vectors(self, described: Features, labels: int) -> torch.Tensor:
        pooled = nn.functional.normalize(pool(described, self.head.pooling), dim=-1)
        return pooled.view(-1, labels, pooled.shape[-1]).mean(0)

    @torch.no_grad()
    def settle_label_vectors(self, examples: Split | None = None, prototype_weight: float = 0.0,
                             example_vectors: torch.Tensor | None = None) -> None:
        """After tied training: the labels' final vectors become the head's rows, so that the saved
        head is a plain classifier and serving never embeds a description. With `prototype_weight`,
        each row adds that much of its label's prototype, the mean vector of its `examples`: the
        descriptions say what a label means, the examples where its texts actually lie.
        `example_vectors`: the examples' `text_vectors`, when the caller has them already."""
        was_training = self.training
        self.eval()
        all_labels = torch.arange(len(self.label_names), device=self.label_input_ids.device)
        rows = nn.functional.normalize(self.label_vectors(all_labels), dim=-1)
        if prototype_weight and examples is not None:
            if example_vectors is None:
                example_vectors = self.text_vectors(examples.texts, examples.text_pairs)
            vectors = example_vectors.to(rows.device, rows.dtype)
            labels = torch.tensor(examples.labels, device=rows.device)
            for label in labels.unique():  # a label without examples keeps its description alone
                rows[label] += prototype_weight * nn.functional.normalize(vectors[labels == label].mean(0), dim=-1)
        self.head.linear.weight.copy_(rows)
        self.train(was_training)

    def release_backbone(self) -> Backbone:
        """Takes this adapter's layers out of the backbone and returns it as a fresh load gives it: bare,
        frozen, in eval mode (cross-validation builds each fold's adapter on one loaded backbone). This
        model is unusable afterwards. Prompt learning (prefix-tuning) never changed the backbone's modules."""
        if isinstance(self.peft_model.base_model, BaseTuner):  # LoRA: its layers wrap the backbone's own
            self.peft_model.base_model.unload()
        self.backbone.model.eval()
        return self.backbone

    @functools.cached_property
    def packs_rows(self) -> bool:
        """Whether training runs its rows packed, without padding (backbones/packing.py): not under
        prompt learning, whose prefix peft joins to a padded batch's mask."""
        return not self.peft_model.active_peft_config.is_prompt_learning

    @functools.cached_property
    def prompt_start(self) -> tuple[int, ...]:
        """The tokens every LLM prompt of this model starts with, run once per batch (`start_features`);
        none for encoders, for heads that read every position, or under prompt learning (whose peft
        forward adds its virtual tokens itself)."""
        if self.backbone.kind != "decoder" or self.head.needs_hidden or (
                isinstance(self.peft_model, PeftModel) and self.peft_model.active_peft_config.is_prompt_learning):
            return ()
        return start_ids(self.backbone.tokenizer, self.prompt)

    @functools.cached_property
    def stem_layers(self) -> int:
        """How many of an encoder's lower layers hold nothing trainable: training runs them once per row,
        without dropout, instead of at every epoch (0 when they cannot be skipped exactly). Computed once:
        which parameters train is settled when the model is built, and forward reads this at every step."""
        family = self.backbone.family
        blocker = family.stem_blocker(self.backbone.model.config)
        layers = family.layer_list(self.peft_model) if blocker is None else None
        if layers is None:
            if self.backbone.kind == "encoder":
                log.info("frozen lower layers run at every step: %s", blocker or
                         f"no layer list at {family.layers!r} in this {family.name} model")
            return 0
        trainable = {id(p) for p in self.peft_model.parameters() if p.requires_grad}
        in_layers = [i for i, layer in enumerate(layers) if any(id(p) in trainable for p in layer.parameters())]
        outside = trainable - {id(p) for layer in layers for p in layer.parameters()}
        if not in_layers or outside:  # e.g. prefix-tuning: its prefix reaches every layer
            return 0
        return min(in_layers)

    def stem_states(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Each row's states after the `stem_layers` frozen layers, without padding."""
        states = stem_states(self.backbone, self.peft_model, batch, self.stem_layers)
        return [row[mask.bool()] for row, mask in zip(states, batch["attention_mask"].to(states.device))]

    @torch.no_grad()
    def text_vectors(self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 64) -> torch.Tensor:
        """Unit vectors (N, hidden) of the texts as a classifier head sees them, in eval mode."""
        was_training = self.training
        self.eval()
        device = next(self.peft_model.parameters()).device
        vectors = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenize(texts[start:start + batch_size], pairs[start:start + batch_size] if pairs else None)
            hidden = features(self.backbone, self.peft_model, {k: v.to(device) for k, v in batch.items()}, need_hidden=True)
            vectors.append(nn.functional.normalize(pool(hidden, self.head.pooling).float(), dim=-1))
        self.train(was_training)
        return torch.cat(vectors)

    @torch.no_grad()
    def scores(self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 64) -> torch.Tensor:
        """Label probabilities (N, num_labels), in eval mode. Rows are batched by length (less
        padding); a row's scores do not depend on its batch."""
        was_training = self.training
        self.eval()
        device = next(self.peft_model.parameters()).device
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]) + (len(pairs[i]) if pairs else 0))
        result = torch.empty(len(texts), len(self.label_names))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = self.tokenize([texts[i] for i in rows], [pairs[i] for i in rows] if pairs else None)
            logits = self(**{k: v.to(device) for k, v in batch.items()})
            result[rows] = logits.float().softmax(-1).cpu()
        self.train(was_training)
        return result



def _joined(texts: dict[str, torch.Tensor], descriptions: dict[str, torch.Tensor],
            backbone: Backbone) -> dict[str, torch.Tensor]:
    """Two right-padded batches as one, padded to the wider; a key the descriptions lack (token types)
    is zeros for their rows."""
    width = max(texts["input_ids"].shape[1], descriptions["input_ids"].shape[1])
    pad_id = backbone.tokenizer.pad_token_id or 0

    def widened(batch: dict[str, torch.Tensor], key: str) -> torch.Tensor:
        value = batch.get(key)
        if value is None:
            value = torch.zeros_like(batch["input_ids"])
        return nn.functional.pad(value, (0, width - value.shape[1]), value=pad_id if key == "input_ids" else 0)

    return {key: torch.cat([widened(texts, key), widened(descriptions, key).to(texts[key].device)])
            for key in texts}


def _step_labels(labels: torch.Tensor, num_labels: int, limit: int) -> torch.Tensor:
    """Sorted label ids a tied step scores against: all of them, or beyond `limit` the batch's own
    labels plus others drawn at random up to `limit` (the draw follows the seeded dropout stream, so a
    resumed run draws the same)."""
    if num_labels <= limit:
        return torch.arange(num_labels, device=labels.device)
    present = labels.unique()
    absent = torch.ones(num_labels, dtype=torch.bool)
    absent[present.cpu()] = False
    others = absent.nonzero().squeeze(1)
    others = others[torch.randperm(len(others))[:max(limit - len(present), 0)]]
    return torch.cat([present, others.to(labels.device)]).sort().values


def build_adapter_model(recipe, backbone: Backbone, label_names: list[str],
                        label_descriptions: list[str]) -> AdapterModel:
    """A fresh, trainable adapter and head for `recipe` on `backbone`."""
    backbone.family.check_method(recipe.method.name)
    head = build_head(recipe.head, backbone, label_names, label_descriptions)  # reads the bare backbone
    label_texts = None
    if recipe.head.ties(len(label_names)):
        if not isinstance(head, ClassifierHead):
            raise AdapterlabError("head.tie_labels needs a classifier head; this backbone's head is label_words "
                                  "(set head.type: classifier)")
        head.linear.weight.requires_grad_(False)  # while training, its rows come from the descriptions
        label_texts = tokenize_label_texts(backbone, label_descriptions, recipe.head.label_templates,
                                           text_prompt_of(recipe.head, backbone))
    method = method_module(recipe.method.name)
    peft_model = get_peft_model(backbone.model, method.peft_config(recipe.method, backbone))
    template = template_of(recipe.head, label_names, label_descriptions, backbone)
    method.start(peft_model, recipe.method, backbone, template, label_descriptions)
    return AdapterModel(backbone, peft_model, head, label_names, recipe.head, recipe.training.inference_max_length,
                        label_texts, label_descriptions)


def parameter_counts(model: AdapterModel) -> tuple[int, int]:
    """(trainable, total) parameters: peft marks the adapter's own, the head is all trainable."""
    params = list(model.peft_model.parameters()) + list(model.head.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
