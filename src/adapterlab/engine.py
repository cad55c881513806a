"""The engine: one backbone, many adapters. Every inference path (CLI predict and eval, the demo, the
HTTP server) goes through it, so what `eval` reports is what users get.

Adapters load on first use into a bounded LRU cache in host memory; a batch that needs one on the
device copies it into a slot there (`adapter_slots`: a second LRU, bounded by bytes), from which each
row reads its own. Loading never touches the backbone's modules, so it costs the same whether 1 or
1,000 adapters are resident, and a swap cannot disturb another adapter's answers. Heads (tiny) live
on the device with their adapter's host entry.
"""

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from adapterlab.adapter_slots import DEFAULT_MAX_BYTES, AdapterSlots
from adapterlab.backbones import Backbone, load_backbone
from adapterlab.data import DataError, load_pairs, load_task
from adapterlab.errors import AdapterlabError
from adapterlab.generation import Decoder, Sampling, Sequence
from adapterlab.heads import build_head
from adapterlab.methods import method_module
from adapterlab.methods.base import AdapterWeights
from adapterlab.metrics import classification_metrics, generation_metrics
from adapterlab.mixed_batch import Row, Servable, forward_mixed
from adapterlab.precision import COMPARISON_DTYPE, resolve_device, resolve_dtype
from adapterlab.prompt_start_cache import PromptStarts
from adapterlab.prompts import has_chat_template, prompt_ids, prompt_settings, request_ids
from adapterlab.recipe import DataConfig, Recipe
from adapterlab.store import (AdapterCard, StoredAdapter, StoreError, check_folder, read_adapter, read_card,
                              read_ensemble, resolve)
from adapterlab.zeroshot import zero_shot_servable


ZERO_SHOT_CACHE = 256  # zero-shot classifiers kept, one per label set
BASE = Servable("base", [], AdapterWeights(), None, None, 0)  # generation by the bare backbone


@dataclass
class Request:
    """One row to classify: with `adapter` (TASK/NAME or a folder), or zero-shot with `labels`."""

    adapter: str | None
    text: str
    text_pair: str | None = None
    labels: tuple[str, ...] | None = None


@dataclass
class GenerationRequest:
    """One text to generate: under `adapter` (TASK/NAME or a folder) or the bare backbone (None), after
    a plain `prompt` read as is, a chat of `messages` through the tokenizer's chat template, or a
    `text` filled into the generative adapter's own prompt template (as it was trained)."""

    adapter: str | None
    prompt: str | None = None
    messages: list[dict] | None = None
    sampling: Sampling = field(default_factory=Sampling)
    text: str | None = None


@dataclass
class Prediction:
    label: str
    score: float
    scores: dict[str, float]
    truncated: bool = False  # the input was cut to the adapter's token limit


