"""Triton kernels of GLA's per-key decay (`gk`): forward and backward.

Per head the recurrence is (DESIGN.md §1)::

    S_t = diag(exp(gk_t)) S_{t-1} + k_t v_tᵀ          o_t = scale · q_tᵀ S_t

The same span walks as the scalar family (`lasp.kernels.scalar.triton`): every span of a
few chunks is walked by its own programs, and only the scan over span summaries
(`lasp.kernels.common.scan`, per-key mode) is sequential. Per chunk, with Γ the
chunk-local inclusive cumulative log-decay ([C, K]) and γ = Γ at the chunk's last token:

    o     = scale [(q ⊙ e^Γ) S_in + A v],   A_ts = Σ_k q_tk k_sk e^{Γ_tk − Γ_sk} (s ≤ t)
    S_out = e^γ ⊙ S_in + (k ⊙ e^{γ−Γ})ᵀ v

A per-key decay makes A elementwise over K. When every key dimension of the chunk decays
by less than e^{-SAFE} in total (the common case) A is one tensor-core product
`(q ⊙ e^Γ)(k ⊙ e^{−Γ})ᵀ`, whose factors stay finite (|Γ| < SAFE); otherwise the chunk takes
the exact path, elementwise over K with every exponent masked to ≤ 0 before the exp, so
strong decays (gk ~ −30 per token) stay finite and exact. The choice is made per chunk on
the device (no host sync). The intra-chunk products of the backward
(`dq ∋ (dp ⊙ M) k`, `dk ∋ (dp ⊙ M)ᵀ q`) follow the same rule.

Forward: `_summary_kernel` (span-local states U_s and the span's log-decay per key) →
scan → `_output_kernel`. Backward: `_dq_kernel` (dq, the span-local state gradients) →
reverse scan → `_dkdv_kernel` (dk, dv; dgk).

dgk is chunk-local, which keeps bf16 rounding from being amplified by long cancelling
sums: treating Γ of each chunk as free variables,

    dΓ_t = q_t ⊙ dq_t − k_t ⊙ dk_t  (+ Σ_v S_out ⊙ dS_out at the chunk's last token)
    dgk_u = Σ_{t ≥ u in u's chunk} dΓ_t

where S_out / dS_out are the state leaving the chunk and its gradient. Its sums still
cancel within a chunk, so when gk requires grad (DG) the products that enter them add
back their bf16 rounding residuals in extra dots (`_residual`): the intra-chunk factors,
the chunk states the dq walk stores and the state gradient dk reads. The dq walk
(forward, it recomputes every state) writes q ⊙ dq into the dgk buffer and each chunk's
outgoing state into a buffer of one fp32 K×V state per chunk (only when gk requires
grad: its memory is T/C · H · K · V · 4 bytes); the dk/dv walk (backward, it carries
dS) finishes dgk in place. These states stay fp32 for every input dtype: stored in bf16
(as the scalar family's, `scalar.triton.chunk_state_dtype`) gk's fwd+bwd took 5.90 ms
against 6.29 at 1×32K on an H100, but dgk's error against the fp32 oracle rose from
1.55e-3 to 2.30–2.87e-3 (bound 3e-3; diagonal_gpu_bf16_states_rejected_h100_2026-12-07-s11).

MoM's routed copies (`lasp.kernels.triton_mom`) run on these kernels as on the scalar
family's: a row weight w makes the output w_t·o_t, applied in fp32 inside the walks
(the backward never receives w·do rounded), and a query gather reads each position's
query and output gradient from its token's row (`rows`), so no copies of q or do exist.

No host synchronisation: grids depend on shapes only; packed documents use the device
span table (`lasp.kernels.common.plan`). States and accumulators are fp32; `tl.dot`
operands are in the input dtype. Launch parameters: the `diagonal.*` rows of
`lasp.kernels.common.launch.LAUNCH`.
"""

from __future__ import annotations

from functools import partial

import torch
import triton
import triton.language as tl

