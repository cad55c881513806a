"""Exports load elsewhere, without adapterlab, and answer as the engine does: peft folders in peft (the head
read as their model card says), vLLM folders checked against vLLM's own loading rules and generating the
engine's tokens under plain peft, sentence-transformers folders embedding as the head pools, merged folders
in both adapterlab and sentence-transformers. A real MiniLM export, copied elsewhere, names its base model
by hub id, and loads with the base model from a local folder. Exports are atomic and never replace."""

import json
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from torch.nn.functional import normalize
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import adapterlab.store as store_module
from adapterlab.backbones import load_backbone, resolve_path
from adapterlab.backbones.sentence_folders import SentenceSettings, read_sentence_settings
from adapterlab.cli import app
from adapterlab.engine import Engine, GenerationRequest
from adapterlab.export import export_adapter
from adapterlab.generation import Sampling
from adapterlab.loading import load_adapter
from adapterlab.merge import load_merged
from adapterlab.recipe import validate_recipe
from adapterlab.store import StoreError, read_card
from adapterlab.training import train
from conftest import tiny_recipe

TEXTS = ["the soup was cold", "loved every minute of it", "fine, I guess", "a dull and tiresome film"]
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def train_all(backbone: str, store, adapters: dict[str, dict]) -> None:
    for name, sections in adapters.items():
        raw = tiny_recipe(backbone, store, task="sent", output={"name": name},
                          training={"max_steps": 4, "batch_size": 8, "lr": 0.05}, **sections)
        train(validate_recipe(raw), show_progress=False)


@pytest.fixture(scope="module")
def bert_store(tiny_bert, tmp_path_factory):
    store = tmp_path_factory.mktemp("export-bert")
    train_all(tiny_bert, store, {
        "lora": {},  # mean pooling, a cosine classifier: unit vectors
        "cls": {"head": {"pooling": "cls", "cosine_scale": None, "normalize": False, "init": "random"}},
        "prefix": {"method": {"name": "prefix_tuning", "num_virtual_tokens": 4}}})
    return store


@pytest.fixture(scope="module")
def llama_store(tiny_llama, tmp_path_factory):
    store = tmp_path_factory.mktemp("export-llama")
    train_all(tiny_llama, store, {
        "lora": {},  # label words: no trained head
        "prefix": {"method": {"name": "prefix_tuning", "num_virtual_tokens": 4, "init": "random"}},
        "headed": {"head": {"type": "classifier"}}})
    return store


@pytest.fixture(scope="module")
def minilm_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("export-minilm")
    train_all("minilm", store, {"lora": {}})
    return store


def engine_scores(backbone: str, store, reference: str) -> torch.Tensor:
    served = Engine(backbone, store, dtype="float32").predict(reference, TEXTS)
    return torch.tensor([list(p.scores.values()) for p in served])


def head_scores(card, head_file, vectors: torch.Tensor) -> torch.Tensor:
    """Label probabilities from pooled vectors, computed as the model card's note says."""
    head, config = load_file(head_file), card.recipe["head"]
    if config["cosine_scale"] is not None:
        rows = normalize(head["linear.weight"], dim=-1)
        return (config["cosine_scale"] * normalize(vectors, dim=-1) @ rows.T + head["linear.bias"]).softmax(-1)
    vectors = normalize(vectors, dim=-1) if config["normalize"] else vectors
    return (vectors @ head["linear.weight"].T + head["linear.bias"]).softmax(-1)


@torch.no_grad()
def peft_scores(base: str, exported, card) -> torch.Tensor:
    """The exported adapter under plain peft on the base model's own folder, mean-pooled, through the head."""
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(base), str(exported)).eval()
    batch = AutoTokenizer.from_pretrained(base)(TEXTS, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (model(**batch).last_hidden_state * mask).sum(1) / mask.sum(1)
    return head_scores(card, exported / "head.safetensors", pooled)


def test_a_peft_export_loads_in_peft_and_answers_as_the_engine(bert_store, tiny_bert, tmp_path):
    out = export_adapter(bert_store, "sent/lora", tmp_path / "peft", "peft")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "card.json", "head.safetensors"]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_bert
    card = read_card(out)
    assert torch.allclose(peft_scores(tiny_bert, out, card), engine_scores(tiny_bert, bert_store, "sent/lora"),
                          atol=1e-5)
    assert "20 × cosine(pooled, each row of linear.weight) + linear.bias" in (out / "README.md").read_text()


