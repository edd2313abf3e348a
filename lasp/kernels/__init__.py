"""Single-device math: chunkwise linear attention (Triton) and its pure-torch oracle,
plus the local softmax-attention backends that LASP-2H runs on each rank.

Never imports torch.distributed: `lasp.parallel` composes these ops across ranks.
"""

from lasp.kernels.linear_attention import linear_attention
from lasp.kernels.reference import chunk_linear_attention, naive_linear_attention
from lasp.kernels.softmax_attention import softmax_attention
from lasp.kernels.state import segment_log_decay, state_output

__all__ = [
    "linear_attention",
    "naive_linear_attention",
    "chunk_linear_attention",
    "state_output",
    "segment_log_decay",
    "softmax_attention",
]
