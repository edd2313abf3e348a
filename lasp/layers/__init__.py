"""Model layers that run on one device or sequence-parallel under a `SequenceLayout`.

Every layer's forward takes local tokens [B, T_local, hidden] and the keywords
``layout`` (None: the whole sequence is local), ``group`` and ``cu_seqlens`` (packed
documents of the whole sequence).
"""

from lasp.layers.conv import ShortConv
from lasp.layers.delta_rule import GatedDeltaNet, KimiDeltaAttention
from lasp.layers.feature_maps import FEATURE_MAPS, build_feature_map
from lasp.layers.linear_attention import DECAY_KINDS, GatedLinearAttention, LinearAttention
from lasp.layers.mamba2 import Mamba2
from lasp.layers.mlp import SwiGLU
from lasp.layers.mom import MixtureOfMemories
from lasp.layers.norm import RMSNorm
from lasp.layers.sequence import SPContext
from lasp.layers.softmax_attention import SoftmaxAttention

__all__ = ["LinearAttention", "GatedLinearAttention", "GatedDeltaNet", "KimiDeltaAttention", "MixtureOfMemories",
           "Mamba2", "SoftmaxAttention", "SwiGLU", "RMSNorm", "ShortConv", "SPContext", "FEATURE_MAPS", "DECAY_KINDS",
           "build_feature_map"]
