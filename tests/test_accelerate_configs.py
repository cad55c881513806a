"""Every shipped Accelerate config is one Accelerate itself accepts (unknown keys are refused)."""

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from conftest import ROOT

CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))


def test_the_documented_configs_are_shipped():
    assert {p.name for p in CONFIGS} == {"cpu.yaml", "cpu-2proc.yaml", "multi-gpu.yaml", "multi-node.yaml",
                                         "deepspeed-zero2.yaml", "fsdp.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_parses_the_config(path):
    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and str(config.distributed_type)
    assert path.read_text().startswith("#")  # each says when to use it
