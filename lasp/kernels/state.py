"""How an incoming state enters a run of tokens: the inter-segment half of linear attention.

For the decay families (identity, scalar, diagonal transitions) linear attention is
linear in its initial state, and the state reaches token t through the transitions
before it::

    o(q, k, v; S_in) = o(q, k, v; 0) + scale · (q_t ⊙ exp(Γ_t))ᵀ S_in
    S_out(S_in)      = S_out(0)      + A_run(S_in)

(Γ_t: the cumulative log-decay from the run's first token through t, a scalar or a
K-vector per head), so a segment can be computed from a zero state first and corrected
once the incoming state is known: LASP-2 overlaps the state exchange with the
zero-state part. `state_output` is that correction. It saves nothing for its backward
beyond its inputs (it recomputes the decays), so the correction costs no activation
memory of its own.

The delta rule is affine in its initial state too, `o(S_in) = o(0) + X S_in`, but X (the
queries through the run's dense transitions) comes out of the run itself (the delta
family's affine phases): `dense_state_output` applies it.
"""

from __future__ import annotations

import torch

from lasp.kernels.checks import check_decay, check_state, check_tensor
from lasp.kernels.common.documents import accumulation_dtype, matmul_dtype
from lasp.kernels.transition import Transition

ADDITIVE_KINDS = ("identity", "scalar", "diagonal")


def cumsum_over_time(x, reverse=False):
    """Cumulative sum along dim 1 (time) of [R, T, H, ...], computed along the innermost
    axis: on a GPU a cumsum over a long strided axis runs one sequential thread per
    column (200 ms at 512K tokens), along the last axis it is a parallel scan."""
    moved = x.movedim(1, -1).contiguous()
    if reverse:
        moved = moved.flip(-1)
    out = moved.cumsum(-1)
    return (out.flip(-1) if reverse else out).movedim(-1, 1)


def _query_weights(tokens: Transition, reach, scale, shape, device):
    """scale · exp(Γ_t) · [t < reach] per token: [R, T, H, 1] or [R, T, H, K], float64
    (a float32 running sum over a long run loses the small differences)."""
    R, T, H, _ = shape
    if tokens.kind == "identity":
        weight = torch.full((R, T, H, 1), scale, dtype=torch.float64, device=device)
    else:
        cum = cumsum_over_time(tokens.param.double()).exp()
        weight = scale * (cum[..., None] if tokens.kind == "scalar" else cum)
    if reach is not None:
        inside = torch.arange(T, device=device)[None, :] < reach.to(device)[:, None]
        weight = weight * inside[..., None, None]
    return weight


class _StateOutput(torch.autograd.Function):
    """o_t = (w_t ⊙ q_t)ᵀ S with w_t = scale · exp(Γ_t) · [t < reach] (`_query_weights`).
    A per-head weight scales the product's rows (exact); a per-key one scales q first."""

    @staticmethod
    def forward(ctx, q, state, param, kind, reach, scale):
        tokens = Transition(kind, param)
        acc, mm = accumulation_dtype(q.dtype), matmul_dtype(q.dtype)
        weight = _query_weights(tokens, reach, scale, q.shape, q.device).to(acc)
        if weight.shape[-1] == 1:
            out = torch.einsum("bthk,bhkv->bthv", q.to(mm), state.to(mm)).to(acc) * weight
        else:
            out = torch.einsum("bthk,bhkv->bthv", (q.to(acc) * weight).to(mm), state.to(mm))
        ctx.save_for_backward(q, state, param, reach)
        ctx.kind, ctx.scale = kind, scale
        return out.to(q.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, state, param, reach = ctx.saved_tensors
        tokens = Transition(ctx.kind, param)
        acc, mm = accumulation_dtype(q.dtype), matmul_dtype(q.dtype)
        weight = _query_weights(tokens, reach, ctx.scale, q.shape, q.device)
        q_weighted = q.to(acc) * weight.to(acc)                                  # [R,T,H,K]
        d_q_weighted = torch.einsum("bthv,bhkv->bthk", do.to(mm), state.to(mm)).to(acc)
        dq = (d_q_weighted * weight.to(acc)).to(q.dtype)
        d_state = torch.einsum("bthk,bthv->bhkv", q_weighted.to(mm), do.to(mm)).to(state.dtype)
        d_param = None
        if param is not None and ctx.needs_input_grad[2]:
            # Γ_t = Σ_{u ≤ t} a_u: d a_u = Σ_{t ≥ u} dΓ_t, dΓ_t = (w_t ⊙ q_t) ⊙ dq̃_t.
            d_cum = q_weighted.double() * d_q_weighted.double()
            if ctx.kind == "scalar":
                d_cum = d_cum.sum(-1)
            d_param = cumsum_over_time(d_cum, reverse=True).to(param.dtype)
        return dq, d_state, d_param, None, None, None


def apply_state_output(q, state, tokens: Transition, *, scale, reach=None):
    """`state_output` on validated inputs; `tokens` is the per-token `Transition`
    (parameter [R, T, H] or [R, T, H, K])."""
    if tokens.kind not in ADDITIVE_KINDS:
        raise ValueError(f"a {tokens.kind} transition has no additive state correction")
    return _StateOutput.apply(q, state, tokens.param, tokens.kind, reach, float(scale))


def dense_state_output(x, state, reach=None):
    """What an incoming state adds to a delta-rule run's outputs: x_tᵀ S for t < reach[r]
    (every t without `reach`), x [R, T, H, K] from the delta family's affine phases (the
    incoming state mapped through the run's dense transitions; `lasp.kernels.delta.chunk`),
    state [R, H, K, V]: [R, T, H, V] in their dtype. Differentiable in x and state."""
    out = torch.einsum("rthk,rhkv->rthv", x, state)
    if reach is None:
        return out
    inside = torch.arange(x.shape[1], device=x.device)[None, :] < reach.to(x.device)[:, None]
    return out * inside[..., None, None]


def state_output(q, state, g=None, g_gamma=None, *, gk=None, scale=None, reach=None):
    """What an incoming state adds to each row's outputs: scale · (q_t ⊙ exp(Γ_t))ᵀ S.

    Args:
        q: [B,T,H,K]; state: [B,H,K,V] (one incoming state per row);
        g / g_gamma / gk: the decay of `linear_attention` (at most one; Γ_t is the
            cumulative log-decay from the row's first token through t);
        scale: default K**-0.5;
        reach: optional int tensor [B]: the state reaches only tokens t < reach[b]
            (the row's first packed document), default every token. Device tensor, no sync.
    Returns [B,T,H,V] in q's dtype; differentiable in q, state and the decay.
    """
    check_tensor("q", q, 4)
    check_tensor("state", state, 4)
    if not q.is_floating_point():
        raise TypeError(f"q must be floating, got {q.dtype}")
    tokens = check_decay(q, g=g, g_gamma=g_gamma, gk=gk)
    B, T, H, K = q.shape
    check_state("state", state, (B, H, K, state.shape[-1]))
    if state.device != q.device:
        raise ValueError(f"state must be on {q.device}, got {state.device}")
    if reach is not None:
        check_tensor("reach", reach, 1)
        if reach.shape[0] != B or reach.is_floating_point() or reach.is_complex():
            raise ValueError(f"reach must be an int tensor [B]=[{B}], got {reach.dtype} {tuple(reach.shape)}")
    return apply_state_output(q, state, tokens, scale=K ** -0.5 if scale is None else scale, reach=reach)
