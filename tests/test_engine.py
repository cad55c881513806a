"""The engine on a tiny random BERT: adapters equal their peft form, mixed batches equal separate
runs (LoRA, prefix, zero-shot rows, 2/4/5-label heads together), eviction changes no answer."""

import pytest
import torch

from adapterlab.backbones import load_backbone
from adapterlab.engine import Engine, Request
from adapterlab.errors import AdapterlabError
from adapterlab.loading import load_adapter
from adapterlab.precision import resolve_device, resolve_dtype
from adapterlab.recipe import validate_recipe
from adapterlab.store import StoreError
from adapterlab.training import train
from conftest import assert_same_scores, tiny_recipe

TEXTS = ["the soup was cold", "what a match last night", "please cancel my order", "loved every minute",
         "markets slid on rate fears", "my card is gone"]
ADAPTERS = {  # task/name: (demo data, method)
    "sentiment/lora": ("demo:sentiment", {"name": "lora", "r": 4}),
    "topic/lora": ("demo:topic", {"name": "lora", "r": 8, "target_modules": ["query", "key", "value", "dense"]}),
    "intent/prefix": ("demo:intent", {"name": "prefix_tuning", "num_virtual_tokens": 5}),
    "topic/prefix": ("demo:topic", {"name": "prefix_tuning", "num_virtual_tokens": 3}),
}


@pytest.fixture(scope="module")
def store(tiny_bert, tmp_path_factory):
    store = tmp_path_factory.mktemp("engine-store")
    for reference, (data, method) in ADAPTERS.items():
        task, name = reference.split("/")
        raw = tiny_recipe(tiny_bert, store, task=task, method=method, data={"path": data},
                          training={"max_steps": 4, "lr": 0.05}, output={"name": name})
        train(validate_recipe(raw), show_progress=False)
    return store


def scores(predictions) -> torch.Tensor:
    return torch.tensor([list(p.scores.values()) for p in predictions])


@pytest.mark.parametrize("reference", ADAPTERS)
def test_engine_equals_the_peft_model(store, tiny_bert, reference, device):
    engine = Engine(tiny_bert, store, device=device, dtype="float32")
    model, card = load_adapter(store / reference, load_backbone(tiny_bert))
    assert torch.allclose(scores(engine.predict(reference, TEXTS)), model.scores(TEXTS), atol=1e-5)


@pytest.mark.parametrize("reference", ADAPTERS)
def test_loading_builds_the_peft_model_peft_reads_from_the_folder(store, tiny_bert, reference):
    """`loading` builds its peft model from the config and tensors the store read and checked: the model
    peft's own loader reads from the folder, weight for weight and state for state, in eval mode."""
    from peft import PeftModel, get_peft_model_state_dict

    model, _ = load_adapter(store / reference, load_backbone(tiny_bert))
    peft_read = PeftModel.from_pretrained(load_backbone(tiny_bert).model, str(store / reference))
    ours, theirs = get_peft_model_state_dict(model.peft_model), get_peft_model_state_dict(peft_read)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert model.peft_model.peft_config["default"].to_dict() == peft_read.peft_config["default"].to_dict()
    trainable = lambda peft_model: [name for name, p in peft_model.named_parameters() if p.requires_grad]  # noqa: E731
    assert not model.peft_model.training and trainable(model.peft_model) == trainable(peft_read)
    inputs = model.tokenize(TEXTS)
    assert torch.equal(model.peft_model(**inputs).last_hidden_state, peft_read(**inputs).last_hidden_state)


def test_mixed_batch_equals_separate_runs(store, tiny_bert, device):
    engine = Engine(tiny_bert, store, batch_size=64, device=device, dtype="float32")
    requests = [Request(list(ADAPTERS)[i % 4], text) for i, text in enumerate(TEXTS * 2)]
    requests += [Request(None, text, labels=("food", "sport", "money")) for text in TEXTS[:3]]
    mixed = engine.predict_batch(requests)
    alone = [engine.predict_batch([request])[0] for request in requests]
    for m, a, request in zip(mixed, alone, requests):
        assert m.label == a.label, request
        assert_same_scores(m.scores, a.scores)
    assert {len(m.scores) for m in mixed} == {2, 3, 4, 5}


