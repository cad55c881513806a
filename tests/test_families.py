"""Conformance of every declared backbone family (backbones/families.yaml), each as a tiny random model
built from its config and saved with a real tokenizer (MiniLM's WordPiece for encoders, SmolLM2's BPE
for decoders), no download. For each family: every method it takes trains, saves and serves from the
engine in mixed batches that equal the peft model row by row, with and without a prefix row beside;
the methods it cannot take are refused in one line naming family and method; where the encoder's
frozen lower layers are skipped (the stem), cached and uncached training agree; a LoRA adapter merged
into a standalone model gives the adapter's answers."""

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from adapterlab.backbones import FAMILIES, family_of, features, load_backbone, resolve_path
from adapterlab.backbones.packing import can_pack, pack
from adapterlab.engine import Engine, Request
from adapterlab.data import load_task
from adapterlab.errors import AdapterlabError
from adapterlab.loading import load_adapter
from adapterlab.merge import load_merged, merge_adapter
from adapterlab.model import AdapterModel, build_adapter_model
from adapterlab.recipe import Recipe, TrainingConfig, validate_recipe
from adapterlab.training import train
from adapterlab.training.loop import frozen_stem_states
from conftest import tiny_recipe

SIZE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=256)
ENCODERS = {
    "bert": {}, "roberta": {}, "xlm-roberta": {},
    "electra": {"embedding_size": 16},  # its embeddings are projected up to the hidden size
    "deberta-v2": {"conv_kernel_size": 3, "relative_attention": True, "pos_att_type": ["p2c", "c2p"],
                   "position_buckets": 32, "max_relative_positions": 64},
    "distilbert": {"hidden_dim": 64},
    "mpnet": {},
    "modernbert": {"global_attn_every_n_layers": 2, "local_attention": 16},
}
DECODERS = {"llama": {"num_key_value_heads": 1}, "qwen2": {"num_key_value_heads": 1},
            "mistral": {"num_key_value_heads": 1}, "phi3": {"num_key_value_heads": 2},
            "gemma": {"num_key_value_heads": 1, "head_dim": 8}, "gpt2": {}}
# Tokenizers of these families hand the model no segment ids (their forward takes none).
NO_SEGMENTS = {"roberta", "xlm-roberta", "distilbert", "mpnet", "modernbert"}
TEXTS = ["a gorgeous, moving film", "dull", "the plot never lands and the actors look bored throughout",
         "fine", "one of the best films of the year, I laughed and cried"]
TOPICS = ("sports", "politics", "music")


def test_every_declared_family_is_tested():
    assert set(FAMILIES) == set(ENCODERS) | set(DECODERS)


@pytest.fixture(scope="module", params=[*ENCODERS, *DECODERS])
def family_folder(request, tmp_path_factory) -> tuple[str, str]:
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    decoder = name in DECODERS
    tokenizer = AutoTokenizer.from_pretrained(resolve_path("smollm2-135m" if decoder else "minilm"))
    if name in NO_SEGMENTS:
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = AutoConfig.for_model(name, vocab_size=len(tokenizer), pad_token_id=pad, **SIZE,
                                  **(DECODERS | ENCODERS)[name])
    torch.manual_seed(0)
    (AutoModelForCausalLM if decoder else AutoModel).from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return name, str(folder)


def trained(folder: str, store, method: dict, name: str):
    """An adapter trained hard enough in a few steps that serving it wrong would show."""
    recipe = validate_recipe(tiny_recipe(folder, store, method=method, output={"store": str(store), "name": name},
                                         training={"max_steps": 4, "batch_size": 8, "lr": 5e-2},
                                         head={"template": "Text: {text}\nLabel:"}))  # short: a random prefix shows
    return train(recipe, show_progress=False).adapter_path


def supported(family: str) -> list[dict]:
    methods = [{"name": "lora", "r": 4}]
    if "prefix_tuning" not in family.refuses:  # a random start: its effect on a random model is large
        methods.append({"name": "prefix_tuning", "num_virtual_tokens": 3, "init": "random"})
    return methods