from lasp.kernels.common import launch, span_phases
from lasp.kernels.common.launch import LAUNCH, chunk_for_head_dims, launch_kw, tile
from lasp.kernels.common.plan import SpanPlan, span_chunk_slots
from lasp.kernels.common.scan import scan_spans
from lasp.kernels.common.tiles import (FACTORED_LOG_DECAY, factored, load_tile, query_rows, span_range, state_ptrs,
                                       store_tile)

# The fast path's bound on a chunk's total log-decay (`tiles.factored`): its factors e^{±Γ}
# stay below e^SAFE, in the input dtype (fp16 reaches only 65504, hence its smaller bound).
SAFE_LOG_DECAY = {torch.float16: 8.0}


# --------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------


@triton.jit
def _chunk_log_decay(gk, offs_t, mask_t, h, offs_k, K: tl.constexpr, H: tl.constexpr):
    """Chunk-local inclusive cumulative log-decay Γ [C, BK] and γ [BK]: padded tokens and
    key dims load gk = 0, so Γ stays flat after the chunk's last real token."""
    b_g = load_tile(gk, offs_t, mask_t, h, offs_k, K, H)
    return tl.cumsum(b_g, axis=0), tl.sum(b_g, axis=0)


@triton.jit
def _row(x, rows, r):
    """Row r of a [C, D] register tile, as [D]."""
    return tl.sum(tl.where((rows == r)[:, None], x, 0.0), axis=0)


@triton.jit
def _residual(exact, rounded):
    """What rounding `exact` (fp32) to `rounded` lost, in the dot dtype: a second dot with
    it makes a product exact to about 16 mantissa bits."""
    return (exact - rounded.to(tl.float32)).to(rounded.dtype)


@triton.jit
def _exact_scores(a, b, gam, C: tl.constexpr):
    """[C, C] M_ts = Σ_k a_tk b_sk e^{Γ_tk − Γ_sk} for s ≤ t, else 0; elementwise in fp32,
    the exponent masked to s ≤ t (so ≤ 0) before the exp."""
    rows = tl.arange(0, C)
    out = tl.zeros([C, C], dtype=tl.float32)
    for s in range(C):
        decay = tl.exp(tl.where((rows >= s)[:, None], gam - _row(gam, rows, s)[None, :], float("-inf")))
        column = tl.sum(a * _row(b, rows, s)[None, :] * decay, axis=1)
        out += tl.where((rows == s)[None, :], column[:, None], 0.0)
    return out


@triton.jit
def _exact_apply(w, b, gam, C: tl.constexpr):
    """[C, BK] out_t = Σ_{s ≤ t} w_ts b_s ⊙ e^{Γ_t − Γ_s}, elementwise (as `_exact_scores`)."""
    rows = tl.arange(0, C)
    out = tl.zeros(b.shape, dtype=tl.float32)
    for s in range(C):
        decay = tl.exp(tl.where((rows >= s)[:, None], gam - _row(gam, rows, s)[None, :], float("-inf")))
        w_s = tl.sum(tl.where((rows == s)[None, :], w, 0.0), axis=1)
        out += w_s[:, None] * _row(b, rows, s)[None, :] * decay
    return out


@triton.jit
def _exact_apply_t(w, a, gam, C: tl.constexpr):
    """[C, BK] out_s = Σ_{t ≥ s} w_ts a_t ⊙ e^{Γ_t − Γ_s}, elementwise (as `_exact_scores`)."""
    rows = tl.arange(0, C)
    out = tl.zeros(a.shape, dtype=tl.float32)
    for t in range(C):
        decay = tl.exp(tl.where((rows <= t)[:, None], _row(gam, rows, t)[None, :] - gam, float("-inf")))
        out += _row(w, rows, t)[:, None] * _row(a, rows, t)[None, :] * decay
    return out


