"""How an incoming state enters a segment: the inter-segment half of linear attention.

Linear attention is linear in its initial state::

    o(q, k, v; S_in) = o(q, k, v; 0) + state_output(q, S_in)
    S_out(S_in)      = S_out(0)      + exp(segment_log_decay) · S_in

so a segment can be computed from a zero state first and corrected once the incoming
state is known (LASP-2 overlaps the state exchange with the zero-state part).
"""

from __future__ import annotations

import torch

from lasp.kernels.checks import check_decay, check_state, check_tensor
from lasp.kernels.reference import accumulation_dtype


def _log_decay(g, g_gamma, q):
    """Per-token log-decay [B,T,H] in the accumulation dtype, or None for plain attention."""
    B, T, H, _ = q.shape
    acc = accumulation_dtype(q.dtype)
    if g_gamma is not None:
        return g_gamma.to(acc)[None, None, :].expand(B, T, H)
    return None if g is None else g.to(acc)


def segment_log_decay(q, g=None, g_gamma=None):
    """Log of each row's whole-segment transition, [B,H] (zeros for plain attention).

    `q` supplies only the shape, dtype and device.
    """
    check_decay(g, g_gamma, q, causal=True)
    decay = _log_decay(g, g_gamma, q)
    if decay is None:
        B, _, H, _ = q.shape
        return q.new_zeros(B, H, dtype=accumulation_dtype(q.dtype))
    return decay.sum(1)


def state_output(q, state, g=None, g_gamma=None, *, scale=None, reach=None):
    """What an incoming state adds to each row's outputs: scale · exp(Γ_t) · q_tᵀ S.

    Args:
        q: [B,T,H,K]; state: [B,H,K,V] (one incoming state per row);
        g / g_gamma: the decay of `linear_attention` (Γ_t is the cumulative log-decay
            from the row's first token through t);
        reach: optional int tensor [B]: the state reaches only tokens t < reach[b]
            (the row's first packed document), default every token. Device tensor, no sync.
    Returns [B,T,H,V] in q's dtype; differentiable in q, state and g.
    """
    check_tensor("q", q, 4)
    check_tensor("state", state, 4)
    check_decay(g, g_gamma, q, causal=True)
    B, T, H, K = q.shape
    check_state("state", state, (B, H, K, state.shape[-1]))
    if scale is None:
        scale = K ** -0.5
    acc = accumulation_dtype(q.dtype)
    # 16-bit inputs multiply on the tensor cores (like the kernels' q·h products) with no
    # fp32 copy of q; fp32/64 stay exact. Per-token weights scale the output rows after.
    mm = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else acc
    decay = _log_decay(g, g_gamma, q)
    if decay is None and reach is None:
        return torch.einsum("bthk,bhkv->bthv", q.to(mm), (state.to(acc) * scale).to(mm)).to(q.dtype)
    out = torch.einsum("bthk,bhkv->bthv", q.to(mm), state.to(mm))
    weight = torch.full((B, T, H), scale, dtype=acc, device=q.device)
    if decay is not None:
        # float64 cumsum: over long rows a float32 running sum loses the small differences.
        weight = weight * decay.double().cumsum(1).exp().to(acc)
    if reach is not None:
        inside = torch.arange(T, device=q.device)[None, :] < reach.to(q.device)[:, None]
        weight = weight * inside[..., None]
    return (out.to(acc) * weight[..., None]).to(q.dtype)