class Engine:
    """Serves the adapters of one backbone from a store."""

    def __init__(self, backbone: Backbone | str, store: str | Path = "adapters", max_adapters: int | None = 1024,
                 max_bytes: int | None = None, batch_size: int = 64, device: str = "auto", dtype: str = "auto",
                 max_device_bytes: int | None = DEFAULT_MAX_BYTES):
        """`backbone`: a loaded one (served where it is), or a name loaded onto `device` in `dtype`
        (auto: the fastest the hardware computes natively; see `precision`). `max_adapters` and
        `max_bytes` bound the adapters resident in host memory, `max_device_bytes` the slots of those
        on the device (None: no bound)."""
        if isinstance(backbone, str):
            where = resolve_device(device)
            backbone = load_backbone(backbone, device=where, dtype=resolve_dtype(dtype, where))
        self.backbone = backbone
        self.store = Path(store)
        self.max_adapters, self.max_bytes, self.batch_size = max_adapters, max_bytes, batch_size
        self.slots = AdapterSlots(backbone.device, backbone.dtype, max_device_bytes)
        self.starts = PromptStarts()  # LLM prompts' shared starts, run once per adapter
        self._resident: OrderedDict[Path, Servable] = OrderedDict()
        self._zero_shot: OrderedDict[tuple[str, ...], Servable] = OrderedDict()  # label sets clients sent
        self._stats = {"hits": 0, "misses": 0, "evictions": 0}

    @property
    def stats(self) -> dict[str, int]:
        """Host cache hits, misses and evictions; loads into and evictions from the device's slots."""
        return {**self._stats, **self.slots.stats}

    @classmethod
    def for_adapter(cls, reference: str, store: str | Path = "adapters", **options) -> "Engine":
        """An engine on the backbone that adapter `reference` was trained on."""
        folder = resolve(store, reference)
        check_folder(folder)  # before the backbone loads: a broken adapter fails fast
        return cls(read_card(folder).backbone, store, **options)

    @classmethod
    def for_comparison(cls, backbone: Backbone | str, store: str | Path = "adapters", **options) -> "Engine":
        """An engine whose scores are set beside others' (baselines, parents, teachers): in the dtype
        `precision.COMPARISON_DTYPE` names, whatever the hardware computes fastest."""
        return cls(backbone, store, dtype=COMPARISON_DTYPE, **options)

    # --- the cache -------------------------------------------------------------------------------
    def servable(self, reference: str) -> Servable:
        """The adapter ready to serve, loaded on first use; the least recently used are evicted."""
        folder = resolve(self.store, reference)
        servable = self._resident.get(folder)
        if servable is not None:
            self._resident.move_to_end(folder)
            self._stats["hits"] += 1
            return servable
        self._stats["misses"] += 1
        servable = self._load(folder)
        self._resident[folder] = servable
        self._evict()
        return servable

    def card(self, reference: str) -> AdapterCard:
        return read_card(resolve(self.store, reference))

    def resident(self) -> list[str]:
        return [servable.key for servable in self._resident.values()]

    def resident_bytes(self) -> int:
        return sum(servable.nbytes for servable in self._resident.values())

    def device_resident(self) -> list[str]:
        """The resident adapters whose weights are in the device's slots now (an ensemble: all its members')."""
        return [servable.key for servable in self._resident.values()
                if all(s.weights in self.slots or s.weights.empty for s in servable.members or [servable])]

    def unload(self, reference: str) -> bool:
        try:
            folder = resolve(self.store, reference)
        except StoreError:  # deleted from the store already (by another process): dropped by its path
            folder = Path(reference) if Path(reference).is_absolute() else self.store / reference
        servable = self._resident.pop(folder, None)
        if servable is not None:
            self._leave_device(servable)
        return servable is not None

    def _load(self, folder: Path) -> Servable:
        card = read_card(folder)
        if card.members is not None:  # an ensemble: its members' rows join the same passes (mixed_batch)
            members = tuple(self._servable_of(stored) for stored in read_ensemble(folder, self.backbone))
            return Servable(f"{card.task}/{card.name}", card.labels, AdapterWeights(), None, members[0].prompt,
                            sum(member.nbytes for member in members), card.kind, members)
        return self._servable_of(read_adapter(folder, self.backbone))

    def _servable_of(self, stored: StoredAdapter) -> Servable:
        card, recipe = stored.card, stored.recipe
        weights = method_module(card.method).inference_weights(stored.tensors, stored.adapter_config)
        weights = weights.on_host(self.backbone.dtype, pinned=self.backbone.device.type == "cuda")
        prompt = prompt_settings(recipe.head, self.backbone, recipe.training.inference_max_length,
                                 label_names=card.labels, label_descriptions=card.label_descriptions)
        return Servable(f"{card.task}/{card.name}", card.labels, weights, stored.head, prompt, stored.nbytes, card.kind)

    def _evict(self) -> None:
        while self._resident and (
                (self.max_adapters is not None and len(self._resident) > self.max_adapters)
                or (self.max_bytes is not None and self.resident_bytes() > self.max_bytes and len(self._resident) > 1)):
            self._leave_device(self._resident.popitem(last=False)[1])
            self._stats["evictions"] += 1

    def _leave_device(self, servable: Servable) -> None:
        for member in servable.members or [servable]:
            self.slots.discard(member.weights)
            self.starts.discard(member.weights)

    def baseline(self, reference: str) -> Servable:
        """The classifier adapter `reference` started from, with no adapter weights: its head before
        training (its labels' descriptions for encoders, its prompt's label words for LLMs). What its
        training is measured against, on the same rows."""
        card = self.card(reference)
        recipe = Recipe.model_validate(card.recipe)
        head = build_head(recipe.head, self.backbone, card.labels, card.label_descriptions)
        prompt = prompt_settings(recipe.head, self.backbone, recipe.training.inference_max_length,
                                 label_names=card.labels, label_descriptions=card.label_descriptions)
        return Servable(f"{card.task}/{card.name}@start", card.labels, AdapterWeights(), head.eval(), prompt, 0)

    def zero_shot(self, labels: tuple[str, ...], descriptions: tuple[str, ...] | None = None) -> Servable:
        """A classifier with no adapter for labels given at inference time (see `zeroshot`)."""
        key = (*labels, "|", *(descriptions or labels))
        if key not in self._zero_shot:
            self._zero_shot[key] = zero_shot_servable(self.backbone, list(labels), list(descriptions or labels))
            if len(self._zero_shot) > ZERO_SHOT_CACHE:
                self._zero_shot.popitem(last=False)
        self._zero_shot.move_to_end(key)
        return self._zero_shot[key]

    # --- generating ------------------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest]) -> list[Sequence]:
        """Generated texts in request order; rows of any adapters (and base rows) decode together."""
        decoder = self.decoder()
        sequences = [decoder.add(self.sequence(request)) for request in requests]
        decoder.run()
        return sequences

    def decoder(self) -> Decoder:
        """A running batch for this engine's generations, its adapters in the engine's device slots."""
        return Decoder(self.backbone, self.slots)

    def sequence(self, request: GenerationRequest) -> Sequence:
        """A request as the decoder takes it: its servable (loaded and checked like any adapter) and its
        prompt's token ids, refused when prompt and max_tokens do not fit the model's context."""
        if self.backbone.kind != "decoder":
            raise AdapterlabError(f"generation needs an LLM backbone; {self.backbone.name!r} is an encoder")
        servable = self.servable(request.adapter) if request.adapter is not None else BASE
        if servable.members:
            raise AdapterlabError(f"adapter {servable.key} is an ensemble of classifiers: it does not generate")
        ids = self.prompt_ids(request, servable)
        limit = self.backbone.max_tokens
        if len(ids) + request.sampling.max_tokens > limit:
            raise AdapterlabError(f"the prompt's {len(ids)} tokens and max_tokens {request.sampling.max_tokens} "
                                  f"exceed the model's context of {limit} tokens")
        return Sequence(servable, ids, request.sampling)

    def prompt_ids(self, request: GenerationRequest, servable: Servable = BASE) -> list[int]:
        tokenizer = self.backbone.tokenizer
        if sum(given is not None for given in (request.prompt, request.messages, request.text)) != 1:
            raise AdapterlabError("a generation request has one of a prompt, messages or a text")
        if request.text is not None:
            if servable.kind != "generate":
                raise AdapterlabError("a text is filled into a generative adapter's template: name one, or send "
                                      "a prompt or messages")
            return prompt_ids(tokenizer, servable.prompt.template, servable.prompt.chat, request.text)
        if request.messages is not None and not has_chat_template(tokenizer):
            raise AdapterlabError(f"backbone {self.backbone.name!r} has no chat template: send a prompt")
        return request_ids(tokenizer, request.prompt, request.messages)

    # --- answering -------------------------------------------------------------------------------
    def predict(self, reference: str, texts: list[str], pairs: list[str] | None = None) -> list[Prediction]:
        return self.predict_batch([Request(reference, text, pairs[i] if pairs else None)
                                   for i, text in enumerate(texts)])

    def predict_batch(self, requests: list[Request]) -> list[Prediction]:
        """Answers in request order; rows of any adapters (and zero-shot rows) share each forward pass."""
        return self.answer([Row(self._servable_for(r), r.text, r.text_pair) for r in requests])

    def classify(self, servable: Servable, texts: list[str], pairs: list[str] | None = None) -> list[Prediction]:
        """Answers of one servable not kept in the cache (a zero-shot classifier with its own settings)."""
        return self.answer([Row(servable, text, pairs[i] if pairs else None) for i, text in enumerate(texts)])

    def answer(self, rows: list[Row]) -> list[Prediction]:
        # Similar lengths together: less padding. A row's answer does not depend on its batch.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].text) + len(rows[i].text_pair or ""))
        predictions: list[Prediction | None] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            answers, truncated = forward_mixed(self.backbone, self.slots, [rows[i] for i in chunk], self.starts)
            for i, probabilities, cut in zip(chunk, answers, truncated):
                predictions[i] = _prediction(rows[i].servable.labels, probabilities, cut)
        return predictions

    def _servable_for(self, request: Request) -> Servable:
        if request.adapter is not None:
            servable = self.servable(request.adapter)
            if servable.kind == "generate":
                raise StoreError(f"adapter {servable.key} writes text: ask it to generate (Engine.generate, "
                                 "/v1/completions), not to classify")
            return servable
        if not request.labels:
            raise StoreError("a row without an adapter needs its labels (zero-shot)")
        return self.zero_shot(tuple(request.labels))

    def evaluate(self, reference: str, data: str, split: str = "test", limit: int | None = None,
                 label_map: dict[str, str] | None = None) -> dict:
        """Metrics of an adapter on a dataset read with the adapter's own data settings: accuracy and
        macro-F1, or for a generative adapter its greedy completions scored against the references. With
        `label_map` (the adapter's label -> the dataset's), a classifier answers a task of other label names
        (`relabel`), whose names come from the dataset (its labels.json)."""
        card = self.card(reference)
        labels = None if label_map is not None else card.labels or None
        config = DataConfig.model_validate({**card.recipe["data"], "path": data, "test_path": None,
                                            "labels": labels, "k": None, "test_limit": None})
        task = load_pairs(config) if card.kind == "generate" else load_task(config)
        rows = {"train": task.train, "test": task.test}.get(split)
        if rows is None:
            raise DataError(f"{data}: no {split!r} split (splits: train, test)")
        if limit is not None:
            rows = rows.select(list(range(min(limit, len(rows)))))
        if card.kind == "generate":
            recipe = Recipe.model_validate(card.recipe)
            sampling = Sampling(recipe.head.max_new_tokens)
            outputs = self.generate([GenerationRequest(reference, text=text, sampling=sampling) for text in rows.inputs])
            return {"rows": len(rows), **generation_metrics([s.text for s in outputs], rows.references, rows.inputs,
                                                            tuple(recipe.training.metrics))}
        predictions = self.predict(reference, rows.texts, rows.text_pairs)
        if label_map is not None:
            check_label_map(card.labels, label_map, task.label_names)
            predictions = [relabel(prediction, label_map) for prediction in predictions]
        index = {label: i for i, label in enumerate(task.label_names)}
        return {"rows": len(rows), **classification_metrics([index[p.label] for p in predictions], rows.labels,
                                                            len(task.label_names))}