@triton.jit
def _scores(b_q, b_qd, b_k, gam, last, SAFE: tl.constexpr, C: tl.constexpr):
    """A [C, C] fp32 (module docstring), causal-masked. `b_qd` = q ⊙ e^Γ in the dot dtype.
    The fast path multiplies fp32 factors (TF32 on GPUs): two bf16 roundings of the
    factors would cost the outputs ~1e-3 of relative error."""
    if factored(last, SAFE):
        b_ki = b_k.to(tl.float32) * tl.exp(-gam)
        rows = tl.arange(0, C)
        A = tl.where(rows[:, None] >= rows[None, :], tl.dot(b_q.to(tl.float32) * tl.exp(gam), tl.trans(b_ki)), 0.0)
    else:
        A = _exact_scores(b_q.to(tl.float32), b_k.to(tl.float32), gam, C)
    return A


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _summary_kernel(k, v, gk, span_bounds, U, G_span, T, SPAN_TOKENS, SPANS_PER_ROW,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, VARLEN: tl.constexpr):
    """U_s = span s's state from zero, for one (K-tile, V-tile); G_s[k] = Σ gk over s."""
    NV: tl.constexpr = triton.cdiv(V, BV)
    n_tiles: tl.constexpr = triton.cdiv(K, BK) * NV
    tile = tl.program_id(0) % n_tiles
    s = tl.program_id(0) // n_tiles
    h = tl.program_id(1)
    offs_k = (tile // NV) * BK + tl.arange(0, BK)
    offs_v = (tile % NV) * BV + tl.arange(0, BV)
    start, end = span_range(span_bounds, s, T, SPAN_TOKENS, SPANS_PER_ROW, VARLEN)

    state = tl.zeros([BK, BV], dtype=tl.float32)
    g_total = tl.zeros([BK], dtype=tl.float32)
    for i in range(tl.cdiv(end - start, C)):
        offs_t = start + i * C + tl.arange(0, C)
        mask_t = offs_t < end
        b_k = load_tile(k, offs_t, mask_t, h, offs_k, K, H)
        b_v = load_tile(v, offs_t, mask_t, h, offs_v, V, H)
        gam, last = _chunk_log_decay(gk, offs_t, mask_t, h, offs_k, K, H)
        b_kd = (b_k * tl.exp(last[None, :] - gam)).to(b_v.dtype)
        state = tl.dot(tl.trans(b_kd), b_v, state * tl.exp(last)[:, None])
        g_total += last

    ptrs, mask = state_ptrs(U, s, h, offs_k, offs_v, H, K, V)
    tl.store(ptrs, state, mask=mask)
    if tile % NV == 0:
        tl.store(G_span + (s.to(tl.int64) * H + h) * K + offs_k, g_total, mask=offs_k < K)


@triton.jit
def _output_kernel(q, k, v, gk, w, rows, span_bounds, H_in, o, scale, T, SPAN_TOKENS, SPANS_PER_ROW,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, SAFE: tl.constexpr, ROW_WEIGHT: tl.constexpr,
                   GATHER: tl.constexpr, VARLEN: tl.constexpr):
    """Outputs of span s for one V-tile (all of K), from the span's incoming state.
    ROW_WEIGHT scales each token's output by w[token] (fp32) before it is stored; GATHER
    reads position t's query from row rows[t] of q."""
    NV: tl.constexpr = triton.cdiv(V, BV)
    s = tl.program_id(0) // NV
    h = tl.program_id(1)
    offs_k = tl.arange(0, BK)
    offs_v = (tl.program_id(0) % NV) * BV + tl.arange(0, BV)
    start, end = span_range(span_bounds, s, T, SPAN_TOKENS, SPANS_PER_ROW, VARLEN)

    ptrs, mask = state_ptrs(H_in, s, h, offs_k, offs_v, H, K, V)
    state = tl.load(ptrs, mask=mask, other=0.0)
    for i in range(tl.cdiv(end - start, C)):
        offs_t = start + i * C + tl.arange(0, C)
        mask_t = offs_t < end
        b_q = load_tile(q, query_rows(rows, offs_t, mask_t, GATHER), mask_t, h, offs_k, K, H)
        b_k = load_tile(k, offs_t, mask_t, h, offs_k, K, H)
        b_v = load_tile(v, offs_t, mask_t, h, offs_v, V, H)
        gam, last = _chunk_log_decay(gk, offs_t, mask_t, h, offs_k, K, H)
        b_qd = (b_q * tl.exp(gam)).to(b_v.dtype)
        b_o = tl.dot(b_qd, state.to(b_v.dtype))
        A = _scores(b_q, b_qd, b_k, gam, last, SAFE, C)
        b_o = tl.dot(A.to(b_v.dtype), b_v, b_o) * scale
        if ROW_WEIGHT:
            b_o *= tl.load(w + offs_t, mask=mask_t, other=0.0)[:, None]
        store_tile(o, b_o, offs_t, mask_t, h, offs_v, V, H)
        b_kd = (b_k * tl.exp(last[None, :] - gam)).to(b_v.dtype)
        state = tl.dot(tl.trans(b_kd), b_v, state * tl.exp(last)[:, None])


@triton.jit
def _dq_kernel(q, k, v, gk, w, rows, do, span_bounds, H_in, dq, dU, q_dq, dB_w, chunk_states, span_chunk0,
               scale, T, SPAN_TOKENS, SPANS_PER_ROW,
               H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr, SAFE: tl.constexpr, DG: tl.constexpr,
               ROW_WEIGHT: tl.constexpr, GATHER: tl.constexpr, VARLEN: tl.constexpr):
    """dq of span s for one K-tile (all of V), and the span's local state gradient
    dU_s = scale Σ_t (q_t ⊙ e^{Γ^span_t}) do_tᵀ (Γ^span from the span's start).

    DG (gk's gradient wanted): also writes q ⊙ dq (fp32) to `q_dq` [tokens, H, K] and each
    chunk's outgoing state to `chunk_states` [slot, H, K, V] (slot = span_chunk0[s] + i).

    ROW_WEIGHT (MoM): the output was w ⊙ o, so the cotangent of o is w_t·do_t, applied in
    fp32 to dp's rows, dq and the weights of dU. This K-tile's share of Σ_k q⊙dq goes to
    dB_w[token, head, K-tile] (for w's gradient); a zero weight's row is walked with
    weight 1 there, so that dB_w holds <do, o>, and its dq (and q ⊙ dq) is zeroed when
    stored (as the scalar family's dq walk). GATHER: position t's q and do are row
    rows[t] of q, do.
    """
    NK: tl.constexpr = triton.cdiv(K, BK)
    kt = tl.program_id(0) % NK
    s = tl.program_id(0) // NK
    h = tl.program_id(1)
    offs_k = kt * BK + tl.arange(0, BK)
    offs_v = tl.arange(0, BV)
    start, end = span_range(span_bounds, s, T, SPAN_TOKENS, SPANS_PER_ROW, VARLEN)
    causal = tl.arange(0, C)[:, None] >= tl.arange(0, C)[None, :]
    if DG:
        first_chunk = tl.load(span_chunk0 + s)

    ptrs, mask = state_ptrs(H_in, s, h, offs_k, offs_v, H, K, V)
    state = tl.load(ptrs, mask=mask, other=0.0)
    d_state = tl.zeros([BK, BV], dtype=tl.float32)
    g_before = tl.zeros([BK], dtype=tl.float32)  # log-decay from the span's start to the chunk's
    for i in range(tl.cdiv(end - start, C)):
        offs_t = start + i * C + tl.arange(0, C)
        mask_t = offs_t < end
        q_rows = query_rows(rows, offs_t, mask_t, GATHER)
        b_q = load_tile(q, q_rows, mask_t, h, offs_k, K, H)
        b_k = load_tile(k, offs_t, mask_t, h, offs_k, K, H)
        b_v = load_tile(v, offs_t, mask_t, h, offs_v, V, H)
        b_do = load_tile(do, q_rows, mask_t, h, offs_v, V, H).to(b_v.dtype)
        gam, last = _chunk_log_decay(gk, offs_t, mask_t, h, offs_k, K, H)
        dp = tl.where(causal, tl.dot(b_do, tl.trans(b_v)) * scale, 0.0)
        state_in = state.to(b_v.dtype)
        b_dq = tl.dot(b_do, tl.trans(state_in))
        if DG:
            b_dq = tl.dot(b_do, tl.trans(_residual(state, state_in)), b_dq)
        b_dq *= tl.exp(gam) * scale
        if ROW_WEIGHT:
            b_w = tl.load(w + offs_t, mask=mask_t, other=0.0)
            walk_w = tl.where(b_w != 0.0, b_w, 1.0)
            dp *= walk_w[:, None]
            b_dq *= walk_w[:, None]
        if factored(last, SAFE):
            b_ki32 = b_k.to(tl.float32) * tl.exp(-gam)
            b_ki = b_ki32.to(b_v.dtype)
            dq_intra = tl.dot(dp.to(b_v.dtype), b_ki)
            if DG:
                dq_intra = tl.dot(dp.to(b_v.dtype), _residual(b_ki32, b_ki), dq_intra)
            b_dq += dq_intra * tl.exp(gam)
        else:
            b_dq += _exact_apply(dp, b_k.to(tl.float32), gam, C)
        if ROW_WEIGHT:
            tl.store(dB_w + (offs_t * H + h) * NK + kt, tl.sum(b_q.to(tl.float32) * b_dq, axis=1), mask=mask_t)
            b_dq = tl.where((b_w != 0.0)[:, None], b_dq, 0.0)
        store_tile(dq, b_dq, offs_t, mask_t, h, offs_k, K, H)
        b_kd32 = b_k * tl.exp(last[None, :] - gam)
        b_kd = b_kd32.to(b_v.dtype)
        state = tl.dot(tl.trans(b_kd), b_v, state * tl.exp(last)[:, None])
        if DG:
            state = tl.dot(tl.trans(_residual(b_kd32, b_kd)), b_v, state)
            store_tile(q_dq, b_q.to(tl.float32) * b_dq, offs_t, mask_t, h, offs_k, K, H)
            ptrs, mask = state_ptrs(chunk_states, first_chunk + i, h, offs_k, offs_v, H, K, V)
            tl.store(ptrs, state, mask=mask)
        b_qs = b_q * tl.exp(gam + g_before[None, :])
        if ROW_WEIGHT:
            b_qs *= b_w[:, None]
        d_state = tl.dot(tl.trans(b_qs.to(b_v.dtype)), b_do, d_state)
        g_before += last

    ptrs, mask = state_ptrs(dU, s, h, offs_k, offs_v, H, K, V)
    tl.store(ptrs, d_state * scale, mask=mask)


@triton.jit
def _dkdv_kernel(q, k, v, gk, w, rows, do, span_bounds, dH_out, dk, dv, dgk, chunk_states, span_chunk0, scale,
                 T, SPAN_TOKENS, SPANS_PER_ROW,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                 BK: tl.constexpr, BV: tl.constexpr, SAFE: tl.constexpr, DO_DK: tl.constexpr,
                 DO_DV: tl.constexpr, DG: tl.constexpr, ROW_WEIGHT: tl.constexpr, GATHER: tl.constexpr,
                 VARLEN: tl.constexpr):
    """dk and/or dv of span s, walking its chunks backwards from its outgoing gradient.

    The carried dS is the gradient w.r.t. the state leaving the current chunk:
    dS ← e^γ ⊙ dS + scale (q ⊙ e^Γ)ᵀ do. dv needs all of K (tiles over V), dk all of V
    (tiles over K). DG (with DO_DK): `dgk` holds q ⊙ dq from the dq walk and is finished
    in place, chunk-locally (module docstring), from the chunk states the dq walk stored.
    ROW_WEIGHT (as in the dq walk) scales the query rows of the chunk's score matrices and
    the weights of dS by w, in fp32; GATHER reads q and do as the dq walk does.
    """
    NV: tl.constexpr = triton.cdiv(V, BV)
    n_tiles: tl.constexpr = triton.cdiv(K, BK) * NV
    tile = tl.program_id(0) % n_tiles
    s = tl.program_id(0) // n_tiles
    h = tl.program_id(1)
    offs_k = (tile // NV) * BK + tl.arange(0, BK)
    offs_v = (tile % NV) * BV + tl.arange(0, BV)
    start, end = span_range(span_bounds, s, T, SPAN_TOKENS, SPANS_PER_ROW, VARLEN)
    causal = tl.arange(0, C)[:, None] >= tl.arange(0, C)[None, :]
    if DG:
        first_chunk = tl.load(span_chunk0 + s)

    ptrs, mask = state_ptrs(dH_out, s, h, offs_k, offs_v, H, K, V)
    d_state = tl.load(ptrs, mask=mask, other=0.0)
    n_chunks = tl.cdiv(end - start, C)
    for j in range(n_chunks):
        c = n_chunks - 1 - j
        offs_t = start + c * C + tl.arange(0, C)
        mask_t = offs_t < end
        q_rows = query_rows(rows, offs_t, mask_t, GATHER)
        b_q = load_tile(q, q_rows, mask_t, h, offs_k, K, H)
        b_k = load_tile(k, offs_t, mask_t, h, offs_k, K, H)
        b_v = load_tile(v, offs_t, mask_t, h, offs_v, V, H)
        b_do = load_tile(do, q_rows, mask_t, h, offs_v, V, H).to(b_v.dtype)
        gam, last = _chunk_log_decay(gk, offs_t, mask_t, h, offs_k, K, H)
        b_qd = (b_q * tl.exp(gam)).to(b_v.dtype)
        to_end = tl.exp(last[None, :] - gam)
        d_state_in = d_state.to(b_v.dtype)
        if ROW_WEIGHT:
            b_w = tl.load(w + offs_t, mask=mask_t, other=0.0)
        if DO_DV:
            A = _scores(b_q, b_qd, b_k, gam, last, SAFE, C) * scale
            if ROW_WEIGHT:
                A *= b_w[:, None]
            b_kd = (b_k * to_end).to(b_v.dtype)
            b_dv = tl.dot(tl.trans(A.to(b_v.dtype)), b_do, tl.dot(b_kd, d_state_in))
            store_tile(dv, b_dv, offs_t, mask_t, h, offs_v, V, H)
        if DO_DK:
            dp = tl.where(causal, tl.dot(b_do, tl.trans(b_v)) * scale, 0.0)
            if ROW_WEIGHT:
                dp *= b_w[:, None]
            b_dk = tl.dot(b_v, tl.trans(d_state_in))
            if DG:
                b_dk = tl.dot(b_v, tl.trans(_residual(d_state, d_state_in)), b_dk)
            b_dk *= to_end
            if factored(last, SAFE):
                dk_intra = tl.dot(tl.trans(dp.to(b_v.dtype)), b_qd)
                if DG:
                    dk_intra = tl.dot(tl.trans(dp.to(b_v.dtype)), _residual(b_q * tl.exp(gam), b_qd), dk_intra)
                b_dk += dk_intra * tl.exp(-gam)
            else:
                b_dk += _exact_apply_t(dp, b_q.to(tl.float32), gam, C)
            store_tile(dk, b_dk, offs_t, mask_t, h, offs_k, K, H)
            if DG:
                ptrs, mask = state_ptrs(chunk_states, first_chunk + c, h, offs_k, offs_v, H, K, V)
                state_term = tl.sum(tl.load(ptrs, mask=mask, other=0.0) * d_state, axis=1)
                d_gam = load_tile(dgk, offs_t, mask_t, h, offs_k, K, H) - b_k.to(tl.float32) * b_dk
                suffix = tl.sum(d_gam, axis=0)[None, :] - tl.cumsum(d_gam, axis=0) + d_gam
                store_tile(dgk, suffix + state_term[None, :], offs_t, mask_t, h, offs_k, K, H)
        if ROW_WEIGHT:
            b_qd = (b_q * tl.exp(gam) * b_w[:, None]).to(b_v.dtype)
        d_state = d_state * tl.exp(last)[:, None] + tl.dot(tl.trans(b_qd), b_do) * scale


# --------------------------------------------------------------------------------------
# Host side: launches (the phases and autograd: lasp.kernels.common.span_phases)
# --------------------------------------------------------------------------------------


def _safe_log_decay(dtype) -> float:
    return SAFE_LOG_DECAY.get(dtype, FACTORED_LOG_DECAY)


def _forward_states(k, v, gk, h0, plan: SpanPlan):
    """Summary and scan launches: every span's incoming state (overwriting its summary),
    the spans' log-decays [NS, H, K] and each document's final state."""
    H, K, V, NS = plan.H, plan.K, plan.V, plan.n_spans
    span_bounds, sizes = plan.span_args(k)
    states = launch.new_tensor((NS, H, K, V), torch.float32, k.device)
    g_span = launch.new_tensor((NS, H, K), torch.float32, k.device)
    BK, BV = (min(LAUNCH["diagonal.summary"].block, triton.next_power_of_2(dim)) for dim in (K, V))
    _summary_kernel[(triton.cdiv(K, BK) * triton.cdiv(V, BV) * NS, H)](
        k, v, gk, span_bounds, states, g_span, *sizes, H=H, K=K, V=V, C=plan.chunk, BK=BK, BV=BV,
        VARLEN=plan.varlen, **launch_kw("diagonal.summary", max(plan.K, plan.V)))
    final = launch.new_tensor((plan.n_docs, H, K, V), torch.float32, k.device)
    scan_spans(states, g_span, h0, final, plan, reverse=False)
    return states, g_span, final


def _forward_output(q, k, v, gk, w, rows, states, scale, plan: SpanPlan):
    """Output launch: every span walked again from its incoming state (rows scaled by
    the row weight `w` when given; queries gathered by `rows` when given, the output then
    fp32)."""
    H, K, V, NS = plan.H, plan.K, plan.V, plan.n_spans
    span_bounds, sizes = plan.span_args(q)
    o = launch.new_tensor((plan.B, plan.T, H, V), q.dtype if rows is None else torch.float32, q.device)
    BK, BV = triton.next_power_of_2(K), tile("diagonal.output", V, K)
    _output_kernel[(triton.cdiv(V, BV) * NS, H)](
        q, k, v, gk, q if w is None else w, q if rows is None else rows, span_bounds, states, o, scale, *sizes,
        H=H, K=K, V=V, C=plan.chunk, BK=BK, BV=BV, SAFE=_safe_log_decay(q.dtype), ROW_WEIGHT=w is not None,
        GATHER=rows is not None, VARLEN=plan.varlen, **launch_kw("diagonal.output", max(plan.K, plan.V)))
    return o


def _backward_dq(q, k, v, gk, w, rows, do, states, scale, plan: SpanPlan, decay_grad: bool):
    """dq launch: dq (per position and fp32 with `rows`), every span's local state
    gradient, for a row weight `w` dB_w (Σ_k q ⊙ dq per token, head and K-tile; else
    None), and for dgk (`decay_grad`) the buffer holding q ⊙ dq, the chunk states and each
    span's first chunk slot (else None)."""
    H, K, V, NS = plan.H, plan.K, plan.V, plan.n_spans
    dev = q.device
    span_bounds, sizes = plan.span_args(q)
    BK, BV = tile("diagonal.dq", K, V), triton.next_power_of_2(V)
    n_k_tiles = triton.cdiv(K, BK)
    dq = launch.new_tensor(k.shape, q.dtype if rows is None else torch.float32, dev)
    d_states = launch.new_tensor((NS, H, K, V), torch.float32, dev)
    q_dq = chunk_states = span_chunk0 = None
    if decay_grad:
        span_chunk0, n_slots = span_chunk_slots(plan, dev)
        q_dq = launch.new_tensor(k.shape, torch.float32, dev)
        chunk_states = launch.new_tensor((n_slots, H, K, V), torch.float32, dev)
    dB_w = None if w is None else launch.new_tensor((plan.tokens, H, n_k_tiles), torch.float32, dev)
    _dq_kernel[(n_k_tiles * NS, H)](
        q, k, v, gk, q if w is None else w, q if rows is None else rows, do, span_bounds, states, dq, d_states,
        q if q_dq is None else q_dq, q if dB_w is None else dB_w, q if chunk_states is None else chunk_states,
        q if span_chunk0 is None else span_chunk0, scale, *sizes,
        H=H, K=K, V=V, C=plan.chunk, BK=BK, BV=BV, SAFE=_safe_log_decay(q.dtype), DG=decay_grad,
        ROW_WEIGHT=w is not None, GATHER=rows is not None, VARLEN=plan.varlen,
        **launch_kw("diagonal.dq", max(plan.K, plan.V)))
    return dq, d_states, dB_w, (q_dq, chunk_states, span_chunk0) if decay_grad else None


def _backward_kvg(q, k, v, gk, w, rows, do, d_final, d_states, g_span, dgk_parts, scale, want_dh0, want_dg,
                  plan: SpanPlan, fuse_dkdv: bool):
    """Reverse scan (from d final_state) and dk/dv launches (dgk finished in place):
    returns dk, dv, dgk (or None), d initial_state (or None). `d_states` is overwritten."""
    H, K, V, NS = plan.H, plan.K, plan.V, plan.n_spans
    dev = q.device
    span_bounds, sizes = plan.span_args(q)
    q_dq, chunk_states, span_chunk0 = dgk_parts or (None, None, None)
    if want_dg and q_dq is None:
        raise RuntimeError("dgk was asked for, but gk did not require grad when the call was planned")

    dh0 = launch.new_tensor((plan.n_docs, H, K, V), torch.float32, dev) if want_dh0 else None
    scan_spans(d_states, g_span, d_final, dh0, plan, reverse=True)

    dk = launch.new_tensor(k.shape, k.dtype, dev)
    dv = launch.new_tensor(v.shape, v.dtype, dev)
    PK, PV = triton.next_power_of_2(K), triton.next_power_of_2(V)
    args = (q, k, v, gk, q if w is None else w, q if rows is None else rows, do, span_bounds, d_states, dk, dv,
            q if q_dq is None else q_dq, q if chunk_states is None else chunk_states,
            q if span_chunk0 is None else span_chunk0, scale, *sizes)
    row = "diagonal.dkdv" if max(K, V) <= 128 and q.element_size() <= 2 else "diagonal.dkdv_wide"
    common = dict(H=H, K=K, V=V, C=plan.chunk, SAFE=_safe_log_decay(q.dtype), DG=want_dg, ROW_WEIGHT=w is not None,
                  GATHER=rows is not None, VARLEN=plan.varlen, **launch_kw(row, max(plan.K, plan.V)))
    if fuse_dkdv:
        _dkdv_kernel[(NS, H)](*args, BK=PK, BV=PV, DO_DK=True, DO_DV=True, **common)
    else:
        BK, BV = tile(row, K, V), tile(row, V, K)
        _dkdv_kernel[(triton.cdiv(V, BV) * NS, H)](*args, BK=PK, BV=BV, DO_DK=False, DO_DV=True, **common)
        _dkdv_kernel[(triton.cdiv(K, BK) * NS, H)](*args, BK=BK, BV=PV, DO_DK=True, DO_DV=False, **common)
    return dk, dv, q_dq if want_dg else None, dh0


LAUNCHES = span_phases.SpanLaunches(_forward_states, _forward_output, _backward_dq, _backward_kvg,
                                    default_chunk=partial(chunk_for_head_dims, "diagonal"), family="diagonal")


def triton_phases(q, k, v, g, scale, initial_state, cu_seqlens, **knobs):
    """`span_phases.triton_phases` on this family's kernels (g: gk [B,T,H,K])."""
    return span_phases.triton_phases(LAUNCHES, q, k, v, g, scale, initial_state, cu_seqlens, **knobs)


def triton_linear_attention(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, **knobs):
    """`span_phases.triton_linear_attention` on this family's kernels: g the per-key
    log-decay [B,T,H,K] (≤ 0), fla's `gk`; knobs row_weight, chunk_size (None:
    `common.launch.chunk_for_head_dims`), span_chunks, fuse_dkdv."""
    return span_phases.triton_linear_attention(LAUNCHES, q, k, v, g, scale, initial_state, output_final_state,
                                               cu_seqlens, **knobs)


def linear_attention(q, k, v, g, *, scale, initial_state=None, output_final_state=False, cu_seqlens=None,
                     causal=True):
    """The family's entry for `lasp.kernels.linear_attention` (validated arguments, causal;
    `g` the per-key log-decay [B,T,H,K]): `triton_linear_attention`."""
    return triton_linear_attention(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def phases(q, k, v, g, *, scale, initial_state=None, cu_seqlens=None, causal=True):
    """The family's entry for `lasp.kernels.linear_attention_phases` (causal): `triton_phases`."""
    return triton_phases(q, k, v, g, scale, initial_state, cu_seqlens)
