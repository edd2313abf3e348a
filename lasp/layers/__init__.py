"""Model layers that run on one device or sequence-parallel under a `SequenceLayout`.

Every layer's forward takes local tokens [B, T_local, hidden] and the keywords
``layout`` (None: the whole sequence is local), ``group`` and ``cu_seqlens`` (packed
documents of the whole sequence).
"""

from lasp.layers.conv import ShortConv
from lasp.layers.linear_attention import LinearAttention
from lasp.layers.mlp import SwiGLU
from lasp.layers.mom import MixtureOfMemories
from lasp.layers.norm import RMSNorm
from lasp.layers.sequence import SPContext
from lasp.layers.softmax_attention import SoftmaxAttention

__all__ = ["LinearAttention", "MixtureOfMemories", "SoftmaxAttention", "SwiGLU", "RMSNorm", "ShortConv",
           "SPContext"]
