"""Mamba-2 (Dao & Gu 2024, "Transformers are SSMs"): the selective state space layer as
lasp's linear attention with a per-token scalar decay.

    z, xBC, dt = in_proj(x)                        (gate; x, B, C; one time step per head)
    x, B, C    = act(conv(xBC) + bias)              (short causal conv; left context crosses ranks)
    Δ          = clamp(softplus(dt + dt_bias), time_step_limit)        [B, T, H]
    h_t        = exp(Δ_t A) h_{t−1} + B_t (Δ_t x_t)ᵀ,   A = −exp(A_log) [H]
    y_t        = C_tᵀ h_t + D x_t
    out        = out_proj(RMSNorm_group(y ⊙ silu(z)))   (gated RMSNorm; some models norm first)

That is `linear_attention_op` with q = C, k = B (each of the `n_groups` groups shared by
`num_heads / n_groups` consecutive heads), v = Δ·x (heads `head_dim` wide), g = Δ·A, scale 1.
`mamba2_mixer` is the math from the input projection to the normalised output, on given
tensors: lasp's `Mamba2` layer and the adapters of transformers' Mamba-2 hybrids
(`lasp.integrations.hf.mamba2`) both call it. Computes in the input dtype; the decays,
softplus and norm statistics in at least fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lasp.layers.conv import short_conv
from lasp.layers.checks import positive_int
from lasp.layers.delta_rule import mamba_dt_bias
from lasp.layers.norm import gated_rms_norm
from lasp.layers.ops import linear_attention_op

NO_TIME_STEP_LIMIT = (0.0, float("inf"))


def mamba2_ssd(x, B, C, dt, A_log, dt_bias, D, *, time_step_limit=NO_TIME_STEP_LIMIT, layout=None, group=None,
               cu_seqlens=None):
    """The selective scan with its D skip: x [B,T,H,P], B and C [B,T,G,N] (G divides H), dt [B,T,H]
    (before dt_bias and softplus); A_log, dt_bias, D [H] → y [B,T,H,P] in x's dtype."""
    H, G = x.shape[2], B.shape[2]
    acc = torch.promote_types(x.dtype, torch.float32)
    delta = F.softplus(dt.to(acc) + dt_bias.to(acc)).clamp(min=time_step_limit[0], max=time_step_limit[1])
    g = delta * -A_log.to(acc).exp()                               # [B, T, H] log-decays ≤ 0
    v = (x.to(acc) * delta[..., None]).to(x.dtype)
    q, k = C.repeat_interleave(H // G, 2), B.repeat_interleave(H // G, 2)
    y = linear_attention_op(q, k, v, g=g, scale=1.0, layout=layout, group=group, cu_seqlens=cu_seqlens)
    return (y.to(acc) + x.to(acc) * D.to(acc)[:, None]).to(x.dtype)


def mamba2_mixer(projected, conv_weight, conv_bias, A_log, dt_bias, D, norm_weight=None, *, num_heads: int,
                 head_dim: int, n_groups: int, state_size: int, time_step_limit=NO_TIME_STEP_LIMIT,
                 activation=F.silu, norm_eps: float = 1e-6, norm_groups: int = 1, norm_before_gate: bool = False,
                 layout=None, group=None, cu_seqlens=None):
    """Mamba-2 from its input projection `projected` [B, T, 2·H·P + 2·G·N + H] (z, x, B, C, dt)
    to the gated, normalised output [B, T, H·P] that out_proj takes (module docstring).

    conv_weight [C, K] (C = H·P + 2·G·N; `[:, -1]` weighs the current token), conv_bias [C]
    or None; A_log, dt_bias, D [H]; norm_weight [H·P] or None (`lasp.layers.norm.gated_rms_norm`).
    """
    inner, groups_state = num_heads * head_dim, n_groups * state_size
    expected = 2 * inner + 2 * groups_state + num_heads
    if projected.shape[-1] != expected:
        raise ValueError(f"projected must have 2·heads·head_dim + 2·n_groups·state_size + heads = {expected} "
                         f"features (z, x, B, C, dt), got {projected.shape[-1]}")
    if num_heads % n_groups:
        raise ValueError(f"n_groups={n_groups} must divide num_heads={num_heads}")
    batch, T, _ = projected.shape
    z, xBC, dt = projected.split([inner, inner + 2 * groups_state, num_heads], -1)
    xBC = activation(short_conv(xBC, conv_weight, conv_bias, layout=layout, group=group, cu_seqlens=cu_seqlens))
    x, B, C = xBC.split([inner, groups_state, groups_state], -1)
    y = mamba2_ssd(x.view(batch, T, num_heads, head_dim), B.view(batch, T, n_groups, state_size),
                   C.view(batch, T, n_groups, state_size), dt, A_log, dt_bias, D, time_step_limit=time_step_limit,
                   layout=layout, group=group, cu_seqlens=cu_seqlens)
    return gated_rms_norm(y.flatten(-2), z, norm_weight, eps=norm_eps, groups=norm_groups,
                          norm_before_gate=norm_before_gate)


def _time_step_limit(value) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"time_step_limit must be a pair (min, max) of numbers, got {value!r}") from None
    if not 0 <= low <= high:
        raise ValueError(f"time_step_limit must satisfy 0 <= min <= max, got {value!r}")
    return low, high


