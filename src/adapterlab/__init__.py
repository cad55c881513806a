"""adapterlab: few-shot and zero-shot learning with one frozen backbone and many tiny adapters."""

__version__ = "0.1.0"
