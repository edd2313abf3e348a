"""Delta-rule layers: Gated DeltaNet (Qwen3-Next) and Kimi Delta Attention (Kimi Linear).

    q, k, v = silu(conv(proj(x)))          (short causal conv; left context crosses ranks, conv.py)
    q, k    = q / ‖q‖, k / ‖k‖             (per head; the op scales q by K^-½)
    β       = sigmoid(b_proj x)            (write strength of the delta rule)
    decay   = −exp(A_log) · softplus(a + dt_bias)       (log-decay ≤ 0, Mamba-2's form)
    o       = delta rule: decay the state, then S += β k (v − kᵀ S)ᵀ;  o_t = K^-½ q_tᵀ S_t
    out     = o_proj(RMSNorm_head(o) ⊙ act(gate x))

Gated DeltaNet (Yang et al. 2025; Qwen3-Next's linear layers): one decay per value head and
token, `a = a_proj x`; swish output gate. KDA (Kimi Linear, 2025): one decay per key dim,
head and token from a low-rank projection `a = f_b(f_a x)`; sigmoid output gate from a
low-rank projection with bias.

β and the decay are per value head. Heads: `num_heads` query/key heads `head_dim` wide and `num_v_heads` value heads
`head_v_dim` wide (default: as many and as wide). More value heads than key heads share
each query/key head among `num_v_heads // num_heads` consecutive value heads (Qwen3-Next:
16 key heads, 32 value heads); the op runs on the value heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lasp.layers.checks import positive_int
from lasp.layers.conv import ShortConv
from lasp.layers.norm import RMSNorm
from lasp.layers.ops import linear_attention_op

L2_NORM_EPS = 1e-6  # fla's and Qwen3-Next's l2norm: x / sqrt(Σx² + eps)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(Σx² + eps) over the last dim, in at least fp32, returned in x's dtype."""
    y = x.to(torch.promote_types(x.dtype, torch.float32))
    return (y * torch.rsqrt(y.pow(2).sum(-1, keepdim=True) + L2_NORM_EPS)).to(x.dtype)


