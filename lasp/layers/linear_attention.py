"""Linear-attention layer: projections, optional short convolution, feature map, decay,
per-head output norm and output gate around the linear-attention op.

    q, k, v = proj(x)              (k, v with num_kv_heads heads, shared by query groups;
                                    q, k heads key_dim wide, v heads head_dim wide)
    q, k, v = silu(conv(q, k, v))  (optional; left context crosses ranks, see conv.py)
    q, k    = φ(q), φ(k)           (feature map, feature_maps.py; may widen the key dim)
    o       = LinearAttention(q, k, v; decay)
    out     = o_proj(gate(x) ⊙ RMSNorm_head(o))

Decay, named by the transition it gives the state (the kernels' argument in brackets):

    identity   none: plain linear attention, Based, ReBased                          (–)
    fixed      a constant scalar per head: RetNet's γ_h = 1 − 2^(−5−h), or Lightning
               Attention's exp(−m_h) with ALiBi's slopes m_h (`fixed_decays`)     (g_gamma)
    scalar     a scalar per head and token: logsigmoid(W_g x + b) / 16                 (g)
    diagonal   one decay per key dim, head and token, GLA's low-rank gate:
               logsigmoid(W_2 W_1 x + b) / 16, W_1 of rank `decay_rank`             (gk)

The normaliser 16 (GLA's) keeps the initial decays close to 1. The earlier names
"none" and "data" still mean identity and scalar.

`GatedLinearAttention` is this layer with the GLA paper's choices (Yang et al. 2024):
the diagonal decay, keys half as wide as values, swish output gate, per-head RMSNorm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lasp.layers.checks import positive_int
from lasp.layers.conv import ShortConv
from lasp.layers.feature_maps import build_feature_map
from lasp.layers.mlp import token_tiles
from lasp.layers.norm import RMSNorm
from lasp.layers.ops import linear_attention_op

GATES = {"silu": F.silu, "sigmoid": torch.sigmoid, None: None}
DECAY_KINDS = ("identity", "fixed", "scalar", "diagonal")
DECAY_ALIASES = {"none": "identity", "data": "scalar"}  # earlier names, kept for existing configs
DATA_DECAY_NORMALIZER = 16.0


def choose_option(name: str, value, options):
    """`value` if it is one of `options`, else a ValueError naming the option `name`."""
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")
    return value


def decay_kind(decay: str, name: str = "decay") -> str:
    """The decay kind (identity | fixed | scalar | diagonal) of a `decay` option called `name`."""
    decay = DECAY_ALIASES.get(decay, decay) if isinstance(decay, str) else decay
    if decay not in DECAY_KINDS:
        raise ValueError(f"{name} must be one of {list(DECAY_KINDS)} (or the earlier "
                         f"{' / '.join(f'{a}={k}' for a, k in DECAY_ALIASES.items())}), got {decay!r}")
    return decay


def retnet_log_decay(num_heads: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """log(1 − 2^(−5−h)) for each head h: RetNet's fixed decays, all ≤ 0."""
    h = torch.arange(num_heads, dtype=torch.float64, device=device)
    return torch.log1p(-torch.pow(2.0, -5.0 - h)).to(dtype)


