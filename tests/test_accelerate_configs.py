"""Every shipped Accelerate config is one Accelerate itself accepts (unknown keys are refused)."""

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from conftest import ROOT

CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))


def test_the_documented_configs_are_shipped():
    # No FSDP config: training refuses FSDP (docs/training.md)
    assert {p.name for p in CONFIGS} == {"cpu.yaml", "cpu-2proc.yaml", "multi-gpu.yaml", "multi-node.yaml",
                                         "deepspeed-zero2.yaml"}


# What each config must mean once Accelerate has read it: (distributed type, processes, mixed precision).
# -1: the launch passes --num_processes, one per GPU of the machine (Accelerate refuses to start without).
MEANING = {"cpu.yaml": ("NO", 1, "no"), "cpu-2proc.yaml": ("MULTI_CPU", 2, "no"),
           "multi-gpu.yaml": ("MULTI_GPU", -1, "bf16"), "multi-node.yaml": ("MULTI_GPU", 16, "bf16"),
           "deepspeed-zero2.yaml": ("DEEPSPEED", -1, "bf16")}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_parses_the_config(path):
    config = load_config_from_file(str(path))
    kind, processes, precision = MEANING[path.name]
    assert (str(config.distributed_type).split(".")[-1], config.num_processes, str(config.mixed_precision)) == \
        (kind, processes, precision)
    assert path.read_text().startswith("#")  # each says when to use it
