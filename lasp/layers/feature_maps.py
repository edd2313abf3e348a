"""Feature maps φ of linear attention: queries and keys go through φ before the op, so that
the op's kernel φ(q)·φ(k) stands where softmax has exp(q·k).

Pointwise maps keep the key dim d: ``identity``, ``elu+1`` (Katharopoulos et al. 2020),
``relu``, ``silu``. Polynomial maps widen it, with s = x·y/√d (softmax's temperature):

    based     Based's 2nd-order Taylor map (Arora et al. 2024):  φ(x)·φ(y) = 1 + s + s²/2
              φ(x) = [1, x', vec(x' x'ᵀ)/√2] with x' = x/d^¼;   expanded dim 1 + d + d(d+1)/2
    rebased   ReBased (Aksenov et al. 2024): x̃ = γ ⊙ LayerNorm(x) + β, then the square
              φ(x)·φ(y) = s̃², s̃ = x̃·ỹ/√d (γ, β learnable, shared by queries and keys);
              expanded dim d(d+1)/2

The quadratic terms keep the upper triangle of x' x'ᵀ only, the off-diagonal entries
scaled by √2: every inner product is unchanged and the dim nearly halves (d² → d(d+1)/2).
A polynomial map is the whole kernel, so the layer calls the op with scale 1 (`scale`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lasp.kernels.common.launch import TRITON_HEAD_DIMS

POINTWISE_MAPS = {
    "identity": lambda x: x,
    "elu+1": lambda x: F.elu(x) + 1,
    "relu": F.relu,
    "silu": F.silu,
}


def upper_products(x: torch.Tensor) -> torch.Tensor:
    """[..., d] → [..., d(d+1)/2]: the squares x_i², then x_i x_j (i < j) times √2, so that
    upper_products(x)·upper_products(y) = (x·y)²."""
    d = x.shape[-1]
    i, j = torch.triu_indices(d, d, offset=1, device=x.device)
    return torch.cat([x * x, x[..., i] * x[..., j] * math.sqrt(2.0)], -1)


class FeatureMap(nn.Module):
    """φ on the last dim of queries and keys: [..., dim] → [..., expanded_dim]."""

    scale: float | None = None  # the op's query scale with this map; None: the op's default

    def __init__(self, name: str, dim: int):
        super().__init__()
        self.name, self.dim = name, dim

    @property
    def expanded_dim(self) -> int:
        return expanded_dim(self.name, self.dim)

    def extra_repr(self) -> str:
        return f"{self.name!r}, dim={self.dim} -> {self.expanded_dim}"


class PointwiseMap(FeatureMap):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return POINTWISE_MAPS[self.name](x)


class TaylorMap(FeatureMap):
    """Based: φ(x)·φ(y) = 1 + s + s²/2 with s = x·y/√d (exp's Taylor series to 2nd order)."""

    scale = 1.0

    def __init__(self, dim: int):
        super().__init__("based", dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.dim ** -0.25
        return torch.cat([torch.ones_like(x[..., :1]), x, upper_products(x) * 0.5 ** 0.5], -1)


class ReBasedMap(FeatureMap):
    """ReBased: x̃ = γ ⊙ LayerNorm(x) + β, φ(x)·φ(y) = (x̃·ỹ/√d)²."""

    scale = 1.0

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__("rebased", dim)
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, (self.dim,), self.gamma.to(x.dtype), self.beta.to(x.dtype), self.eps)
        return upper_products(x * self.dim ** -0.25)


POLYNOMIAL_MAPS = {"based": TaylorMap, "rebased": ReBasedMap}
FEATURE_MAPS = (*POINTWISE_MAPS, *POLYNOMIAL_MAPS)


def expanded_dim(name: str, dim: int) -> int:
    """The key dim after feature map `name` of a `dim`-wide query/key head."""
    if name == "based":
        return 1 + dim + dim * (dim + 1) // 2
    if name == "rebased":
        return dim * (dim + 1) // 2
    return dim


def check_feature_map(name: str, dim: int) -> None:
    """ValueError for an unknown map, or a polynomial map whose expanded key dim leaves the
    Triton kernels' head dims (the value head dim is separate and not widened)."""
    if name not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {list(FEATURE_MAPS)}, got {name!r}")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"the key head dim must be a positive int, got {dim!r}")
    lo, hi = TRITON_HEAD_DIMS
    if name in POLYNOMIAL_MAPS and not lo <= expanded_dim(name, dim) <= hi:
        fits = [d for d in range(1, hi + 1) if lo <= expanded_dim(name, d) <= hi]
        raise ValueError(f"feature_map={name!r} widens a key head dim of {dim} to {expanded_dim(name, dim)}, "
                         f"outside the kernels' head dims {lo}..{hi}; use a key head dim in "
                         f"{fits[0]}..{fits[-1]} (the value head dim is separate)")


def build_feature_map(name: str, dim: int) -> FeatureMap:
    """The feature map `name` for query/key heads of width `dim` (checked, see `check_feature_map`)."""
    check_feature_map(name, dim)
    if name in POLYNOMIAL_MAPS:
        return POLYNOMIAL_MAPS[name](dim)
    return PointwiseMap(name, dim)
