"""Softmax-attention layer (Llama's): GQA projections, RoPE at global positions, attention op.

Under a layout the positions are the layout's global positions of the local tokens, so
RoPE is the same as on one device; the op is LASP-2H (keys and values gathered, causal
and document masks by global position).
"""

from __future__ import annotations

import torch
from torch import nn

from lasp.layers.ops import softmax_attention_op
from lasp.layers.rope import apply_rope
from lasp.layers.sequence import token_positions


class SoftmaxAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, num_kv_heads: int | None = None,
                 *, rope_theta: float = 500000.0):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_theta = rope_theta
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, *, layout=None, group=None, cu_seqlens=None) -> torch.Tensor:
        """x: [B, T, hidden] local tokens → [B, T, hidden]."""
        B, T, _ = x.shape
        positions = token_positions(layout, T, x.device)
        q = apply_rope(self.q_proj(x).view(B, T, self.num_heads, self.head_dim), positions, self.rope_theta)
        k = apply_rope(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim), positions, self.rope_theta)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        o = softmax_attention_op(q, k, v, layout=layout, group=group, cu_seqlens=cu_seqlens)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))
