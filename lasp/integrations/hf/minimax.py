"""MiniMax (``minimax``): `MiniMaxLightningAttention` through lasp's fixed-decay linear attention.

transformers' layer, per head h (its block-wise loop computes exactly this recurrence):

    q, k, v = act(qkv_proj(x))                 (SiLU in MiniMax-Text-01; no scaling of q)
    S_t     = exp(−slope_h) · S_{t−1} + k_t v_tᵀ       o_t = q_tᵀ S_t
    out     = out_proj(σ(output_gate(x)) ⊙ RMSNorm(o))   (RMSNorm over all heads at once)

`slope_h` is the module's `slope_rate` buffer (ALiBi's slopes scaled down with the layer
index), so the recurrence is lasp's `g_gamma = −slope_rate`: LASP-2 under SP, and packed
documents reset the state. The softmax layers go through `lasp_sp` and the sparse-MoE
blocks are per token, so they need nothing.
"""

from __future__ import annotations

import torch

from lasp.integrations.hf.context import check_training_call, context_of
from lasp.layers.norm import rms_norm
from lasp.layers.ops import linear_attention_op

MODEL_TYPES = ("minimax",)


def lightning_attention(q, k, v, slope_rate, **op_kwargs) -> torch.Tensor:
    """MiniMax's lightning recurrence on [B, T, H, D] q, k, v: the state decays by
    exp(−slope_rate[h]) per token, no query scaling; `op_kwargs` from `HFContext.op_kwargs`."""
    log_decay = -slope_rate.reshape(-1).to(torch.promote_types(q.dtype, torch.float32))
    return linear_attention_op(q, k, v, g_gamma=log_decay, scale=1.0, **op_kwargs)


def lightning_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """`MiniMaxLightningAttention.forward` on lasp's kernels → (output, None).

    transformers returns the layer's final state as the second element (for its cache);
    a training forward keeps none, so it is None here. A cache or padding mask is refused.
    """
    check_training_call(self, cache, attention_mask, **kwargs)
    B, T, _ = hidden_states.shape
    H, D = self.num_attention_heads, self.head_dim
    qkv = self.act_fn(self.qkv_proj(hidden_states)).view(B, T, H, 3 * D)
    q, k, v = qkv.split(D, dim=-1)
    o = lightning_attention(q, k, v, self.slope_rate, **context_of(self).op_kwargs(T))
    o = rms_norm(o.reshape(B, T, H * D), self.norm.weight, self.norm.variance_epsilon)
    o = torch.sigmoid(self.output_gate(hidden_states)) * o
    return self.out_proj(o), None


ADAPTERS = {"MiniMaxLightningAttention": lightning_forward}