def lightning_log_decay(num_heads: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """−m_h with ALiBi's slopes m_h: Lightning Attention's fixed decays exp(−m_h).

    For a power of two n the slopes are 2^(−8(h+1)/n); otherwise the n' = 2^⌊log₂ n⌋ slopes
    of n', then every other slope of 2n' (ALiBi's rule). Built on `device` without a copy."""
    n = 1 << (num_heads.bit_length() - 1)
    first = torch.arange(1, n + 1, dtype=torch.float64, device=device) * (8.0 / n)
    rest = torch.arange(num_heads - n, dtype=torch.float64, device=device) * (8.0 / n) + 4.0 / n
    return -torch.exp2(-torch.cat([first, rest])).to(dtype)


FIXED_DECAYS = {"retnet": retnet_log_decay, "lightning": lightning_log_decay}


class LinearAttention(nn.Module):
    """`head_dim` is the value (and output) head width; `key_dim` the query/key head width
    before the feature map (default `head_dim`), which a polynomial map widens."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, num_kv_heads: int | None = None,
                 *, key_dim: int | None = None, feature_map: str = "identity", decay: str = "fixed",
                 fixed_decays: str = "retnet", decay_rank: int = 16, conv_size: int = 0,
                 output_norm: bool = True, output_gate: str | None = "silu", norm_eps: float = 1e-6):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        key_dim = head_dim if key_dim is None else positive_int("key_dim", key_dim)
        self.num_heads, self.num_kv_heads, self.head_dim, self.key_dim = num_heads, num_kv_heads, head_dim, key_dim
        self.feature_map = build_feature_map(feature_map, key_dim)
        self.decay = decay_kind(decay)
        self.fixed_decays = choose_option("fixed_decays", fixed_decays, FIXED_DECAYS)
        self.output_gate = choose_option("output_gate", output_gate, GATES)
        self.q_proj = nn.Linear(hidden_size, num_heads * key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.tile_tokens = 0  # the output path's tile (`output`); the model sets config.tile_tokens
        qkv_channels = (num_heads + num_kv_heads) * key_dim + num_kv_heads * head_dim
        self.conv = ShortConv(qkv_channels, conv_size) if conv_size else None
        self.g_proj = nn.Linear(hidden_size, num_heads, bias=True) if self.decay == "scalar" else None
        self.gk_proj = None
        if self.decay == "diagonal":  # one decay per expanded key dim, like k: per kv head
            rank = positive_int("decay_rank", decay_rank)
            self.gk_proj = nn.Sequential(nn.Linear(hidden_size, rank, bias=False),
                                         nn.Linear(rank, num_kv_heads * self.feature_map.expanded_dim, bias=True))
        self.o_norm = RMSNorm(head_dim, norm_eps) if output_norm else None
        self.gate_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False) if output_gate else None

    def log_decays(self, x: torch.Tensor):
        """(g, g_gamma, gk) of the op for the local tokens `x`; at most one is not None.
        In at least fp32: log-decays are summed over time."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        B, T, _ = x.shape
        if self.decay == "fixed":
            return None, FIXED_DECAYS[self.fixed_decays](self.num_heads, dtype, x.device), None
        if self.decay == "scalar":
            return F.logsigmoid(self.g_proj(x).to(dtype)) / DATA_DECAY_NORMALIZER, None, None
        if self.decay == "diagonal":
            gk = F.logsigmoid(self.gk_proj(x).to(dtype)) / DATA_DECAY_NORMALIZER
            gk = gk.view(B, T, self.num_kv_heads, -1).repeat_interleave(self.num_heads // self.num_kv_heads, 2)
            return None, None, gk
        return None, None, None

    def forward(self, x: torch.Tensor, *, layout=None, group=None, cu_seqlens=None) -> torch.Tensor:
        """x: [B, T, hidden] local tokens → [B, T, hidden]."""
        B, T, _ = x.shape
        H, Hkv, K, D = self.num_heads, self.num_kv_heads, self.key_dim, self.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.conv is not None:
            q, k, v = self.conv(torch.cat([q, k, v], -1), layout=layout, group=group,
                                cu_seqlens=cu_seqlens).split([H * K, Hkv * K, Hkv * D], -1)
        q = self.feature_map(q.reshape(B, T, H, K))
        k = self.feature_map(k.reshape(B, T, Hkv, K)).repeat_interleave(H // Hkv, 2)
        v = v.reshape(B, T, Hkv, D).repeat_interleave(H // Hkv, 2)
        g, g_gamma, gk = self.log_decays(x)
        o = linear_attention_op(q, k, v, g, g_gamma, gk=gk, scale=self.feature_map.scale, layout=layout,
                                group=group, cu_seqlens=cu_seqlens)
        return token_tiles(self.output, o, self.tile_tokens, x)

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The op's heads o [B, t, H, D] to the layer's output [B, t, hidden]: per-head norm,
        output gate from the layer's input x, o_proj. Token-wise (tiled by `tile_tokens`)."""
        B, t, H, D = o.shape
        if self.o_norm is not None:
            o = self.o_norm(o)
        if self.gate_proj is not None:
            o = o * GATES[self.output_gate](self.gate_proj(x)).view(B, t, H, D)
        return self.o_proj(o.reshape(B, t, H * D))

    def attention_flops_per_token(self, chunk_size: int) -> float:
        """Training FLOPs (3 × forward) per token of the linear-attention op alone (the
        projections are counted as matmul parameters): per head, the intra-chunk products
        over C/2 tokens on average, 3·C·(K+V), and the state's read
        and update, 12·K·V, with K the key dim after the feature map."""
        K, V = self.feature_map.expanded_dim, self.head_dim
        return self.num_heads * (3 * chunk_size * (K + V) + 12 * K * V)


class GatedLinearAttention(LinearAttention):
    """GLA (Yang et al. 2024, "Gated Linear Attention Transformers with Hardware-Efficient
    Training"): the diagonal decay from a rank-`decay_rank` gate, query/key heads
    `key_dim` wide (default head_dim // 2: the paper's expand_k = 0.5, expand_v = 1),
    swish output gate and per-head RMSNorm; optional short convolution."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, num_kv_heads: int | None = None,
                 *, key_dim: int | None = None, decay_rank: int = 16, conv_size: int = 0, norm_eps: float = 1e-6):
        super().__init__(hidden_size, num_heads, head_dim, num_kv_heads,
                         key_dim=max(head_dim // 2, 1) if key_dim is None else key_dim, feature_map="identity",
                         decay="diagonal", decay_rank=decay_rank, conv_size=conv_size, output_norm=True,
                         output_gate="silu", norm_eps=norm_eps)