def test_base_model_overrides_and_adapterlab_never_loads_by_it(bert_store, tiny_bert, tmp_path):
    result = CliRunner().invoke(app, ["export", "sent/lora", "--format", "peft", "--output", str(tmp_path / "p"),
                                      "--base-model", "nobody/no-such-model", "--store", str(bert_store), "--json"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "p"
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"exported": str(out), "format": "peft"}
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "nobody/no-such-model"
    assert ModelCard.load(out / "README.md").data.base_model == "nobody/no-such-model"
    # offline, a base model nobody can resolve: adapterlab loads the backbone its card names
    served = Engine(tiny_bert, bert_store, dtype="float32").predict(str(out), TEXTS)
    assert torch.allclose(torch.tensor([list(p.scores.values()) for p in served]),
                          engine_scores(tiny_bert, bert_store, "sent/lora"), atol=1e-6)


@pytest.mark.parametrize("name, settings", [("lora", SentenceSettings("mean", True, "")),
                                            ("cls", SentenceSettings("cls", False, ""))])
def test_a_sentence_transformers_export_embeds_as_the_head_pools(bert_store, tiny_bert, tmp_path, name, settings):
    out = export_adapter(bert_store, f"sent/{name}", tmp_path / "st", "sentence-transformers")
    assert read_sentence_settings(out) == settings
    embeddings = SentenceTransformer(str(out), device="cpu").encode(TEXTS, convert_to_tensor=True)
    model, card = load_adapter(bert_store / "sent" / name, load_backbone(tiny_bert))
    cosines = torch.nn.functional.cosine_similarity(embeddings, model.text_vectors(TEXTS), dim=-1)
    assert torch.allclose(cosines, torch.ones(len(TEXTS)), atol=1e-5)
    expected = engine_scores(tiny_bert, bert_store, f"sent/{name}")
    scores = head_scores(card, out / "head.safetensors", embeddings)
    assert torch.allclose(scores, expected, atol=1e-5) and scores.argmax(-1).tolist() == expected.argmax(-1).tolist()


def test_a_merged_export_is_read_by_adapterlab_and_sentence_transformers_alike(bert_store, tiny_bert, tmp_path):
    runner = CliRunner()
    for command in (["export", "sent/lora", "--format", "merged"], ["merge", "sent/lora"]):
        result = runner.invoke(app, [*command, "--output", str(tmp_path / command[0]), "--store", str(bert_store)])
        assert result.exit_code == 0, result.output
    exported, merged = tmp_path / "export", tmp_path / "merge"
    assert sorted(p.name for p in exported.iterdir()) == sorted(p.name for p in merged.iterdir())
    assert {"modules.json", "1_Pooling", "config_sentence_transformers.json"} <= {p.name for p in merged.iterdir()}
    expected = engine_scores(tiny_bert, bert_store, "sent/lora")
    assert torch.allclose(load_merged(exported).scores(TEXTS), expected, atol=1e-5)
    embeddings = SentenceTransformer(str(exported), device="cpu").encode(TEXTS, convert_to_tensor=True)
    assert torch.allclose(head_scores(read_card(exported), exported / "head.safetensors", embeddings), expected,
                          atol=1e-5)
    metadata = ModelCard.load(exported / "README.md").data
    assert metadata.library_name == "sentence-transformers" and metadata.base_model == tiny_bert


# What vLLM's loader asks of a LoRA folder, restated from its source (vLLM does not install here):
# vllm/lora/peft_helper.py (PEFTHelper.from_dict: required fields; _validate_features, validate_legal),
# vllm/lora/lora_model.py (from_local_checkpoint: check_unexpected_modules over the safetensors keys,
# parse_fine_tuned_lora_name), and LlamaForCausalLM's LoRA modules with its packed ones unpacked
# (qkv_proj: q_proj, k_proj, v_proj; gate_up_proj: gate_proj, up_proj).
VLLM_LLAMA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
VLLM_DEFAULT_MAX_LORA_RANK = 16


def assert_vllm_loads(folder) -> None:
    # nothing beside the pair: vLLM would take a tokenizer there for the adapter's own, and .bin/.pt for weights
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert {"r", "lora_alpha", "target_modules"} <= set(config)
    assert 0 < config["r"] <= VLLM_DEFAULT_MAX_LORA_RANK and not config.get("rank_pattern")
    assert config.get("bias", "none") == "none"
    assert not any(config.get(key) for key in ("modules_to_save", "use_dora", "lora_bias", "layer_replication"))
    init = config.get("init_lora_weights", True)
    assert not isinstance(init, str) or init.lower() in ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
    with safe_open(folder / "adapter_model.safetensors", framework="pt") as weights:
        keys = list(weights.keys())
        for key in keys:
            parts = key.split(".")
            assert parts[:2] == ["base_model", "model"] and parts[-2] in ("lora_A", "lora_B") and parts[-1] == "weight"
            assert parts[-3] in VLLM_LLAMA_MODULES, key
            rank_dim = 0 if parts[-2] == "lora_A" else 1
            assert weights.get_slice(key).get_shape()[rank_dim] == config["r"], key
    assert keys


def test_a_vllm_export_is_what_vllm_loads_and_generates_the_engines_tokens(llama_store, tiny_llama, tmp_path):
    out = export_adapter(llama_store, "sent/lora", tmp_path / "vllm", "vllm")
    assert_vllm_loads(out)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_llama

    engine = Engine(tiny_llama, llama_store, dtype="float32")
    sequence = engine.generate([GenerationRequest("sent/lora", "The film was", sampling=Sampling(6))])[0]
    base = engine.generate([GenerationRequest(None, "The film was", sampling=Sampling(6))])[0]
    assert sequence.token_ids != base.token_ids  # the adapter changes the text, so equality below means something
    ids = torch.tensor([sequence.prompt_ids])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(out))
    tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                            pad_token_id=engine.backbone.tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    end = engine.backbone.tokenizer.eos_token_id
    assert (tokens[:tokens.index(end)] if end in tokens else tokens) == sequence.token_ids


