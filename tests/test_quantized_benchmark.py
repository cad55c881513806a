"""benchmarks/quantized.py: a mode over its seeds, and the targets judged on the means (fabricated runs)."""

import importlib.util
import sys

import pytest

from conftest import ROOT

sys.path.append(str(ROOT / "benchmarks"))  # its `from _common import ...`, as when the script runs from there
spec = importlib.util.spec_from_file_location("quantized", ROOT / "benchmarks" / "quantized.py")
quantized = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quantized)


def runs(mode: str, backbone_bytes: int, accuracies: list[float]) -> list[dict]:
    return [{"mode": mode, "seed": seed, "backbone_bytes": backbone_bytes, "rss_loaded_mb": 500.0 + seed,
             "peak_rss_train_mb": 4000.0 - seed, "max_rss_mb": 4100.0, "steps": 20, "step_seconds": 4.0 + seed,
             "accuracy": accuracy, "train_rows": 32, "test_rows": 400} for seed, accuracy in enumerate(accuracies)]


def test_modes_are_judged_on_their_mean_over_seeds():
    fp32 = quantized.summarize(runs("fp32", 540, [0.80, 0.84, 0.82]))
    assert fp32["accuracy"] == pytest.approx(0.82) and fp32["accuracy_std"] == pytest.approx(0.02)
    assert fp32["step_seconds"] == 5.0 and fp32["rss_loaded_mb"] == 502.0 and fp32["peak_rss_train_mb"] == 4000.0
    assert fp32["accuracy_per_seed"] == [0.80, 0.84, 0.82] and fp32["seeds"] == [0, 1, 2]

    close = quantized.summarize(runs("8bit", 220, [0.85, 0.81, 0.83]))  # one seed 3 points off, the mean 1
    checks = quantized.target_checks({"fp32": fp32, "8bit": close})
    assert checks["backbone_bytes_8bit_vs_fp32"] == {"value": 0.407, "max": 0.5, "pass": True}
    assert checks["accuracy_gap_points_8bit"] == {"value": 1.0, "max": 2.0, "pass": True}

    far = quantized.summarize(runs("8bit", 300, [0.78, 0.78, 0.78]))
    checks = quantized.target_checks({"fp32": fp32, "8bit": far})
    assert [check["pass"] for check in checks.values()] == [False, False]
    assert quantized.target_checks({"8bit": far}) == {}  # nothing to compare with
