"""Single-device math: chunkwise linear attention (Triton) and its pure-torch oracle,
Mixture-of-Memories on top of it, and the local softmax-attention backends that LASP-2H
runs on each rank.

Single-device only: `lasp.parallel` composes these ops across ranks (no collectives here).
"""

from lasp.kernels.linear_attention import linear_attention, linear_attention_phases
from lasp.kernels.mom import (MoMPlan, load_balancing_loss, mixture_of_memories, mom_dispatch, mom_projection,
                              mom_reference, mom_route, mom_state_output)
from lasp.kernels.reference import chunk_linear_attention, naive_linear_attention
from lasp.kernels.softmax_attention import softmax_attention
from lasp.kernels.state import segment_log_decay, state_output

__all__ = [
    "linear_attention",
    "linear_attention_phases",
    "naive_linear_attention",
    "chunk_linear_attention",
    "state_output",
    "segment_log_decay",
    "softmax_attention",
    "mom_route",
    "mom_dispatch",
    "MoMPlan",
    "mom_projection",
    "mixture_of_memories",
    "mom_reference",
    "mom_state_output",
    "load_balancing_loss",
]
