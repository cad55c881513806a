"""Batched generation on a tiny random Llama with SmolLM2's tokenizer: rows of a LoRA adapter, a prefix
adapter and the bare backbone decode together, joining and leaving at different steps, and each row's
tokens equal peft's own greedy generation of that prompt under that adapter, alone."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from adapterlab.backbones import load_backbone, resolve_path
from adapterlab.engine import Engine, GenerationRequest
from adapterlab.errors import AdapterlabError
from adapterlab.generation import Decoder, Sampling
from adapterlab.loading import load_adapter
from adapterlab.recipe import validate_recipe
from adapterlab.store import StoreError, read_card
from adapterlab.training import train
from adapterlab.training.builders import setup
from conftest import shared, tiny_recipe

PROMPTS = ["The film was", "Tell me about the weather in Paris today, please", "Once upon a time",
           "a", "Why is the sky blue? Explain it briefly to a child who keeps asking"]


@pytest.fixture(scope="module")
def llm(tiny_llama, tmp_path_factory):
    """(backbone folder, store with a LoRA and a prefix adapter trained hard enough to change the text)."""
    folder = tiny_llama
    store = tmp_path_factory.mktemp("generation-store")
    for name, method in (("lora", {"name": "lora", "r": 4}), ("prefix", {"name": "prefix_tuning", "num_virtual_tokens": 4,
                                                                         "init": "random"})):
        train(validate_recipe(tiny_recipe(str(folder), store, method=method, output={"name": name},
                                          training={"max_steps": 4, "lr": 0.05})), show_progress=False)
    return str(folder), store


def peft_greedy(folder: str, store, adapter: str | None, prompt: str, max_tokens: int) -> list[int]:
    backbone = load_backbone(folder)
    model = backbone.model if adapter is None else PeftModel.from_pretrained(backbone.model, str(store / adapter))
    ids = backbone.tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                         do_sample=False, pad_token_id=backbone.tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    end = backbone.tokenizer.eos_token_id
    return out[:out.index(end)] if end in out else out


def test_mixed_rows_joining_at_different_steps_equal_peft_alone(llm):
    folder, store = llm
    adapters = [None, "sentiment/lora", "sentiment/prefix"]
    cases = [(adapters[i % 3], prompt, 4 + 3 * (i % 3)) for i, prompt in enumerate(PROMPTS * 2)]
    expected = [peft_greedy(folder, store, adapter, prompt, length) for adapter, prompt, length in cases]
    assert len({tuple(e) for e in expected[:3]}) == 3  # the adapters change the text, so equality means something

    engine = Engine(folder, store, dtype="float32")
    decoder = Decoder(engine.backbone)
    sequences = []
    for i, (adapter, prompt, length) in enumerate(cases):  # a new row joins at every step
        sequences.append(decoder.add(engine.sequence(GenerationRequest(adapter, prompt, sampling=Sampling(length)))))
        decoder.step()
    decoder.run()
    for sequence, tokens, case in zip(sequences, expected, cases):
        assert sequence.token_ids == tokens, case
        assert sequence.finish_reason == ("length" if len(tokens) == case[2] else "stop")
    together = engine.generate([GenerationRequest(a, p, sampling=Sampling(n)) for a, p, n in cases])
    assert [s.token_ids for s in together] == expected


def test_sampling_stop_strings_and_limits(llm):
    folder, store = llm
    engine = Engine(folder, store, dtype="float32")
    seeded = lambda seed: GenerationRequest("sentiment/lora", "Once upon a time",  # noqa: E731
                                            sampling=Sampling(12, temperature=1.0, top_p=0.9, seed=seed))
    first, again, other = engine.generate([seeded(1), seeded(1), seeded(2)])
    assert first.token_ids == again.token_ids != other.token_ids  # a seed decides, whatever shares the batch
    greedy = engine.generate([GenerationRequest(None, "Once upon a time", sampling=Sampling(12))])[0]
    stop = greedy.text[len(greedy.text) // 2:][:3]
    stopped = engine.generate([GenerationRequest(None, "Once upon a time", sampling=Sampling(12, stop=(stop,)))])[0]
    assert stopped.finish_reason == "stop" and stopped.text == greedy.text[:greedy.text.find(stop)]
    chat = engine.generate([GenerationRequest(None, messages=[{"role": "user", "content": "hi"}])])[0]
    assert chat.prompt_ids[-3:] == engine.backbone.tokenizer("<|im_start|>assistant\n").input_ids[-3:]
    with pytest.raises(AdapterlabError, match="exceed the model's context of 512 tokens"):
        engine.generate([GenerationRequest(None, "word " * 600)])


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4}, {"name": "prefix_tuning", "num_virtual_tokens": 4}])
def test_a_generative_adapter_trains_on_completions_and_the_engine_writes_what_peft_writes(llm, tmp_path, method):
    """head.type generate on E2E rows (meaning representation → sentence): the loss reads the completion
    only, the card says it generates, and the engine's completions of its template equal the trained
    model's own (peft's greedy generate), also beside base rows and a classification adapter's store."""
    folder, _ = llm
    recipe = validate_recipe(tiny_recipe(folder, tmp_path, method=method, task="e2e", head={
        "type": "generate", "template": "Describe: {text}", "max_new_tokens": 6},
        data={"path": shared("e2e"), "text_field": "mr", "target_field": "ref", "references_field": "refs",
              "k": 8, "test_limit": 4}, training={"max_steps": 3, "batch_size": 4, "lr": 0.05}))
    accelerator, task, model = setup(recipe)
    batch = model.batch(task.train, [0, 1], 64)
    completion = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert completion == model.backbone.tokenizer(task.train.targets[0], add_special_tokens=False).input_ids + [
        model.backbone.tokenizer.eos_token_id]  # the loss reads the completion and its end, nothing else
    result = train(recipe, show_progress=False)
    card = read_card(result.adapter_path)
    assert card.kind == "generate" and card.labels == [] and set(result.metrics) == {"bleu", "chrf", "rouge_l"}
    trained, _ = load_adapter(result.adapter_path, load_backbone(folder))
    expected = trained.generate(task.test.inputs)
    engine = Engine(folder, tmp_path, dtype="float32")
    requests = [GenerationRequest(str(result.adapter_path), text=text, sampling=Sampling(6)) for text in task.test.inputs]
    requests += [GenerationRequest(None, "Once upon a time", sampling=Sampling(6))]
    assert [s.text for s in engine.generate(requests)[:-1]] == expected
    assert engine.evaluate(str(result.adapter_path), shared("e2e"), limit=4) == {"rows": 4, **result.metrics}
    with pytest.raises(StoreError, match="writes text"):
        engine.predict(str(result.adapter_path), ["x"])