def read_requests(path: str | Path) -> list[Request]:
    """Rows of a JSONL file: {"adapter", "text"} with optional "text_pair" and (zero-shot) "labels"."""
    requests = []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                labels = row.get("labels")
                requests.append(Request(row.get("adapter"), row["text"], row.get("text_pair"),
                                        tuple(labels) if labels else None))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise DataError(f"{path}:{number}: expected a JSON object with \"text\" (and \"adapter\")") from None
    return requests


def check_label_map(labels: list[str], label_map: dict[str, str], task_labels: list[str] | None = None) -> None:
    """A map from an adapter's `labels` to a task's names: it names only the adapter's labels, and (given the
    task's labels) every adapter label lands on one of them, mapped or by its own name."""
    unknown = sorted(set(label_map) - set(labels))
    if unknown:
        raise AdapterlabError(f"the label map names {', '.join(map(repr, unknown))}, which the adapter does not "
                              f"have (its labels: {', '.join(labels)})")
    if task_labels is not None:
        lost = [label for label in labels if label_map.get(label, label) not in task_labels]
        if lost:
            raise AdapterlabError(f"the adapter's labels {', '.join(map(repr, lost))} map to none of the data's "
                                  f"labels ({', '.join(task_labels)}): map each to one of them")


def relabel(prediction: Prediction, label_map: dict[str, str]) -> Prediction:
    """`prediction` in another task's label names: each label's probability goes to the name `label_map`
    gives it (labels it does not name keep theirs; several labels may share a name, their probabilities
    adding up), and the answer is the most probable name."""
    scores: dict[str, float] = {}
    for label, score in prediction.scores.items():
        name = label_map.get(label, label)
        scores[name] = scores.get(name, 0.0) + score
    best = max(scores, key=scores.__getitem__)
    return Prediction(best, scores[best], scores, prediction.truncated)


def _prediction(labels: list[str], probabilities: list[float], truncated: bool) -> Prediction:
    best = max(range(len(labels)), key=probabilities.__getitem__)
    return Prediction(labels[best], probabilities[best], dict(zip(labels, probabilities)), truncated)

