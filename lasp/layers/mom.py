"""Mixture-of-Memories layer: a router over M linear-attention memories plus a shared one.

    weights, memories = top-k(softmax(router(x)))      (renormalised over the k chosen)
    q = φ(q_proj(x))                                   (shared by every memory)
    k_m, v_m = φ(x W^k_m), x W^v_m                     (only for the tokens routed to m)
    o = Σ_j w_j · MoM_{m_j}(q, k, v) + LinearAttention(q, φ(k_shared), v_shared)
    out = o_proj(gate(x) ⊙ RMSNorm_head(o))

Each memory's recurrence runs over the tokens routed to it, in sequence order
(`lasp.kernels.mom`); the shared memory sees every token. Decay as in `LinearAttention`:
"none", "fixed" (RetNet's per-head constants, applied once per routed token of a
memory) or "data" (per memory and head, logsigmoid(W_g x) / 16).

`delta_rule=True` makes every memory (and the shared one) a delta-rule state, as the MoM
paper's Gated DeltaNet memories (fla's MoM layer): q and each memory's keys are
L2-normalised per head, β = sigmoid(W_β x) per memory and head, and a memory's state is
written `S ← A(S) + β k (v − kᵀ A(S))ᵀ` only by the tokens routed to it (with decay
"data": Gated DeltaNet memories; "none": DeltaNet).

Projections of the routed copies: on CUDA in bf16 (sm90/sm100) one grouped matmul per
projection computes only the k routed copies of each token; elsewhere every memory's
projection is computed and the routed rows selected (M/k times the key/value FLOPs,
sync-free everywhere: `lasp.kernels.mom_projection`).

The forward returns `(out, aux_loss)`: the Switch-style load-balancing loss of the
routing, over the whole sequence under sequence parallelism (this rank's share).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lasp.kernels.mom import mom_projection, mom_route
from lasp.layers.delta_rule import l2_normalize
from lasp.layers.feature_maps import POINTWISE_MAPS
from lasp.layers.linear_attention import DATA_DECAY_NORMALIZER, GATES, choose_option, retnet_log_decay
from lasp.layers.norm import RMSNorm
from lasp.layers.ops import linear_attention_op, load_balancing_loss_op, mixture_of_memories_op
from lasp.parallel.mom import local_plan

DECAYS = ("none", "fixed", "data")  # LinearAttention's identity, fixed, scalar under their earlier names


class MemoryProjection(nn.Module):
    """One bias-free linear map per memory, stacked: `weight` [M, out, in]."""

    def __init__(self, num_memories: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_memories, out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation, memory by memory."""
        for weight in self.weight.data:
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))

    def extra_repr(self) -> str:
        M, out, inp = self.weight.shape
        return f"num_memories={M}, in_features={inp}, out_features={out}"


class MixtureOfMemories(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, *, num_memories: int = 4, top_k: int = 2,
                 shared_memory: bool = True, feature_map: str = "identity", decay: str = "fixed",
                 delta_rule: bool = False, output_norm: bool = True, output_gate: str | None = "silu",
                 norm_eps: float = 1e-6):
        super().__init__()
        if not isinstance(num_memories, int) or num_memories < 1:
            raise ValueError(f"num_memories must be a positive int, got {num_memories!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_memories:
            raise ValueError(f"top_k must be an int in [1, num_memories={num_memories}], got {top_k!r}")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.num_memories, self.top_k, self.shared_memory = num_memories, top_k, shared_memory
        self.feature_map = choose_option("feature_map", feature_map, POINTWISE_MAPS)
        self.decay = choose_option("decay", decay, DECAYS)
        if not isinstance(delta_rule, bool):
            raise TypeError(f"delta_rule must be a bool, got {delta_rule!r}")
        self.delta_rule = delta_rule
        self.output_gate = choose_option("output_gate", output_gate, GATES)
        width = num_heads * head_dim
        self.router = nn.Linear(hidden_size, num_memories, bias=False)
        self.q_proj = nn.Linear(hidden_size, width, bias=False)
        self.k_proj = MemoryProjection(num_memories, hidden_size, width)
        self.v_proj = MemoryProjection(num_memories, hidden_size, width)
        self.g_proj = nn.Linear(hidden_size, num_memories * num_heads, bias=True) if decay == "data" else None
        self.b_proj = nn.Linear(hidden_size, num_memories * num_heads, bias=False) if delta_rule else None
        if shared_memory:
            self.shared_k_proj = nn.Linear(hidden_size, width, bias=False)
            self.shared_v_proj = nn.Linear(hidden_size, width, bias=False)
            self.shared_g_proj = nn.Linear(hidden_size, num_heads, bias=True) if decay == "data" else None
            self.shared_b_proj = nn.Linear(hidden_size, num_heads, bias=False) if delta_rule else None
        self.o_proj = nn.Linear(width, hidden_size, bias=False)
        self.o_norm = RMSNorm(head_dim, norm_eps) if output_norm else None
        self.gate_proj = nn.Linear(hidden_size, width, bias=False) if output_gate else None

    def forward(self, x: torch.Tensor, *, layout=None, group=None, cu_seqlens=None):
        """x: [B, T, hidden] local tokens → (out [B, T, hidden], aux_loss: 0-d fp32)."""
        B, T, _ = x.shape
        H, D, M = self.num_heads, self.head_dim, self.num_memories
        phi = POINTWISE_MAPS[self.feature_map]
        weights, indices, probs = mom_route(self.router(x), self.top_k)
        plan = local_plan(indices, M, layout=layout, cu_seqlens=cu_seqlens)
        q = phi(self.q_proj(x).view(B, T, H, D))
        k, v = mom_projection(x, (self.k_proj.weight, self.v_proj.weight), plan)
        k, v = phi(k).view(-1, H, D), v.view(-1, H, D)
        beta = None
        if self.delta_rule:
            q, k = l2_normalize(q), l2_normalize(k)
            beta = self.b_proj(x).sigmoid().view(B, T, M, H)
        decay_dtype = torch.promote_types(x.dtype, torch.float32)   # log-decays are summed over time
        g = g_gamma = None
        if self.decay == "fixed":
            g_gamma = retnet_log_decay(H, decay_dtype, x.device)
        elif self.decay == "data":
            g = F.logsigmoid(self.g_proj(x).to(decay_dtype)).view(B, T, M, H) / DATA_DECAY_NORMALIZER
        o = mixture_of_memories_op(q, k, v, weights, plan, g, g_gamma, beta=beta, layout=layout, group=group,
                                   cu_seqlens=cu_seqlens)
        if self.shared_memory:
            g_shared = None
            if self.decay == "data":
                g_shared = F.logsigmoid(self.shared_g_proj(x).to(decay_dtype)) / DATA_DECAY_NORMALIZER
            k_shared = phi(self.shared_k_proj(x).view(B, T, H, D))
            v_shared = self.shared_v_proj(x).view(B, T, H, D)
            beta_shared = None
            if self.delta_rule:
                k_shared, beta_shared = l2_normalize(k_shared), self.shared_b_proj(x).sigmoid()
            o = o + linear_attention_op(q, k_shared, v_shared, g_shared, g_gamma, beta=beta_shared, layout=layout,
                                        group=group, cu_seqlens=cu_seqlens)
        if self.o_norm is not None:
            o = self.o_norm(o)
        if self.gate_proj is not None:
            o = o * GATES[self.output_gate](self.gate_proj(x)).view(B, T, H, D)
        out = self.o_proj(o.reshape(B, T, H * D))
        return out, load_balancing_loss_op(probs, indices, layout=layout, group=group)
