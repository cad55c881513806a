"""Damaged adapters are refused before anything serves them, each in one line that names the adapter
and the problem: by `adapters verify` (given the backbone), by the engine and `adapterlab predict`
(exit 2), and by the server (422; the others keep being served)."""

import json
import re
import shutil

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from adapterlab.backbones import load_backbone
from adapterlab.cli import app
from adapterlab.engine import Engine
from adapterlab.recipe import validate_recipe
from adapterlab.server import Settings, create_app
from adapterlab.store import StoreError, verify
from adapterlab.training import train
from conftest import tiny_recipe
from test_server import running


def edit_tensors(file: str):
    def edit(folder, change):
        tensors = load_file(folder / file)
        change(tensors)
        save_file(tensors, folder / file)
    return edit


def edit_json(file: str):
    def edit(folder, change):
        data = json.loads((folder / file).read_text())
        change(data)
        (folder / file).write_text(json.dumps(data))
    return edit


heads, weights = edit_tensors("head.safetensors"), edit_tensors("adapter_model.safetensors")
config, card = edit_json("adapter_config.json"), edit_json("card.json")


def lora_key(tensors: dict, which: str = "A") -> str:
    return next(key for key in tensors if key.endswith(f".lora_{which}.weight"))


def only_unrelated(tensors: dict) -> None:
    tensors.clear()
    tensors["unrelated"] = torch.zeros(1)


def rename_module(tensors: dict) -> None:
    for key in [k for k in tensors if ".query." in k]:
        tensors[key.replace(".query.", ".nonexistent.")] = tensors.pop(key)


# name: (base adapter, edit of its files, fragment of the one-line problem)
DAMAGE = {
    "head-more-rows": ("lora", lambda f: heads(f, lambda t: t.update({"linear.weight": torch.zeros(3, 32),
                                                                       "linear.bias": torch.zeros(3)})),
                       "head.safetensors holds"),
    "head-fewer-rows": ("lora", lambda f: heads(f, lambda t: t.update({"linear.weight": torch.zeros(1, 32),
                                                                        "linear.bias": torch.zeros(1)})),
                        "2 labels on this backbone need"),
    "head-wrong-width": ("lora", lambda f: heads(f, lambda t: t.update({"linear.weight": torch.zeros(2, 16)})),
                         "head.safetensors holds"),
    "head-missing-bias": ("lora", lambda f: heads(f, lambda t: t.pop("linear.bias")), "head.safetensors holds"),
    "head-nan": ("lora", lambda f: heads(f, lambda t: t["linear.weight"].fill_(float("nan"))), "not finite"),
    "lora-nan": ("lora", lambda f: weights(f, lambda t: t[lora_key(t, "B")].fill_(float("nan"))), "not finite"),
    "lora-inf": ("lora", lambda f: weights(f, lambda t: t[lora_key(t)].fill_(float("inf"))), "not finite"),
    "lora-unknown-module": ("lora", lambda f: weights(f, rename_module), "names no linear layer of the backbone"),
    "lora-missing-b": ("lora", lambda f: weights(f, lambda t: t.pop(lora_key(t, "B"))), "has no lora_B"),
    "lora-no-tensors": ("lora", lambda f: weights(f, only_unrelated), "no LoRA tensors"),
    "lora-rank": ("lora", lambda f: config(f, lambda c: c.update({"r": 16})), "says r 16, its recipe 4"),
    "lora-alpha": ("lora", lambda f: config(f, lambda c: c.update({"lora_alpha": 64})), "says lora_alpha 64"),
    "lora-dora": ("lora", lambda f: config(f, lambda c: c.update({"use_dora": True})), "use_dora"),
    "card-recipe": ("lora", lambda f: card(f, lambda c: c["recipe"]["method"].update({"r": "eight"})),
                    "the recipe in its card.json does not validate (method.r"),
    "card-method": ("lora", lambda f: card(f, lambda c: c.update({"method": "ia3"})), "unknown method 'ia3'"),
    "card-descriptions": ("lora", lambda f: card(f, lambda c: c.update({"label_descriptions": ["x"]})),
                          "2 labels but 1 label descriptions"),
    "prefix-shape": ("prefix", lambda f: weights(f, lambda t: t.update({"prompt_embeddings": torch.zeros(3, 8)})),
                     "prompt_embeddings has shape (3, 8)"),
    "prefix-length": ("prefix", lambda f: config(f, lambda c: c.update({"num_virtual_tokens": 9})),
                      "says num_virtual_tokens 9, expected 3"),
}


@pytest.fixture(scope="module")
def store(tiny_bert, tmp_path_factory):
    """A good LoRA and prefix adapter, and each damaged copy under the name of its damage."""
    root = tmp_path_factory.mktemp("damaged")
    for name, method in (("lora", {"name": "lora", "r": 4}), ("prefix", {"name": "prefix_tuning", "num_virtual_tokens": 3})):
        train(validate_recipe(tiny_recipe(tiny_bert, root, method=method, output={"name": name})), show_progress=False)
    for name, (base, damage, _) in DAMAGE.items():
        folder = root / "sentiment" / name
        shutil.copytree(root / "sentiment" / base, folder)
        card(folder, lambda c: c.update({"name": name}))
        damage(folder)
    return root


def test_verify_engine_and_predict_name_each_problem(store, tiny_bert):
    backbone = load_backbone(tiny_bert)
    engine = Engine(backbone, store)
    for name, (_, _, fragment) in DAMAGE.items():
        folder = store / "sentiment" / name
        assert verify(folder) == [], (name, verify(folder))  # every file reads: only the fit is wrong
        assert any(fragment in problem for problem in verify(folder, backbone)), (name, verify(folder, backbone))
        with pytest.raises(StoreError, match=f"adapter sentiment/{name} cannot be served on .*{re.escape(fragment)}"):
            engine.predict(f"sentiment/{name}", ["fine"])
    for good in ("lora", "prefix"):
        assert verify(store / "sentiment" / good, backbone) == []
        assert engine.predict(f"sentiment/{good}", ["fine"])[0].label in ("negative", "positive")


@pytest.mark.parametrize("name", ["head-more-rows", "lora-unknown-module", "lora-nan", "card-recipe", "lora-rank"])
def test_cli_refuses_in_one_line(store, name):
    for command in (["predict", f"sentiment/{name}", "fine"], ["eval", f"sentiment/{name}", "--data", "demo:sentiment"]):
        result = CliRunner().invoke(app, [*command, "--store", str(store)])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and DAMAGE[name][2] in lines[0], (command, result.output)
    verified = CliRunner().invoke(app, ["adapters", "verify", f"sentiment/{name}", "--store", str(store), "--json"])
    report = json.loads(verified.stdout.strip().splitlines()[-1])
    assert verified.exit_code == 1 and DAMAGE[name][2] in " ".join(*report["adapters"].values())


def test_server_answers_422_and_keeps_serving_the_others(store, tiny_bert):
    with running(create_app(store, tiny_bert, Settings(dtype="float32"))) as (url, _), httpx.Client(base_url=url) as client:
        for name, (_, _, fragment) in DAMAGE.items():
            response = client.post("/v1/classify", json={"adapter": f"sentiment/{name}", "inputs": ["fine"]})
            assert response.status_code == 422 and fragment in response.json()["error"], (name, response.text)
            served = client.post("/v1/classify/batch", json={"rows": [{"adapter": "sentiment/lora", "text": "fine"},
                                                                     {"adapter": "sentiment/prefix", "text": "ok"}]})
            assert served.status_code == 200, served.text
