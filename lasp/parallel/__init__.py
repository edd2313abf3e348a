"""Sequence parallelism over a process group (NCCL or gloo), composed from `lasp.kernels`."""

from lasp.parallel.lasp2 import lasp1_linear_attention, lasp2_linear_attention
from lasp.parallel.lasp2h import lasp2h_attention, ring_attention
from lasp.parallel.layout import SequenceLayout
from lasp.parallel.mesh import ParallelDims, ParallelMesh
from lasp.parallel.mom import lasp2_load_balancing_loss, lasp2_mixture_of_memories, local_plan

__all__ = [
    "SequenceLayout",
    "ParallelDims",
    "ParallelMesh",
    "lasp2_linear_attention",
    "lasp1_linear_attention",
    "lasp2h_attention",
    "ring_attention",
    "lasp2_mixture_of_memories",
    "lasp2_load_balancing_loss",
    "local_plan",
]
