"""Training choices that need no model: where each process puts a (quantized) backbone."""

from types import SimpleNamespace

import torch

from adapterlab.recipe import QuantizationConfig
from adapterlab.training.builders import backbone_device_map


def process(device: str, local_index: int) -> SimpleNamespace:
    return SimpleNamespace(device=torch.device(device), local_process_index=local_index)


def test_quantized_backbone_loads_whole_on_each_process_gpu():
    # Under DDP each process trains a whole copy on its own GPU; "auto" would spread one copy over all
    # of them, which Accelerate refuses to train.
    eight_bit = QuantizationConfig(mode="8bit")
    assert backbone_device_map(eight_bit, process("cuda:3", 3)) == {"": 3}
    assert backbone_device_map(QuantizationConfig(mode="4bit"), process("cuda:0", 0)) == {"": 0}
    assert backbone_device_map(eight_bit, process("cpu", 1)) == {"": "cpu"}  # CPU processes (MPI)


def test_full_precision_backbone_is_left_to_accelerate():
    assert backbone_device_map(QuantizationConfig(), process("cuda:1", 1)) is None