def gated_log_decay(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """The log-decay of Gated DeltaNet and KDA (Mamba-2's form), −exp(A_log) · softplus(a + dt_bias),
    in at least fp32 (log-decays are summed over time); the three broadcast together (per
    head: a [..., H]; per key dim: a [..., H, K] with A_log [H, 1] and dt_bias [H, K])."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    return -A_log.to(dtype).exp() * F.softplus(a.to(dtype) + dt_bias.to(dtype))


def mamba_dt_bias(n: int, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> torch.Tensor:
    """softplus⁻¹(dt) with dt log-uniform in [dt_min, dt_max] (Mamba's init, fla's Gated DeltaNet)."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


class DeltaRuleAttention(nn.Module):
    """What Gated DeltaNet and KDA share (module docstring); a subclass gives the decay
    (`log_decays`) and the output gate (`gate_proj`, `gate`)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, num_v_heads: int | None = None,
                 *, head_v_dim: int | None = None, conv_size: int = 4, norm_eps: float = 1e-6):
        super().__init__()
        num_heads, head_dim = positive_int("num_heads", num_heads), positive_int("head_dim", head_dim)
        num_v_heads = num_heads if num_v_heads is None else positive_int("num_v_heads", num_v_heads)
        head_v_dim = head_dim if head_v_dim is None else positive_int("head_v_dim", head_v_dim)
        if num_v_heads % num_heads:
            raise ValueError(f"num_v_heads={num_v_heads} must be a multiple of num_heads={num_heads} "
                             "(each query/key head serves num_v_heads // num_heads value heads)")
        if not isinstance(conv_size, int) or conv_size < 0:
            raise ValueError(f"conv_size must be an int >= 0 (0: no short convolution), got {conv_size!r}")
        self.num_heads, self.head_dim, self.num_v_heads, self.head_v_dim = num_heads, head_dim, num_v_heads, head_v_dim
        key_channels, value_channels = num_heads * head_dim, num_v_heads * head_v_dim
        self.q_proj = nn.Linear(hidden_size, key_channels, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_channels, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_channels, bias=False)
        self.conv = ShortConv(2 * key_channels + value_channels, conv_size) if conv_size else None
        self.b_proj = nn.Linear(hidden_size, num_v_heads, bias=False)
        self.o_norm = RMSNorm(head_v_dim, norm_eps)
        self.o_proj = nn.Linear(value_channels, hidden_size, bias=False)

    def log_decays(self, x: torch.Tensor):
        """(g [B,T,Hv], gk [B,T,Hv,K]) of the op for the local tokens `x`; one is None."""
        raise NotImplementedError

    def initial_decay_parameters(self) -> dict[str, torch.Tensor]:
        """Fresh values of A_log and dt_bias, drawn as the reference implementations do."""
        raise NotImplementedError

    def reset_decay_parameters(self) -> None:
        """Set A_log and dt_bias to fresh `initial_decay_parameters`."""
        with torch.no_grad():
            for name, value in self.initial_decay_parameters().items():
                getattr(self, name).copy_(value)

    def forward(self, x: torch.Tensor, *, layout=None, group=None, cu_seqlens=None) -> torch.Tensor:
        """x: [B, T, hidden] local tokens → [B, T, hidden]."""
        B, T, _ = x.shape
        Hk, K, Hv, V = self.num_heads, self.head_dim, self.num_v_heads, self.head_v_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.conv is not None:
            q, k, v = self.conv(torch.cat([q, k, v], -1), layout=layout, group=group,
                                cu_seqlens=cu_seqlens).split([Hk * K, Hk * K, Hv * V], -1)
        else:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q = l2_normalize(q.reshape(B, T, Hk, K)).repeat_interleave(Hv // Hk, 2)
        k = l2_normalize(k.reshape(B, T, Hk, K)).repeat_interleave(Hv // Hk, 2)
        beta = torch.sigmoid(self.b_proj(x))
        g, gk = self.log_decays(x)
        o = linear_attention_op(q, k, v.reshape(B, T, Hv, V), g, gk=gk, beta=beta, layout=layout, group=group,
                                cu_seqlens=cu_seqlens)
        o = self.o_norm(o) * self.gate(self.gate_proj(x)).view(B, T, Hv, V)
        return self.o_proj(o.reshape(B, T, Hv * V))

    def attention_flops_per_token(self, chunk_size: int) -> float:
        """Training FLOPs (3 × forward) per token of the delta-rule op alone (projections are
        counted as matmul parameters), per value head: five causal products inside a chunk
        over C/2 tokens on average (q·kᵀ, its product with the corrected values, k·kᵀ, and
        the WY transform of βk and βv), 3·C·(3K+2V), and the state's read, correction and
        update, 18·K·V."""
        K, V = self.head_dim, self.head_v_dim
        return self.num_v_heads * (3 * chunk_size * (3 * K + 2 * V) + 18 * K * V)


class GatedDeltaNet(DeltaRuleAttention):
    """Gated DeltaNet as in Qwen3-Next's linear layers: the gated delta rule with one decay
    per value head and token, `g = −exp(A_log) · softplus(a_proj x + dt_bias)`, and the
    output RMSNorm(o) ⊙ SiLU(gate_proj x)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, num_v_heads: int | None = None,
                 *, head_v_dim: int | None = None, conv_size: int = 4, norm_eps: float = 1e-6):
        super().__init__(hidden_size, num_heads, head_dim, num_v_heads, head_v_dim=head_v_dim,
                         conv_size=conv_size, norm_eps=norm_eps)
        self.a_proj = nn.Linear(hidden_size, self.num_v_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.num_v_heads))
        self.gate_proj = nn.Linear(hidden_size, self.num_v_heads * self.head_v_dim, bias=False)
        self.gate = F.silu
        self.reset_decay_parameters()

    def initial_decay_parameters(self) -> dict[str, torch.Tensor]:
        """A = exp(A_log) uniform in [1, 16]; dt_bias Mamba's (`mamba_dt_bias`)."""
        return {"A_log": torch.empty_like(self.A_log).uniform_(1, 16).log(),
                "dt_bias": mamba_dt_bias(self.num_v_heads).to(self.dt_bias)}

    def log_decays(self, x: torch.Tensor):
        return gated_log_decay(self.a_proj(x), self.A_log, self.dt_bias), None


class KimiDeltaAttention(DeltaRuleAttention):
    """KDA as in Kimi Linear: the delta rule with one decay per key dim, head and token,
    `gk = −exp(A_log[h]) · softplus(f_b(f_a x) + dt_bias)` with f_a of rank `decay_rank`
    (default head_v_dim, as fla), and the output RMSNorm(o) ⊙ sigmoid(g_b(g_a x) + bias)
    with a low-rank gate of the same rank."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, num_v_heads: int | None = None,
                 *, head_v_dim: int | None = None, decay_rank: int | None = None, conv_size: int = 4,
                 norm_eps: float = 1e-6):
        super().__init__(hidden_size, num_heads, head_dim, num_v_heads, head_v_dim=head_v_dim,
                         conv_size=conv_size, norm_eps=norm_eps)
        rank = self.head_v_dim if decay_rank is None else positive_int("decay_rank", decay_rank)
        self.decay_rank = rank
        value_channels = self.num_v_heads * self.head_v_dim
        self.f_proj = nn.Sequential(nn.Linear(hidden_size, rank, bias=False),
                                    nn.Linear(rank, self.num_v_heads * self.head_dim, bias=False))
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.num_v_heads * self.head_dim))
        self.gate_proj = nn.Sequential(nn.Linear(hidden_size, rank, bias=False),
                                       nn.Linear(rank, value_channels, bias=True))
        self.gate = torch.sigmoid
        self.reset_decay_parameters()

    def initial_decay_parameters(self) -> dict[str, torch.Tensor]:
        """A = exp(A_log) uniform in [1, 16]; dt_bias zero (fla's KDA)."""
        return {"A_log": torch.empty_like(self.A_log).uniform_(1, 16).log(), "dt_bias": torch.zeros_like(self.dt_bias)}

    def log_decays(self, x: torch.Tensor):
        per_key = (self.num_v_heads, self.head_dim)
        return None, gated_log_decay(self.f_proj(x).unflatten(-1, per_key), self.A_log[:, None],
                                     self.dt_bias.view(per_key))
