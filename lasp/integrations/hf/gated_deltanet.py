"""Gated DeltaNet (``qwen3_next``, ``qwen3_5_text``, ``qwen3_5_moe_text``, ``olmo_hybrid``) through
lasp's delta rule.

transformers' layer (its torch path, `torch_chunk_gated_delta_rule`), per value head h:

    q, k, v = act(conv(qkv))                   (depthwise causal conv over q, k, v together)
    q, k    = q / ‖q‖, k / ‖k‖                 (per key head; each serves Hv/Hk consecutive value heads)
    β       = σ(b)                              (OLMo-Hybrid with `allow_neg_eigval`: 2σ(b) ∈ (0, 2))
    g       = −exp(A_log) · softplus(a + dt_bias)
    S_t     = e^{g_t} S_{t−1} + β_t k_t (v_t − k_tᵀ e^{g_t} S_{t−1})ᵀ,   o_t = K^-½ q_tᵀ S_t
    out     = out_proj(RMSNorm(o) ⊙ SiLU(z))    (per value head)

which is lasp's `linear_attention_op(q, k, v, g=g, beta=β)`: LASP-2 under SP, the conv's left
context through `short_conv`'s halo, packed documents kept apart in both. The projections
differ: Qwen3-Next fuses q, k, v, z per key head (`in_proj_qkvz`, `in_proj_ba`, unpacked by
the module's own `fix_query_key_value_ordering`); Qwen3.5 has `in_proj_qkv`, `in_proj_z`,
`in_proj_b`, `in_proj_a`; OLMo-Hybrid separate `q/k/v/a/b/g_proj`. The softmax layers (gated
attention with q/k norms) go through `lasp_sp`; the MoE blocks (router, experts, shared
expert) are per token, so they need nothing.

Qwen's zero-centred RMSNorm (decoder, final and q/k norms) rounds a float64 model to fp32 and
sums its weight's gradient over the tokens in fp32, so that gradient would depend on how the
tokens are split over ranks (≈1e-7): `zero_centred_rms_norm` computes in at least fp32,
the same operations as transformers' in bf16/fp16/fp32 and float64 for float64.
"""

from __future__ import annotations

import torch
from transformers.activations import ACT2FN

from lasp.integrations.hf.context import check_training_call, context_of
from lasp.layers.conv import short_conv
from lasp.layers.delta_rule import gated_log_decay, l2_normalize
from lasp.layers.norm import gated_rms_norm
from lasp.layers.ops import linear_attention_op

MODEL_TYPES = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "olmo_hybrid")


def gated_delta_rule(q, k, v, a, b, A_log, dt_bias, *, beta_scale: float = 1.0, **op_kwargs) -> torch.Tensor:
    """Gated DeltaNet's recurrence as transformers computes it → o [B, T, Hv, V].

    q, k: [B, T, Hk, K] after the conv; v: [B, T, Hv, V]; a, b: [B, T, Hv] (decay and write
    projections); A_log, dt_bias: [Hv]. q and k are L2-normalised per key head and repeated
    over its Hv/Hk value heads; β = beta_scale·σ(b); g = −exp(A_log)·softplus(a + dt_bias) in
    at least fp32; q scaled by K^-½. `op_kwargs` from `HFContext.op_kwargs`.
    """
    repeat = v.shape[2] // q.shape[2]
    q = l2_normalize(q).repeat_interleave(repeat, 2)
    k = l2_normalize(k).repeat_interleave(repeat, 2)
    beta = torch.sigmoid(b) * beta_scale
    g = gated_log_decay(a, A_log, dt_bias)
    return linear_attention_op(q, k, v, g=g, beta=beta, scale=q.shape[-1] ** -0.5, **op_kwargs)


def zero_centred_rms_norm(self, x) -> torch.Tensor:
    """Qwen's RMSNorm forward, `x / rms(x) · (1 + weight)`, in at least fp32 (fp64 stays fp64)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    y = x.to(dtype)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
    return (y * (1.0 + self.weight.to(dtype))).to(x.dtype)


def _qwen3_next_projections(self, x):
    """(qkv [B, T, 2·Hk·K + Hv·V], z, a, b) from the fused per-key-head projections."""
    B, T, _ = x.shape
    q, k, v, z, b, a = self.fix_query_key_value_ordering(self.in_proj_qkvz(x), self.in_proj_ba(x))
    return torch.cat([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], -1), z, a, b


def _qwen3_5_projections(self, x):
    return self.in_proj_qkv(x), self.in_proj_z(x), self.in_proj_a(x), self.in_proj_b(x)


def _olmo_hybrid_projections(self, x):
    return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1), self.g_proj(x), self.a_proj(x), \
        self.b_proj(x)


def _adapter(projections, norm: str, out_proj: str):
    """The replacement forward of one Gated DeltaNet class: its `projections`, the module's
    conv through `short_conv`, `gated_delta_rule`, its gated norm (attribute `norm`) and
    output projection (attribute `out_proj`)."""

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        """The Gated DeltaNet forward on lasp's kernels (training: no cache, no padding mask)."""
        check_training_call(self, cache, attention_mask, **kwargs)
        B, T, _ = hidden_states.shape
        op_kwargs = context_of(self).op_kwargs(T)
        qkv, gate, a, b = projections(self, hidden_states)
        qkv = ACT2FN[self.activation](short_conv(qkv, self.conv1d.weight[:, 0], self.conv1d.bias, **op_kwargs))
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], -1)
        o = gated_delta_rule(q.reshape(B, T, -1, self.head_k_dim), k.reshape(B, T, -1, self.head_k_dim),
                             v.reshape(B, T, -1, self.head_v_dim), a, b, self.A_log, self.dt_bias,
                             beta_scale=2.0 if getattr(self, "allow_neg_eigval", False) else 1.0, **op_kwargs)
        norm_module = getattr(self, norm)
        o = gated_rms_norm(o, gate.reshape(B, T, -1, self.head_v_dim), norm_module.weight,
                           eps=norm_module.variance_epsilon, norm_before_gate=True,
                           activation=ACT2FN[norm_module.activation])
        return getattr(self, out_proj)(o.reshape(B, T, -1))

    return forward


_qwen3_5_forward = _adapter(_qwen3_5_projections, "norm", "out_proj")
ADAPTERS = {
    "Qwen3NextGatedDeltaNet": _adapter(_qwen3_next_projections, "norm", "out_proj"),
    "Qwen3_5GatedDeltaNet": _qwen3_5_forward,
    "Qwen3_5MoeGatedDeltaNet": _qwen3_5_forward,
    "OlmoHybridGatedDeltaNet": _adapter(_olmo_hybrid_projections, "o_norm", "o_proj"),
    "Qwen3NextRMSNorm": zero_centred_rms_norm,
    "Qwen3_5RMSNorm": zero_centred_rms_norm,
    "Qwen3_5MoeRMSNorm": zero_centred_rms_norm,
}
