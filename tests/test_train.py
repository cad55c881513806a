"""Training choices that need no model: where each process puts a (quantized) backbone, and which launches
are refused."""

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from adapterlab.errors import AdapterlabError
from adapterlab.recipe import QuantizationConfig, TrainingConfig
from adapterlab.training.builders import backbone_device_map, new_accelerator, refuse_unsupported_launch


def process(device: str, local_index: int, distributed_type=DistributedType.MULTI_GPU) -> SimpleNamespace:
    return SimpleNamespace(device=torch.device(device), local_process_index=local_index,
                           distributed_type=distributed_type)


def test_quantized_backbone_loads_whole_on_each_process_gpu():
    # Under DDP each process trains a whole copy on its own GPU; "auto" would spread one copy over all
    # of them, which Accelerate refuses to train.
    eight_bit = QuantizationConfig(mode="8bit")
    assert backbone_device_map(eight_bit, process("cuda:3", 3)) == {"": 3}
    assert backbone_device_map(QuantizationConfig(mode="4bit"), process("cuda:0", 0)) == {"": 0}
    assert backbone_device_map(eight_bit, process("cpu", 1)) == {"": "cpu"}  # CPU processes (MPI)


def test_deepspeed_with_a_quantized_backbone_is_refused():
    deepspeed = process("cuda:0", 0, DistributedType.DEEPSPEED)
    with pytest.raises(AdapterlabError, match="DeepSpeed with a quantized backbone .quantization.mode 4bit"):
        backbone_device_map(QuantizationConfig(mode="4bit"), deepspeed)
    assert backbone_device_map(QuantizationConfig(), deepspeed) is None


def test_full_precision_backbone_is_left_to_accelerate():
    assert backbone_device_map(QuantizationConfig(), process("cuda:1", 1)) is None


def test_a_launcher_accumulation_against_the_recipe_is_refused(monkeypatch):
    # e.g. a DeepSpeed config's gradient_accumulation_steps: Accelerate would follow it, the loop the recipe
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    with pytest.raises(AdapterlabError, match="training.grad_accum is 4"):
        new_accelerator(TrainingConfig(grad_accum=4, mixed_precision="no"))
    assert new_accelerator(TrainingConfig(grad_accum=1, mixed_precision="no")).gradient_accumulation_steps == 1


def test_fsdp_is_refused():
    # Accelerate runs FSDP on GPUs only: none has run it here (docs/training.md)
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP, gradient_accumulation_steps=1)
    with pytest.raises(AdapterlabError, match="FSDP is not supported"):
        refuse_unsupported_launch(fsdp, 1)
