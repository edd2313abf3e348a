"""Sequence parallelism over a process group (NCCL or gloo), composed from `lasp.kernels`."""

from lasp.parallel.layout import SequenceLayout

__all__ = ["SequenceLayout"]
