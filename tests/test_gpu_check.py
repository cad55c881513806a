"""benchmarks/gpu_check.py end to end with its smallest flags on the tiny backbones: every phase it can run
here passes (training subprocesses, the engine, the decoder, the HTTP server), and what it cannot is
named as skipped."""

import json
import os
import subprocess
import sys

import torch

from conftest import ROOT


def test_the_gpu_check_runs_every_phase_this_machine_can(tiny_bert, tiny_llama):
    # On a GPU the check runs as a script of its own (minutes, and its CUDA tests): here only that it starts.
    phases = "environment" if torch.cuda.is_available() else "environment,templates,engine,decoder,http,training,cuda_tests"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--phases", phases, "--encoder", tiny_bert,
               "--llm", tiny_llama, "--adapters", "3", "--rows", "4", "--max-tokens", "2", "--train-steps", "1",
               "--precisions", "fp32", "--clients", "2", "--requests", "1", "--minutes", "4"]
    process = subprocess.run(command, capture_output=True, text=True, timeout=400,
                             env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    phases = {line["phase"]: line for line in map(json.loads, process.stdout.splitlines())}
    assert phases["summary"]["failed"] == [], process.stdout + process.stderr[-3000:]
    assert phases["environment"]["cuda"] == torch.cuda.is_available()
    if torch.cuda.is_available():
        return
    assert phases["summary"]["skipped"] == ["cuda_tests"]
    assert [cell["cell"] for cell in phases["templates"]["cells"]] == [
        "sst2-lora-minilm-fp32", "sst2-prefix-minilm-fp32", "e2e-lora-smollm2-fp32"]
    assert all(cell["train_seconds"] > 0 for cell in phases["templates"]["cells"])
    assert [cell["cell"] for cell in phases["training"]["cells"]] == ["e2e-lora-smollm2-4bit"]  # skipped here
    assert phases["engine"]["resident_adapters"] == 23 and phases["engine"]["mixed_vs_alone_max_abs_diff"] < 1e-4
    assert phases["decoder"]["batched_equals_alone"] and phases["decoder"]["tokens"] > 0
    assert phases["http"]["completions"]["requests"] == 2 and phases["http"]["stream"]["equals_unstreamed"]