@pytest.mark.parametrize("which, reference, export_format, fragment", [
    ("bert", "sent/lora", "vllm", "vLLM serves LoRA adapters of decoder LLMs only"),
    ("llama", "sent/prefix", "vllm", "vLLM and LoRAX serve LoRA adapters only"),
    ("llama", "sent/headed", "vllm", "trained classifier head"),
    ("llama", "sent/lora", "sentence-transformers", "is a decoder LLM"),
    ("bert", "sent/prefix", "merged", "adds no weight updates and cannot be merged"),
    ("bert", "sent/lora", "onnx", "unknown export format 'onnx'"),
])
def test_exports_a_library_cannot_load_are_refused_in_one_line(request, tmp_path, which, reference, export_format,
                                                                fragment):
    store = request.getfixturevalue(f"{which}_store")
    result = CliRunner().invoke(app, ["export", reference, "--format", export_format, "--output",
                                      str(tmp_path / "out"), "--store", str(store)])
    assert result.exit_code == 2 and fragment in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_exports_are_atomic_and_never_replace(bert_store, tmp_path, monkeypatch):
    (tmp_path / "taken").mkdir()
    with pytest.raises(StoreError, match="exists; exports are written to a new folder"):
        export_adapter(bert_store, "sent/lora", tmp_path / "taken", "peft")

    def disk_full(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(store_module, "save_file", disk_full)
    with pytest.raises(OSError, match="no space left"):
        export_adapter(bert_store, "sent/lora", tmp_path / "half", "peft")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no half export, no staging folder


def test_real_minilm_exports_travel(minilm_store, tmp_path):
    """Copied elsewhere and rewritten in nothing, the exports name MiniLM by its hub id (no path of this
    machine's venv in their adapter or model card files) and load with the base model from a local folder."""
    venv_folder = str(resolve_path("minilm"))
    for export_format in ("peft", "sentence-transformers"):
        export_adapter(minilm_store, "sent/lora", tmp_path / "here" / export_format, export_format)
    moved = shutil.copytree(tmp_path / "here", tmp_path / "elsewhere")
    shutil.rmtree(tmp_path / "here")
    for file in ("peft/adapter_config.json", "peft/README.md", "sentence-transformers/README.md"):
        assert venv_folder not in (moved / file).read_text() and "site-packages" not in (moved / file).read_text()
    peft_folder, st_folder = moved / "peft", moved / "sentence-transformers"
    assert json.loads((peft_folder / "adapter_config.json").read_text())["base_model_name_or_path"] == MINILM_HUB_ID
    card = read_card(peft_folder)
    assert card.backbone == "minilm" and card.backbone_source == venv_folder

    metadata = ModelCard.load(peft_folder / "README.md").data
    assert metadata.base_model == MINILM_HUB_ID and metadata.library_name == "peft"
    assert {"adapterlab", "lora", "few-shot", "text-classification", f"base_model:adapter:{MINILM_HUB_ID}"} <= set(
        metadata.tags)
    assert {r.metric_type: r.metric_value for r in metadata.eval_results} == card.metrics

    expected = engine_scores("minilm", minilm_store, "sent/lora")
    assert torch.allclose(peft_scores(venv_folder, peft_folder, card), expected, atol=1e-4)
    embeddings = SentenceTransformer(str(st_folder), device="cpu").encode(TEXTS, convert_to_tensor=True)
    model, _ = load_adapter(minilm_store / "sent" / "lora", load_backbone("minilm"))
    cosines = torch.nn.functional.cosine_similarity(embeddings, model.text_vectors(TEXTS), dim=-1)
    assert torch.allclose(cosines, torch.ones(len(TEXTS)), atol=1e-4)
    scores = head_scores(card, st_folder / "head.safetensors", embeddings)
    assert scores.argmax(-1).tolist() == expected.argmax(-1).tolist()