class Mamba2(nn.Module):
    """Mamba-2 on [B, T, hidden] local tokens (module docstring): `num_heads` heads `head_dim`
    wide, a `state_size`-wide state per head, `n_groups` groups of B and C, a width-`conv_size`
    convolution with bias, and the gated RMSNorm over `n_groups` groups (mamba_ssm's
    defaults). Parameter names follow transformers' Mamba-2 mixers, with the convolution as
    `conv_weight` [C, K] and `conv_bias`, the norm's weight as `norm_weight`."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, *, state_size: int = 128, n_groups: int = 1,
                 conv_size: int = 4, time_step_limit=NO_TIME_STEP_LIMIT, norm_eps: float = 1e-6):
        super().__init__()
        self.num_heads = positive_int("num_heads", num_heads)
        self.head_dim = positive_int("head_dim", head_dim)
        self.state_size = positive_int("state_size", state_size)
        self.n_groups = positive_int("n_groups", n_groups)
        self.conv_size = positive_int("conv_size", conv_size)
        if num_heads % n_groups:
            raise ValueError(f"n_groups={n_groups} must divide num_heads={num_heads} (each group of B and C "
                             "serves num_heads // n_groups consecutive heads)")
        self.time_step_limit = _time_step_limit(time_step_limit)
        self.norm_eps = norm_eps
        inner = num_heads * head_dim
        conv_channels = inner + 2 * n_groups * state_size
        self.in_proj = nn.Linear(hidden_size, inner + conv_channels + num_heads, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(conv_channels, conv_size))  # [:, -1] weighs the current token
        self.conv_bias = nn.Parameter(torch.empty(conv_channels))
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.dt_bias = nn.Parameter(torch.empty(num_heads))
        self.D = nn.Parameter(torch.empty(num_heads))
        self.norm_weight = nn.Parameter(torch.empty(inner))
        self.out_proj = nn.Linear(inner, hidden_size, bias=False)
        self.reset_parameters()

    def initial_parameters(self) -> dict[str, torch.Tensor]:
        """Fresh values of the parameters that are not Linear weights, drawn as mamba_ssm does:
        A = exp(A_log) uniform in [1, 16], Δ = softplus(dt_bias) log-uniform in [1e-3, 0.1],
        D = 1, nn.Conv1d's uniform(±1/√K) convolution, norm weight 1."""
        bound = 1 / math.sqrt(self.conv_size)
        return {"conv_weight": torch.empty_like(self.conv_weight).uniform_(-bound, bound),
                "conv_bias": torch.empty_like(self.conv_bias).uniform_(-bound, bound),
                "A_log": torch.empty_like(self.A_log).uniform_(1, 16).log(),
                "dt_bias": mamba_dt_bias(self.num_heads).to(self.dt_bias),
                "D": torch.ones_like(self.D), "norm_weight": torch.ones_like(self.norm_weight)}

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for name, value in self.initial_parameters().items():
                getattr(self, name).copy_(value)

    def forward(self, x: torch.Tensor, *, layout=None, group=None, cu_seqlens=None) -> torch.Tensor:
        """x: [B, T, hidden] local tokens → [B, T, hidden]."""
        y = mamba2_mixer(self.in_proj(x), self.conv_weight, self.conv_bias, self.A_log, self.dt_bias, self.D,
                         self.norm_weight, num_heads=self.num_heads, head_dim=self.head_dim, n_groups=self.n_groups,
                         state_size=self.state_size, time_step_limit=self.time_step_limit, norm_eps=self.norm_eps,
                         norm_groups=self.n_groups, layout=layout, group=group, cu_seqlens=cu_seqlens)
        return self.out_proj(y)

    def attention_flops_per_token(self, chunk_size: int) -> float:
        """Training FLOPs (3 × forward) per token of the scan alone (projections are counted as
        matmul parameters), per head: linear attention's 3·C·(N+P) + 12·N·P with keys
        `state_size` (N) and values `head_dim` (P) wide."""
        N, P = self.state_size, self.head_dim
        return self.num_heads * (3 * chunk_size * (N + P) + 12 * N * P)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, head_dim={self.head_dim}, state_size={self.state_size}, "
                f"n_groups={self.n_groups}, conv_size={self.conv_size}, time_step_limit={self.time_step_limit}")