def test_family_trains_serves_mixed_batches_equal_to_peft_and_refuses_the_rest(family_folder, tmp_path, device):
    name, folder = family_folder
    family = family_of(AutoConfig.from_pretrained(folder))
    assert family.known and family.name == name
    adapters = {m["name"]: trained(folder, tmp_path, m, m["name"]) for m in supported(family)}

    expected = {}
    for method, path in adapters.items():
        model, card = load_adapter(path, load_backbone(folder))  # the peft model, as training built it
        expected[method] = model.scores(TEXTS)
        bare = load_backbone(folder)  # the same head on the bare backbone: the adapter must matter
        unadapted = AdapterModel(bare, bare.model, model.head, card.labels, Recipe.model_validate(card.recipe).head,
                                 model.max_length, label_descriptions=card.label_descriptions).scores(TEXTS)
        assert (expected[method] - unadapted).abs().max() > 1e-3, method

    engine = Engine(folder, tmp_path, device=device, dtype="float32")
    zero_shot = torch.tensor([list(p.scores.values()) for p in engine.predict_batch(
        [Request(None, text, labels=TOPICS) for text in TEXTS])])
    batches = [[m] for m in adapters] + ([list(adapters)] if len(adapters) > 1 else [])
    for together in batches:  # each adapter beside zero-shot rows; then LoRA and prefix rows together too
        requests = [Request(str(adapters[m]), text) for m in together for text in TEXTS]
        requests += [Request(None, text, labels=TOPICS) for text in TEXTS]
        answers = [list(p.scores.values()) for p in engine.predict_batch(requests)]
        for i, method in enumerate(together):
            served = torch.tensor(answers[i * len(TEXTS):(i + 1) * len(TEXTS)])
            assert torch.allclose(served, expected[method], atol=1e-4), (name, together, method)
        assert torch.allclose(torch.tensor(answers[-len(TEXTS):]), zero_shot, atol=1e-4), (name, together)

    merged = load_merged(merge_adapter(tmp_path, "sentiment/lora", tmp_path / "merged"))  # a standalone model
    assert torch.allclose(merged.scores(TEXTS), expected["lora"], atol=1e-4), name

    for method, reason in family.refuses.items():
        with pytest.raises(AdapterlabError, match=f"{method} cannot train on a {name} backbone: {reason}"):
            trained(folder, tmp_path, {"name": method}, "refused")


@pytest.mark.parametrize("family_folder", list(ENCODERS), indirect=True)
def test_stem_is_exact_where_it_is_on(family_folder, tmp_path):
    """LoRA on the top layer only: the lower layer's states are cached, and training from them gives
    the logits and gradients of the full pass; where slicing would not be exact, no stem."""
    name, folder = family_folder
    recipe = validate_recipe(tiny_recipe(folder, tmp_path, method={"name": "lora", "r": 4, "layers": [1]}))
    task = load_task(recipe.data)
    backbone = load_backbone(folder)
    model = build_adapter_model(recipe, backbone, task.label_names, task.label_descriptions)
    blocker = backbone.family.stem_blocker(backbone.model.config)
    assert (blocker is not None) == (name == "deberta-v2")  # its conv joins the first layer listed
    if blocker:
        assert model.stem_layers == 0
        return
    assert model.stem_layers == 1
    with torch.no_grad():  # make the adapter do something, so that equal outputs mean something
        for parameter_name, p in model.peft_model.named_parameters():
            if "lora_B" in parameter_name:
                p.normal_()
    stem = frozen_stem_states(model, task.train, TrainingConfig(eval_batch_size=3))
    batch = model.batch(task.train, [5, 0, 3, 7], 128, stem)  # rows of different lengths
    batch.pop("labels")
    model.eval()  # the stem runs without dropout: compare without dropout anywhere
    from_stem = model(**batch)
    batch.pop("stem_states")
    full = model(**batch)
    assert torch.allclose(from_stem, full, atol=1e-5)
    from_stem.sum().backward()
    stem_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    full.sum().backward()
    full_grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(stem_grads, full_grads))


def test_an_undeclared_family_trains_lora_and_refuses_prefix_in_one_line(tmp_path, caplog):
    """ALBERT has no entry: LoRA asks for its target modules (peft has no default either), then trains
    and serves as the peft model does; a prefix, whose positions adapterlab cannot number, is refused;
    the stem stays off, with the reason logged."""
    folder = tmp_path / "albert"
    tokenizer = AutoTokenizer.from_pretrained(resolve_path("minilm"))
    config = AutoConfig.for_model("albert", vocab_size=len(tokenizer), embedding_size=16, pad_token_id=0, **SIZE)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert not family_of(config).known
    with pytest.raises(AdapterlabError, match="lora on a albert backbone needs method.target_modules"):
        trained(str(folder), tmp_path, {"name": "lora"}, "refused")
    with caplog.at_level("INFO", logger="adapterlab"):
        path = trained(str(folder), tmp_path, {"name": "lora", "r": 4, "target_modules": ["query", "value"]}, "lora")
    assert "frozen lower layers run at every step" in caplog.text
    expected = load_adapter(path, load_backbone(str(folder)))[0].scores(TEXTS)
    served = Engine(load_backbone(str(folder)), tmp_path).predict(str(path), TEXTS)
    assert torch.allclose(torch.tensor([list(p.scores.values()) for p in served]), expected, atol=1e-4)
    with pytest.raises(AdapterlabError, match="prefix_tuning cannot train on a albert backbone: adapterlab does not "
                                              "know how albert numbers positions"):
        trained(str(folder), tmp_path, {"name": "prefix_tuning"}, "refused")