def test_a_decoder_lora_adapter_is_standard_peft_and_merges_into_a_model_transformers_generates_with(llm, tmp_path):
    """The files are what peft, vLLM (`--lora-modules`) and LoRAX read: adapter_config.json and
    adapter_model.safetensors with peft's module names, nothing else inside. Plain transformers + peft
    (no adapterlab) load them and write the engine's tokens; `adapterlab merge` writes a model folder
    that AutoModelForCausalLM generates the same tokens with."""
    import json
    import re

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from adapterlab.cli import app

    folder, _ = llm
    recipe = validate_recipe(tiny_recipe(folder, tmp_path, task="e2e", output={"name": "gen"}, head={
        "type": "generate", "template": "Describe: {text}", "max_new_tokens": 8},
        data={"path": shared("e2e"), "text_field": "mr", "target_field": "ref", "k": 8, "test_limit": 1},
        training={"max_steps": 4, "batch_size": 4, "lr": 0.05}))
    adapter = train(recipe, show_progress=False).adapter_path
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    keys = load_file(adapter / "adapter_model.safetensors").keys()
    assert keys and all(re.fullmatch(r"base_model\.model\.model\.layers\.\d+\.self_attn\.[qkvo]_proj\.lora_[AB]\.weight",
                                     key) for key in keys), sorted(keys)[:4]

    engine = Engine(folder, tmp_path, dtype="float32")
    request = GenerationRequest("e2e/gen", text="name[The Eagle], food[French]", sampling=Sampling(8))
    sequence = engine.generate([request])[0]
    base = engine.generate([GenerationRequest(None, prompt=engine.backbone.tokenizer.decode(sequence.prompt_ids),
                                              sampling=Sampling(8))])[0]
    assert sequence.token_ids != base.token_ids  # the adapter changes the text, so equality below means something
    ids = torch.tensor([sequence.prompt_ids])

    def greedy(model) -> list[int]:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=engine.backbone.tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        end = engine.backbone.tokenizer.eos_token_id
        return out[:out.index(end)] if end in out else out

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), str(adapter))
    assert greedy(plain) == sequence.token_ids
    merged = CliRunner().invoke(app, ["merge", "e2e/gen", "--output", str(tmp_path / "merged"), "--store", str(tmp_path)])
    assert merged.exit_code == 0, merged.output
    assert greedy(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")) == sequence.token_ids


def test_a_generation_recipe_on_a_tokenizer_without_an_end_token_is_refused(tmp_path):
    """Completions are trained to end with the end-of-sequence token: a tokenizer without one (here a
    BERT tokenizer on a random Llama) is named, not left to fail inside a tensor."""
    LlamaForCausalLM(LlamaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64)).save_pretrained(tmp_path / "llama")
    AutoTokenizer.from_pretrained(resolve_path("minilm")).save_pretrained(tmp_path / "llama")
    recipe = validate_recipe(tiny_recipe(str(tmp_path / "llama"), tmp_path, task="e2e", head={"type": "generate"},
                                         data={"path": shared("e2e"), "text_field": "mr", "target_field": "ref", "k": 4}))
    with pytest.raises(AdapterlabError, match="no end-of-sequence token"):
        train(recipe, show_progress=False)
