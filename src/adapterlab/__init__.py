"""adapterlab: few-shot and zero-shot learning with one frozen backbone and many tiny adapters."""

import logging
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("adapterlab")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "unknown"


def _without_kernels_advice(record: logging.LogRecord) -> bool:
    """bitsandbytes, imported by peft wherever it is installed, asks on CPUs with AVX512-BF16 for the
    `kernels` package. Its kernel serves only the CPU-packed 4-bit format, which adapterlab turns off
    (backbones.loading), so the advice is noise on every run."""
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_without_kernels_advice)