@pytest.mark.parametrize("family_folder", list(DECODERS), indirect=True)
def test_llm_prefix_starts_as_the_backbone_reading_the_tasks_words(family_folder, tmp_path):
    """init words: the prefix is the backbone's own keys and values for the prompt and label words, so
    at step 0 the adapted model reading a text equals the bare model reading those words, then the text."""
    name, folder = family_folder
    recipe = validate_recipe(tiny_recipe(folder, tmp_path, method={"name": "prefix_tuning", "num_virtual_tokens": 5},
                                         head={"template": "Is this review positive or negative? {text}"}))
    task = load_task(recipe.data)
    backbone = load_backbone(folder)
    model = build_adapter_model(recipe, backbone, task.label_names, task.label_descriptions)
    words = " ".join(["Is this review positive or negative? ", *task.label_descriptions])
    ids = backbone.tokenizer(words, add_special_tokens=False, return_tensors="pt").input_ids[0]
    prefix = ids.repeat(5 // len(ids) + 1)[:5]
    text = backbone.tokenizer("a fine film", add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        adapted = model.peft_model(input_ids=text, attention_mask=torch.ones_like(text)).logits[0, -1]
        read = backbone.model(input_ids=torch.cat([prefix[None], text], 1)).logits[0, -1]  # prefixes inject nothing
    assert torch.allclose(adapted, read, atol=1e-4), name


def test_no_stem_when_every_layer_or_the_prefix_trains(tiny_bert, tmp_path):
    task = load_task(validate_recipe(tiny_recipe(tiny_bert, tmp_path)).data)
    for method in ({"name": "lora", "r": 4}, {"name": "prefix_tuning", "num_virtual_tokens": 4}):
        recipe = validate_recipe(tiny_recipe(tiny_bert, tmp_path, method=method))
        model = build_adapter_model(recipe, load_backbone(tiny_bert), task.label_names, task.label_descriptions)
        assert model.stem_layers == 0, method


def test_packed_training_rows_equal_padded_ones(family_folder, tmp_path):
    """Where the family numbers positions per token (backbones/packing.py), training runs its rows end to
    end without padding: the same token states and gradients as the padded batch, pairs included."""
    _, folder = family_folder
    backbone = load_backbone(folder)
    if backbone.kind != "encoder" or not can_pack(backbone):
        assert backbone.kind != "encoder" or family_of(backbone.model.config).positions is None
        return
    recipe = validate_recipe(tiny_recipe(folder, tmp_path, method={"name": "lora", "r": 4}))
    model = build_adapter_model(recipe, backbone, ["a", "b"], ["a", "b"])
    with torch.no_grad():  # make the adapter do something, so that equal outputs mean something
        for parameter_name, p in model.peft_model.named_parameters():
            if "lora_B" in parameter_name:
                p.normal_()
    batch = model.tokenize(TEXTS, ["ok", "", "a longer second text of a pair", "x", "y"], 128)
    inputs, _ = pack(backbone, batch)
    assert inputs["input_ids"].shape[1] <= batch["input_ids"].shape[1]  # never longer than the longest row
    assert inputs["input_ids"].numel() < batch["input_ids"].numel()
    model.eval()  # dropout off: the two layouts draw different masks
    padded = features(backbone, model.peft_model, batch, need_hidden=True)
    packed = features(backbone, model.peft_model, batch, need_hidden=True, packed=True)
    real = batch["attention_mask"].bool()
    assert torch.allclose(packed.hidden[real], padded.hidden[real], atol=1e-5)
    assert not packed.hidden[~real].any()  # padding comes back as zeros, which pooling ignores
    grads = []
    for output in (padded, packed):
        (output.hidden[real] ** 2).sum().backward()
        grads.append([p.grad.clone() for p in model.peft_model.parameters() if p.requires_grad])
        model.zero_grad()
    assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(*grads))
