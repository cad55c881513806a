"""PEFT methods, one module each, all of the same shape.

A method module defines `Config` (its recipe section, a pydantic model whose `name` field is the
registry key), `DEFAULT_LR`, `UNTRAINED_IS_BACKBONE` (whether an untrained adapter leaves the
backbone's outputs unchanged), `peft_config(config, backbone) -> peft.PeftConfig` for training,
`start(peft_model, config, backbone, template, label_descriptions)` (where its weights begin),
`fit_problems(state, adapter_config, method_config, backbone) -> list[str]` (why saved files do not fit
each other, their recipe or the backbone; the store asks before anything serves them), and
`inference_weights(state, adapter_config) -> AdapterWeights` for the engine. Adding a method
means adding one module here and listing it in `_MODULES`; nothing else branches on the method name.
"""

from typing import Annotated, Union

from pydantic import Field

from adapterlab.errors import AdapterlabError
from adapterlab.methods import lora, prefix_tuning

_MODULES = (lora, prefix_tuning)

METHODS = {module.Config.model_fields["name"].default: module for module in _MODULES}

MethodConfig = Annotated[Union[tuple(module.Config for module in _MODULES)], Field(discriminator="name")]


def method_module(name: str):
    """The module implementing method `name`."""
    try:
        return METHODS[name]
    except KeyError:
        raise AdapterlabError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None
