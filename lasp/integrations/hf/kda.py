"""Kimi Linear (``kimi_linear``) under lasp: its KDA layers through lasp's delta-rule kernels.

`KimiLinearDeltaAttention` (Kimi Delta Attention), on the HF module's own parameters:

    q, k, v = act(conv([q_proj x, k_proj x, v_proj x]))    short conv: SP halo, documents kept apart
    q, k    = q / ‖q‖, k / ‖k‖ per head                      (the op scales q by K^-½)
    β       = σ(b_proj x)
    gk      = −exp(A_log[h]) · softplus(f_b(f_a x) + dt_bias)    one log-decay per key dim, head, token
    o       = delta rule with decay gk (`linear_attention_op`: LASP-2 across the group)
    out     = o_proj(weight · o / rms(o) ⊙ σ(g_b(g_a x)))       per-head gated RMSNorm

Its softmax layers (`KimiLinearAttention`, MLA without RoPE: query/key heads wider than the
value heads) need no adapter: they call the ``"lasp_sp"`` attention function, and LASP-2H
and the softmax kernels take values of another head dim.

The MoE router (`KimiLinearTopkRouter`) routes in at least fp32 instead of exactly fp32:
the same for fp32 and half models, while a float64 model routes in float64. transformers'
fp32 router rounds differently for different token counts (vectorised sigmoid), so without
this a float64 model's gradients under sequence parallelism would match one rank only to
fp32 precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from lasp.integrations.hf.context import check_training_call, context_of
from lasp.layers.conv import short_conv
from lasp.layers.delta_rule import gated_log_decay, l2_normalize
from lasp.layers.norm import gated_rms_norm
from lasp.layers.ops import linear_attention_op

MODEL_TYPES = ("kimi_linear",)


def kda_log_decay(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, head_dim: int) -> torch.Tensor:
    """KDA's per-key log-decay −exp(A_log[h]) · softplus(a + dt_bias), [B, T, H, head_dim]
    (`gated_log_decay`): a [B, T, H·head_dim] (the low-rank projection f_b(f_a x)); A_log: H
    values (any shape); dt_bias: [H·head_dim]. softplus is linear above 20, as
    KimiLinearForgetGate's."""
    per_key = (-1, head_dim)
    return gated_log_decay(a.unflatten(-1, per_key), A_log.reshape(-1, 1), dt_bias.unflatten(-1, per_key))


def forward(self, hidden_states: torch.Tensor, cache=None, attention_mask=None, **kwargs) -> torch.Tensor:
    """`KimiLinearDeltaAttention.forward` on lasp's kernels: [B, T_local, hidden] → [B, T_local, hidden]
    (module docstring). Training only: no cache; packed documents come from the model's
    `HFContext`, never from a padding mask."""
    context = context_of(self)
    check_training_call(self, cache, attention_mask, **kwargs)
    B, T, _ = hidden_states.shape
    H, K = self.num_heads, self.head_dim
    op_kwargs = context.op_kwargs(T)
    x = hidden_states
    mixed = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1)
    mixed = ACT2FN[self.activation](short_conv(mixed, self.conv1d.weight[:, 0], self.conv1d.bias, **op_kwargs))
    q, k, v = (t.unflatten(-1, (H, K)) for t in mixed.split(self.qkv_dim, -1))
    gate = self.forget_gate
    gk = kda_log_decay(gate.f_b_proj(gate.f_a_proj(x)), gate.A_log, gate.dt_bias, K)
    beta = torch.sigmoid(self.b_proj(x))
    o = linear_attention_op(l2_normalize(q), l2_normalize(k), v, gk=gk, beta=beta, scale=K ** -0.5, **op_kwargs)
    o = gated_rms_norm(o, self.g_b_proj(self.g_a_proj(x)).unflatten(-1, (H, K)), self.o_norm.weight,
                       eps=self.o_norm.variance_epsilon, norm_before_gate=True, activation=torch.sigmoid)
    return self.o_proj(o.reshape(B, T, H * K))


def router_forward(self, hidden_states: torch.Tensor):
    """`KimiLinearTopkRouter.forward` in at least fp32 (module docstring): sigmoid scores, the
    best `topk_group` expert groups by their top-2 corrected scores, the top-k experts inside
    them, weights renormalised and scaled → (router_logits, topk_weights, topk_indices)."""
    dtype = torch.promote_types(hidden_states.dtype, torch.float32)
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.to(dtype), self.weight.to(dtype))
    scores = router_logits.sigmoid()
    scores_for_choice = scores + self.e_score_correction_bias
    grouped = scores_for_choice.view(-1, self.num_group, self.num_experts // self.num_group)
    group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, self.num_experts)
    scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
    topk_indices = torch.topk(scores_for_choice, k=self.top_k, dim=-1, sorted=False)[1]
    topk_weights = scores.gather(1, topk_indices)
    if self.norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return router_logits, topk_weights * self.routed_scaling_factor, topk_indices


ADAPTERS = {"KimiLinearDeltaAttention": forward, "KimiLinearTopkRouter": router_forward}