def test_eviction_and_reload_give_identical_answers(store, tiny_bert):
    engine = Engine(tiny_bert, store, max_adapters=2, dtype="float32")
    first = {ref: engine.predict(ref, TEXTS) for ref in ADAPTERS}
    assert len(engine.resident()) == 2 and engine.stats["evictions"] == 2
    second = {ref: engine.predict(ref, TEXTS) for ref in reversed(list(ADAPTERS))}
    for ref in ADAPTERS:
        assert torch.equal(scores(first[ref]), scores(second[ref]))


def test_byte_budget_bounds_resident_adapters(store, tiny_bert):
    engine = Engine(tiny_bert, store, max_adapters=None, max_bytes=1, dtype="float32")
    for ref in ADAPTERS:
        engine.servable(ref)
    assert len(engine.resident()) == 1 and engine.stats["misses"] == 4


def test_refusals(store, tiny_bert):
    engine = Engine("minilm", store, dtype="float32")
    with pytest.raises(StoreError, match="not on the loaded backbone 'minilm'"):
        engine.predict("sentiment/lora", ["x"])
    with pytest.raises(StoreError, match="needs its labels"):
        Engine(tiny_bert, store, dtype="float32").predict_batch([Request(None, "x")])
    with pytest.raises(StoreError, match="no adapter 'nope/x'"):
        Engine(tiny_bert, store, dtype="float32").predict("nope/x", ["x"])


def test_rows_with_and_without_text_pairs_share_a_batch(store, tiny_bert, device):
    engine = Engine(tiny_bert, store, device=device, dtype="float32")
    requests = [Request("topic/lora", "a match", "tonight"), Request("topic/lora", "a match tonight"),
                Request("intent/prefix", "cancel it", "please"), Request("intent/prefix", "cancel it please")]
    mixed = engine.predict_batch(requests)
    for m, request in zip(mixed, requests):
        alone = engine.predict_batch([request])[0]
        assert_same_scores(m.scores, alone.scores)


def test_bfloat16_engine_keeps_every_tensor_in_its_dtype_and_the_float32_answers(store, tiny_bert, device):
    """The backbone, LoRA stacks and prefixes in bfloat16 (a matmul of mixed dtypes would raise), the
    tiny heads in float32: mixed batches run, and the answers stay near the float32 ones."""
    half = Engine(tiny_bert, store, device=device, dtype="bfloat16")
    assert half.backbone.dtype == torch.bfloat16 and half.backbone.device.type == device
    requests = [Request(reference, text) for reference in ADAPTERS for text in TEXTS]
    requests += [Request(None, text, labels=("food", "sport", "money")) for text in TEXTS]
    full = Engine(tiny_bert, store, device=device, dtype="float32").predict_batch(requests)
    answers = half.predict_batch(requests)
    servable = half.servable("topic/lora")
    assert {t.dtype for pair in servable.weights.linear_deltas.values() for t in pair} == {torch.bfloat16}
    assert {p.dtype for p in servable.head.parameters()} == {torch.float32}
    assert max(abs(a.scores[k] - b.scores[k]) for a, b in zip(answers, full) for k in a.scores) < 0.05
    assert sum(a.label == b.label for a, b in zip(answers, full)) >= 0.9 * len(requests)


def test_device_and_dtype_names_are_checked():
    with pytest.raises(AdapterlabError, match="unknown dtype 'half'"):
        resolve_dtype("half", torch.device("cpu"))
    with pytest.raises(AdapterlabError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(AdapterlabError, match="no CUDA GPU is available here"):
            resolve_device("cuda:0")
