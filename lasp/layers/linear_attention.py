"""Linear-attention layer: projections, optional short convolution, feature map, decay,
per-head output norm and output gate around the linear-attention op.

    q, k, v = proj(x)              (k, v with num_kv_heads heads, shared by query groups)
    q, k, v = silu(conv(q, k, v))  (optional; left context crosses ranks, see conv.py)
    q, k    = φ(q), φ(k)           (feature map)
    o       = LinearAttention(q, k, v; decay)
    out     = o_proj(gate(x) ⊙ RMSNorm_head(o))

Decay: "none"; "fixed" — RetNet's per-head constants γ_h = 1 − 2^(−5−h), the g_gamma of
the kernels; "data" — a per-token, per-head log-decay logsigmoid(W_g x) / 16 (GLA's
normaliser keeps the initial decays close to 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lasp.layers.conv import ShortConv
from lasp.layers.norm import RMSNorm
from lasp.layers.ops import linear_attention_op

FEATURE_MAPS = {
    "identity": lambda x: x,
    "elu+1": lambda x: F.elu(x) + 1,
    "relu": F.relu,
    "silu": F.silu,
}
GATES = {"silu": F.silu, "sigmoid": torch.sigmoid, None: None}
DECAYS = ("none", "fixed", "data")
DATA_DECAY_NORMALIZER = 16.0


def _choose(name: str, value, options):
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")
    return value


def retnet_log_decay(num_heads: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """log(1 − 2^(−5−h)) for each head h: RetNet's fixed decays, all ≤ 0."""
    h = torch.arange(num_heads, dtype=torch.float64, device=device)
    return torch.log1p(-torch.pow(2.0, -5.0 - h)).to(dtype)


class LinearAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, num_kv_heads: int | None = None,
                 *, feature_map: str = "identity", decay: str = "fixed", conv_size: int = 0,
                 output_norm: bool = True, output_gate: str | None = "silu", norm_eps: float = 1e-6):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.feature_map = _choose("feature_map", feature_map, FEATURE_MAPS)
        self.decay = _choose("decay", decay, DECAYS)
        self.output_gate = _choose("output_gate", output_gate, GATES)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        qkv_channels = (num_heads + 2 * num_kv_heads) * head_dim
        self.conv = ShortConv(qkv_channels, conv_size) if conv_size else None
        self.g_proj = nn.Linear(hidden_size, num_heads, bias=True) if decay == "data" else None
        self.o_norm = RMSNorm(head_dim, norm_eps) if output_norm else None
        self.gate_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False) if output_gate else None

    def forward(self, x: torch.Tensor, *, layout=None, group=None, cu_seqlens=None) -> torch.Tensor:
        """x: [B, T, hidden] local tokens → [B, T, hidden]."""
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.conv is not None:
            q, k, v = self.conv(torch.cat([q, k, v], -1), layout=layout, group=group,
                                cu_seqlens=cu_seqlens).split([H * D, Hkv * D, Hkv * D], -1)
        phi = FEATURE_MAPS[self.feature_map]
        q = phi(q.reshape(B, T, H, D))
        k = phi(k.reshape(B, T, Hkv, D)).repeat_interleave(H // Hkv, 2)
        v = v.reshape(B, T, Hkv, D).repeat_interleave(H // Hkv, 2)
        g = g_gamma = None
        decay_dtype = torch.promote_types(x.dtype, torch.float32)  # log-decays are summed over time
        if self.decay == "fixed":
            g_gamma = retnet_log_decay(H, decay_dtype, x.device)
        elif self.decay == "data":
            g = F.logsigmoid(self.g_proj(x).to(decay_dtype)) / DATA_DECAY_NORMALIZER
        o = linear_attention_op(q, k, v, g, g_gamma, layout=layout, group=group, cu_seqlens=cu_seqlens)
        if self.o_norm is not None:
            o = self.o_norm(o)
        if self.gate_proj is not None:
            o = o * GATES[self.output_gate](self.gate_proj(x)).view(B, T, H, D)
        return self.o_proj(o.reshape(B, T, H * D))
