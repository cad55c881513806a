"""Stored adapters under peft, for merging, combining, exporting and comparing with peft (serving goes
through the engine's own batching). A thin layer over `store.read_adapter`: the peft model is built from
the config and tensors the store read and checked, so nothing here opens an adapter's files."""

from pathlib import Path

from peft import PEFT_TYPE_TO_CONFIG_MAPPING, PeftConfig, PeftModel, get_peft_model, set_peft_model_state_dict

from adapterlab.backbones import Backbone
from adapterlab.generative import GenerativeModel
from adapterlab.model import AdapterModel
from adapterlab.store import AdapterCard, StoredAdapter, check_folder, read_adapter


def load_adapter(folder: str | Path, backbone: Backbone) -> tuple[AdapterModel | GenerativeModel, AdapterCard]:
    """An adapter folder on `backbone` under peft, in inference mode, with its head, after the store's
    checks."""
    check_folder(folder)
    stored = read_adapter(folder, backbone)
    peft_model = peft_model_of(stored, backbone)
    head_config, max_length = stored.recipe.head, stored.recipe.training.inference_max_length
    if stored.card.kind == "generate":
        return GenerativeModel(backbone, peft_model, head_config, max_length).eval(), stored.card
    model = AdapterModel(backbone, peft_model, stored.head, stored.card.labels, head_config, max_length,
                         label_descriptions=stored.card.label_descriptions)
    return model.eval(), stored.card


def peft_model_of(stored: StoredAdapter, backbone: Backbone, name: str = "default") -> PeftModel:
    """`stored` as adapter `name` of a peft model around the backbone's model, in inference mode."""
    peft_model = get_peft_model(backbone.model, _peft_config(stored), adapter_name=name)
    set_peft_model_state_dict(peft_model, stored.tensors, adapter_name=name)
    return peft_model.eval()


def add_stored(peft_model: PeftModel, stored: StoredAdapter, name: str) -> None:
    """`stored` as one more adapter, `name`, of `peft_model` (combining), in inference mode."""
    peft_model.add_adapter(name, _peft_config(stored))
    set_peft_model_state_dict(peft_model, stored.tensors, adapter_name=name)
    peft_model.eval()


def _peft_config(stored: StoredAdapter) -> PeftConfig:
    """The peft config of the adapter_config.json the store read, as `PeftConfig.from_pretrained` makes it."""
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[stored.adapter_config["peft_type"]]
    config = config_class.from_peft_type(**config_class.check_kwargs(**stored.adapter_config))
    config.inference_mode = True
    config.base_model_name_or_path = None  # the name is for loaders elsewhere; here the backbone is given
    return config
