"""Devices and precisions chosen from the hardware, never from the speed of one machine.

bfloat16 pays only where the device computes it natively: a CUDA GPU with bf16, or a CPU with
AVX512-BF16 or AMX. On a CPU with AVX2 alone a bf16 matrix product is ~30x slower than float32, so
there, and on devices without a fast half type, everything runs in full precision. A CPU whose oneDNN is
held to AVX2 (`ONEDNN_MAX_CPU_ISA=AVX2`) computes bf16 as slowly as an AVX2-only one and counts as one:
that is also how a machine with fast bf16 shows what an AVX2-only CPU would do (docs/hardware.md).
"""

import functools
import platform
from pathlib import Path
from typing import Literal

import torch

from adapterlab.errors import AdapterlabError

MixedPrecision = Literal["no", "bf16", "fp16"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MIXED_TO_DTYPE = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Scores set beside one another (a baseline beside trained cells, a combination beside its parents,
# teachers' pseudo-labels) are computed in full precision, as training scores its adapters: where `auto`
# serves in bf16 they would differ by rounding alone, and a near tie may turn (SST-2 zero-shot: 67.4 in
# bf16, 67.9 in float32).
COMPARISON_DTYPE = "float32"


def fast_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively (faster than float32, not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_capability()["fast_bf16"]
    return False


def mixed_precision_for(device: torch.device) -> MixedPrecision:
    """What `training.mixed_precision: auto` means on `device`: bf16 where it is fast, fp16 on GPUs
    without bf16, otherwise full precision."""
    if fast_bf16(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else "no"


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`: the first CUDA GPU, else Apple's MPS, else the CPU; or `cpu`, `cuda`, `cuda:N`, `mps`."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AdapterlabError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AdapterlabError(f"device {name!r}: no CUDA GPU is available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise AdapterlabError(f"device {name!r}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise AdapterlabError(f"device {name!r}: MPS is not available here")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: the inference twin of `mixed_precision_for` (bfloat16 where fast, float16 on GPUs
    without it, else float32); or float32, bfloat16, float16."""
    if name == "auto":
        return _MIXED_TO_DTYPE[mixed_precision_for(device)]
    try:
        return DTYPES[name]
    except KeyError:
        raise AdapterlabError(f"unknown dtype {name!r}: use auto, {', '.join(DTYPES)}") from None


def cpu_capability() -> dict:
    """The CPU's name and what it computes natively, for logs and benchmark figures. `onednn_bf16`:
    whether oneDNN, which computes torch's bf16 matrix products, may use the CPU's bf16 instructions
    (false where `ONEDNN_MAX_CPU_ISA` holds it below them). torch answers these through private functions
    only; where a release has moved them, the CPU's flags and a timed bf16 matrix product answer instead."""
    flags = _cpuinfo("flags").split()
    avx512_bf16 = _torch_check(torch.cpu, "_is_avx512_bf16_supported")
    amx = _torch_check(torch.cpu, "_is_amx_tile_supported")
    onednn = _torch_check(torch.ops.mkldnn, "_is_mkldnn_bf16_supported")
    if None in (avx512_bf16, amx, onednn):
        fast = bf16_matmul_is_fast()
    else:
        fast = (avx512_bf16 or amx) and onednn
    return {"cpu": _cpuinfo("model name") or platform.processor() or platform.machine(),
            "isa": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": "avx512_bf16" in flags if avx512_bf16 is None else avx512_bf16,
            "amx": "amx_tile" in flags if amx is None else amx,
            "onednn_bf16": torch.backends.mkldnn.is_available() and (fast if onednn is None else onednn),
            "fast_bf16": torch.backends.mkldnn.is_available() and fast}


def _torch_check(namespace, name: str) -> bool | None:
    """torch's answer from a private check function; None where this torch has no such function."""
    check = getattr(namespace, name, None)
    return bool(check()) if callable(check) else None


@functools.cache
def bf16_matmul_is_fast() -> bool:
    """Whether a bfloat16 matrix product runs faster than a float32 one on this CPU (twice as fast with
    bf16 instructions, 10-50x slower without): measured once a process."""
    from torch.utils.benchmark import Timer

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        timer = Timer("a @ b", globals={"a": a.to(dtype), "b": b.to(dtype)})
        timer.timeit(1)  # oneDNN builds its kernel on the first product
        seconds[dtype] = timer.blocked_autorange(min_run_time=0.02).median
    return seconds[torch.bfloat16] < seconds[torch.float32]


def _cpuinfo(field: str) -> str:
    """A field of the first CPU in /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
