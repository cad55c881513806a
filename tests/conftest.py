"""Shared fixtures: a tiny random BERT and a tiny random chat Llama for fast unit tests, a store of adapters on
the Llama that several server suites serve, and the paths of the real data."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from adapterlab.backbones import resolve_path
from adapterlab.engine import Engine
from adapterlab.precision import cpu_capability
from adapterlab.recipe import validate_recipe
from adapterlab.training import train

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
E2E = {"text_field": "mr", "target_field": "ref", "references_field": "refs", "k": 8, "test_limit": 2}
SPARE = ["new/first", "new/second"]  # beside the chat store: registered (and deleted) by the server tests

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The Ray clusters the tests start bind to the loopback address, not the machine's network one (read by Ray
# when it is imported, and inherited by its processes): test traffic stays on this machine.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def pytest_sessionstart(session):
    """Which kind of CPU ran the tests: bf16 is fast on some (AVX512-BF16, AMX), ~30x slower on AVX2 alone.
    Written as a line of its own: `make test` runs pytest -q, which hides the report header."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")  # none under -p no:terminal
    if reporter is None:
        return
    cpu = cpu_capability()
    reporter.write_line(
        f"cpu: {cpu['cpu']} ({cpu['isa']}); avx512_bf16: {cpu['avx512_bf16']}, amx: {cpu['amx']}; "
        f"oneDNN bf16: {cpu['onednn_bf16']}; fast bf16: {cpu['fast_bf16']}")


def shared(name: str) -> str:
    """A dataset of ../shared/data (read-only; never copied into the project)."""
    path = SHARED_DATA / name
    assert path.is_dir(), f"real test data missing: {path} (clone the project beside shared/)"
    return str(path)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU here"))])
def device(request) -> str:
    """Where an inference test runs its engine: the CPU, and a CUDA GPU where there is one."""
    return request.param


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer, 32-wide random BERT with MiniLM's tokenizer, saved as a local HF folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_path("minilm")).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A 2-layer, 64-wide random Llama with SmolLM2's tokenizer (and its chat template), saved as a local
    HF folder."""
    folder = tmp_path_factory.mktemp("tiny-chat-llama")
    tokenizer = AutoTokenizer.from_pretrained(resolve_path("smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def chat_adapters(tiny_llama, tmp_path_factory) -> Path:
    """A folder of store/ (sentiment/lora and a copy with weights of its own, sentiment/other; the generative
    e2e/lora and e2e/prefix, template "Describe: {text}") and spare/ (SPARE), on the tiny chat Llama. Shared:
    a suite serves a copy of store/."""
    root = tmp_path_factory.mktemp("chat-adapters")
    train(validate_recipe(tiny_recipe(tiny_llama, root / "store", output={"name": "lora"},
                                      training={"max_steps": 3, "lr": 0.05})), show_progress=False)
    for name, method in (("lora", {"name": "lora", "r": 4}), ("prefix", {"name": "prefix_tuning", "num_virtual_tokens": 4})):
        train(validate_recipe(tiny_recipe(tiny_llama, root / "store", method=method, task="e2e", output={"name": name},
                                          head={"type": "generate", "template": "Describe: {text}"},
                                          data={**E2E, "path": shared("e2e")},
                                          training={"max_steps": 3, "batch_size": 4, "lr": 0.05})), show_progress=False)
    copy_adapter(root / "store/sentiment/lora", root / "store", "sentiment/other", 1)
    for seed, reference in enumerate(SPARE, start=2):
        copy_adapter(root / "store/sentiment/lora", root / "spare", reference, seed)
    return root


@pytest.fixture(scope="session")
def chat_engine(tiny_llama, chat_adapters) -> Engine:
    """What a server of the chat store must answer: a local engine on the same adapters (spare ones included)."""
    store = chat_adapters / "all"
    shutil.copytree(chat_adapters / "store", store)
    shutil.copytree(chat_adapters / "spare", store, dirs_exist_ok=True)
    return Engine(tiny_llama, store, dtype="float32")


def copy_adapter(source: Path, store: Path, reference: str, seed: int) -> Path:
    """A copy of an adapter as TASK/NAME with random weights of the same shapes (answers of its own),
    written under a hidden name and renamed into place, as anything put in a live store must be."""
    task, name = reference.split("/")
    staging = store / task / f".{name}.copying"
    shutil.copytree(source, staging)
    card = json.loads((staging / "card.json").read_text())
    (staging / "card.json").write_text(json.dumps({**card, "task": task, "name": name}))
    generator = torch.Generator().manual_seed(seed)
    for file in ("adapter_model.safetensors", "head.safetensors"):
        tensors = load_file(staging / file)
        save_file({k: v + 0.5 * torch.randn(v.shape, generator=generator) for k, v in tensors.items()}, staging / file)
    return staging.rename(store / task / name)


def paired_counts(engine, reference: str, rows) -> tuple[int, int, float]:
    """(rows only the adapter gets right, rows only the zero-shot classifier it started from gets right:
    `Engine.baseline`, the adapter's accuracy), on the same rows."""
    labels = engine.card(reference).labels
    truth = [labels[i] for i in rows.labels]
    adapter = [p.label for p in engine.predict(reference, rows.texts, rows.text_pairs)]
    start = [p.label for p in engine.classify(engine.baseline(reference), rows.texts, rows.text_pairs)]
    return (sum(a == t != s for a, s, t in zip(adapter, start, truth)),
            sum(s == t != a for a, s, t in zip(adapter, start, truth)),
            sum(a == t for a, t in zip(adapter, truth)) / len(truth))


def assert_beats_its_start(engine, reference: str, rows) -> float:
    """A paired sign test (McNemar) against the zero-shot classifier the adapter started from: the rows
    only one of them gets right must favour the adapter by two standard deviations of their count, so
    the margin grows with the rows that tell them apart. Returns the adapter's accuracy on the rows."""
    wins, losses, accuracy = paired_counts(engine, reference, rows)
    assert wins - losses >= max(1.0, 2 * math.sqrt(wins + losses)), (reference, wins, losses)
    return accuracy


# Scores of one row computed inside batches of other shapes: float32 kernels block differently per shape, and
# 2e-5 has been seen between a served batch and the same row alone; a wrong adapter differs by far more.
BATCH_TOLERANCE = 1e-4


def assert_same_scores(got: dict, expected: dict) -> None:
    """Two {label: score} answers for one row agree: same labels, scores within `BATCH_TOLERANCE`."""
    assert got.keys() == expected.keys() and max(abs(got[k] - expected[k]) for k in got) < BATCH_TOLERANCE


def assert_answer(answer: dict, expected) -> None:
    """A served JSON prediction equals the engine's `Prediction` for the same row."""
    assert answer["label"] == expected.label
    assert_same_scores({item["label"]: item["score"] for item in answer["scores"]}, expected.scores)


def tiny_recipe(backbone: str, store, **sections) -> dict:
    """A raw recipe on the demo sentiment data, small enough to train in a second."""
    raw = {"task": "sentiment", "backbone": backbone, "method": {"name": "lora", "r": 4},
           "data": {"path": "demo:sentiment", "k": 4}, "training": {"max_steps": 3, "batch_size": 8},
           "output": {"store": str(store)}}
    for section, values in sections.items():  # merged into a section; a new method or a scalar replaces
        merge = isinstance(values, dict) and section != "method"
        raw[section] = {**raw.get(section, {}), **values} if merge else values
    return raw
