"""RMSNorm and the gated RMSNorm of Mamba-2 / Gated DeltaNet / KDA outputs, computed in at
least fp32 whatever the input dtype (fp64 stays fp64)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight · x / rms(x)` over the last dimension, the statistics in at least fp32."""
    y = x.to(torch.promote_types(x.dtype, torch.float32))
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def gated_rms_norm(y, gate, weight=None, *, eps: float = 1e-6, groups: int = 1, norm_before_gate: bool = False,
                   activation=F.silu) -> torch.Tensor:
    """RMSNorm over each of `groups` equal slices of y ⊙ act(gate) [..., C] (or of y, then
    ⊙ act(gate), with `norm_before_gate`), times `weight` [C]; without a weight, y ⊙ act(gate)
    alone. Mamba-2's grouped norm gates first; Gated DeltaNet's and KDA's (one group, SiLU
    or sigmoid) normalise first. In at least fp32, returned in y's dtype."""
    acc = torch.promote_types(y.dtype, torch.float32)
    out, gate = y.to(acc), activation(gate.to(acc))
    if weight is None:
        return (out * gate).to(y.dtype)
    if not norm_before_gate:
        out = out * gate
    grouped = out.unflatten(-1, (groups, -1))
    out = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * weight.to(acc)
    if norm_before_gate:
        out = out * gate
    return out.to(y.dtype)


class RMSNorm(nn.Module):
    """`weight · x / rms(x)` over the last dimension (Llama's norm; also per-head output norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
