"""Triton kernels of plain linear attention and of a scalar decay: forward and backward.

Per head the recurrence is (DESIGN.md §1)::

    S_t = exp(g_t) S_{t-1} + k_t v_tᵀ          o_t = scale · q_tᵀ S_t

Work is cut into chunks of C tokens and *spans* of a few consecutive chunks; neither
crosses a document boundary (`lasp.kernels.common.plan`). The summary idea of LASP-2 is
used inside the GPU so that one long document still fills every SM: instead of walking
all chunks of a document in B·H programs (the sequential state pass of chunkwise
kernels), every span is walked by its own programs and only a tiny scan over span
summaries is sequential.

Forward (three launches):

Span kernels run one program per (span, tile) on grid axis 0, tiles of a span adjacent so
that they share its chunk loads through L2, and per head on axis 1.

1. `_fwd_summary_kernel`, one program per (span, head, K-tile, V-tile): walks the span's
   chunks from a zero state and writes the span's local state `U_s` and its log-decay
   `G_s` (sum of g over the span).
2. `scan_kernel` (`lasp.kernels.common.scan`): per (document, head), scans the summaries
   in order from the initial state (or zero), overwriting each `U_s` in place with the
   span's incoming state and writing the final state.
3. `_fwd_output_kernel`, one program per (span, head, V-tile): walks the span again from
   its incoming state and writes each chunk's output
   `o = scale[(q ⊙ e^Γ) h_c + ((q kᵀ) ⊙ M) v]`.

Backward (three launches; dg's terms come from the first and the last):

1. `_bwd_dq_kernel`, one program per (span, head, K-tile): walks forward from the span's
   incoming state (saved by the forward: small), writes
   `dq = scale[((do vᵀ) ⊙ M) k + e^Γ (do h_cᵀ)]`, and accumulates the span's local state
   gradient `dU_s` (gradient of the span's outputs w.r.t. its incoming state).
2. `scan_kernel` in reverse: from d final_state (or zero) turns `dU_s` in place into the
   gradient of each span's outgoing state, and writes d initial_state.
3. `_bwd_dkdv_kernel`, walking each span backwards from its outgoing state gradient:
   `dv = scale((q kᵀ) ⊙ M)ᵀ do + (k ⊙ e^{γ−Γ}) dh`, `dk = scale((do vᵀ) ⊙ M)ᵀ q +
   e^{γ−Γ} (v dhᵀ)`. When the full K×V state gradient fits one program's registers
   (K, V ≤ 128) one launch writes both; otherwise two launches
   (dv over V-tiles with all of K, dk over K-tiles with all of V) each carry a slice.

Here Γ is the chunk-local inclusive cumulative log-decay, γ = Γ at the chunk's last token
and M_ts = exp(Γ_t − Γ_s) for s ≤ t, 0 otherwise (masked before the exp, so no overflow).

dg is chunk-local. g_u decays exactly the pairs (s, t) with s < u ≤ t (key s read by
query t, the initial state counting as keys before the document and d final_state as
queries after it), so dg_u is the sum of their terms A_ts = scale (q_t·k_s)(do_t·v_s) M_ts
(w_t with a row weight). For u in a chunk with incoming state h and outgoing state
gradient dh, they split into (s, t) both in the chunk: Σ_{s<u≤t} A_ts, s < t strictly,
from the dk walk's [C, C] tile of those terms as Σ_{t≥u} (its column sum at t − its row
sum at t) (the pairs with both ends at or after u cancel: only pairs of one chunk, all
strictly below the diagonal and so decayed like the kept ones; two reductions and a [C]
scan instead of a [C, C] scan: 2.97 ms against 3.04 for g's fwd+bwd at 1×32K, H100);
s before the chunk, t in it: Σ_{t≥u} q_t·dq_t's incoming-state part (dq walk); s in it,
t after it: Σ_{s<u} k_s·dk_s's state part (dk walk); both outside: e^γ <dh, h>, for
which the dq walk stores every chunk's incoming state (only when g requires grad: T/C ·
H · K · V, bf16 for 16-bit inputs: `chunk_state_dtype`) and the dk walk reads it. No sum
runs across chunks, so dg keeps the relative accuracy of dq and dk under any decay (at
g = −30 per token dg is ~e^−30 times the other gradients, which a document-long sum of
q·dq − k·dk would lose entirely).
Each walk writes its K-tile's share per token ([tokens, H, K-tiles] fp32); the host adds
them. A fixed decay (g_gamma as a buffer) skips all of it.

A row weight w (MoM's routing weights) makes the output w_t·o_t; the backward applies
w in fp32 inside the kernels rather than receiving w·do rounded to bf16.

`span_phases.TritonPhases` groups these launches at their data dependencies: summary + scan (reads
k, v, g; gives the final states) | output | dq (needs no d final_state) | reverse scan +
dk/dv (+ dg), so that LASP-2 can run its collectives in between
(`lasp.kernels.linear_attention_phases`); `triton_linear_attention` runs them back to back.

No host synchronisation: launch grids depend on shapes only (for packed input an upper
bound on the number of spans); span bounds are computed on the device and surplus programs find an empty span. States, summaries and
accumulators are fp32; `tl.dot` operands are in the input dtype (fp32 inputs use the
tensor cores' default TF32 on GPUs). Launch parameters: the `scalar.*` rows of
`lasp.kernels.common.launch.LAUNCH`.

With a decay (or a row weight) the left factor of each state update, kᵀ or qᵀ, is scaled
per token; it is read from memory already transposed (`tiles.load_tile_t`) rather than
transposed in registers after scaling, which spilled: on an H100 at 1×32K, H=16, D=128
g_gamma's fwd+bwd took 1.35 ms against 1.49 and g's 3.00 against 3.30, plain unchanged
(benchmarks/results/scalar_transposed_loads_h100_2026-12-07-s9.json).
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
from lasp.kernels.common.tiles import (decayed_outer_acc, load_tile, load_tile_t, query_rows, span_range, state_ptrs,
                                       store_tile)



# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _chunk_gates(g, offs_t, mask_t, h, H: tl.constexpr):
    """Chunk-local inclusive cumulative log-decay Γ [C] and its last value γ.

    Padded tokens load g = 0, so Γ stays flat after the chunk's last real token.
    """
    b_g = tl.load(g + offs_t * H + h, mask=mask_t, other=0.0)
    return tl.cumsum(b_g, axis=0), tl.sum(b_g, axis=0)


@triton.jit
def _fwd_summary_kernel(k, v, g, span_bounds, U, G_span, T, SPAN_TOKENS, SPANS_PER_ROW,
                        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, VARLEN: tl.constexpr):
    """U_s = Σ_chunks decayed kᵀv of span s from a zero state; G_s = Σ g over s."""
    NV: tl.constexpr = triton.cdiv(V, BV)
    n_tiles: tl.constexpr = triton.cdiv(K, BK) * NV
    tile = tl.program_id(0) % n_tiles
    s = tl.program_id(0) // n_tiles
    h = tl.program_id(1)
    offs_k = (tile // NV) * BK + tl.arange(0, BK)
    offs_v = (tile % NV) * BV + tl.arange(0, BV)
    start, end = span_range(span_bounds, s, T, SPAN_TOKENS, SPANS_PER_ROW, VARLEN)

    state = tl.zeros([BK, BV], dtype=tl.float32)
    g_total = 0.0
    for i in range(tl.cdiv(end - start, C)):
        offs_t = start + i * C + tl.arange(0, C)
        mask_t = offs_t < end
        b_v = load_tile(v, offs_t, mask_t, h, offs_v, V, H)
        if USE_G:
            gam, g_last = _chunk_gates(g, offs_t, mask_t, h, H)
            b_kt = load_tile_t(k, offs_t, mask_t, h, offs_k, K, H)
            state = decayed_outer_acc(b_kt, tl.exp(g_last - gam), b_v, state * tl.exp(g_last), False)
            g_total += g_last
        else:
            state = tl.dot(tl.trans(load_tile(k, offs_t, mask_t, h, offs_k, K, H)), b_v, state)

    ptrs, mask = state_ptrs(U, s, h, offs_k, offs_v, H, K, V)
    tl.store(ptrs, state, mask=mask)
    if USE_G:
        if tile == 0:
            tl.store(G_span + s.to(tl.int64) * H + h, g_total)


@triton.jit
def _fwd_output_kernel(q, k, v, g, w, rows, span_bounds, H_in, o, scale, T, SPAN_TOKENS, SPANS_PER_ROW,
                       H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr,
                       ROW_WEIGHT: tl.constexpr, GATHER: tl.constexpr, VARLEN: tl.constexpr):
    """Outputs of span s for one V-tile, carrying the state (all of K) chunk to chunk;
    ROW_WEIGHT scales each token's output by w[token] (fp32) before it is stored; GATHER
    reads position t's query from row rows[t] of q."""
    NV: tl.constexpr = triton.cdiv(V, BV)
    s = tl.program_id(0) // NV
    h = tl.program_id(1)
    offs_k = tl.arange(0, BK)
    offs_v = (tl.program_id(0) % NV) * BV + tl.arange(0, BV)
    start, end = span_range(span_bounds, s, T, SPAN_TOKENS, SPANS_PER_ROW, VARLEN)
    causal = tl.arange(0, C)[:, None] >= tl.arange(0, C)[None, :]

    ptrs, mask = state_ptrs(H_in, s, h, offs_k, offs_v, H, K, V)
    state = tl.load(ptrs, mask=mask, other=0.0)
    for i in range(tl.cdiv(end - start, C)):
        offs_t = start + i * C + tl.arange(0, C)
        mask_t = offs_t < end
        b_q = load_tile(q, query_rows(rows, offs_t, mask_t, GATHER), mask_t, h, offs_k, K, H)
        b_k = load_tile(k, offs_t, mask_t, h, offs_k, K, H)
        b_v = load_tile(v, offs_t, mask_t, h, offs_v, V, H)
        scores = tl.dot(b_q, tl.trans(b_k)) * scale
        b_o = tl.dot(b_q, state.to(b_q.dtype))
        if USE_G:
            gam, g_last = _chunk_gates(g, offs_t, mask_t, h, H)
            scores *= tl.exp(tl.where(causal, gam[:, None] - gam[None, :], float("-inf")))
            b_o *= (tl.exp(gam) * scale)[:, None]
        else:
            scores = tl.where(causal, scores, 0.0)
            b_o *= scale
        b_o = tl.dot(scores.to(b_v.dtype), b_v, b_o)
        if ROW_WEIGHT:
            b_o *= tl.load(w + offs_t, mask=mask_t, other=0.0)[:, None]
        store_tile(o, b_o, offs_t, mask_t, h, offs_v, V, H)
        if USE_G:
            b_kt = load_tile_t(k, offs_t, mask_t, h, offs_k, K, H)
            state = decayed_outer_acc(b_kt, tl.exp(g_last - gam), b_v, state * tl.exp(g_last), False)
        else:
            state = tl.dot(tl.trans(b_k), b_v, state)


@triton.jit
def _bwd_dq_kernel(q, k, v, g, w, rows, do, span_bounds, H_in, dq, dU, q_dq, dg_q, chunk_states, span_chunk0,
                   scale, T, SPAN_TOKENS, SPANS_PER_ROW,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr,
                   USE_G: tl.constexpr, DG: tl.constexpr, ROW_WEIGHT: tl.constexpr,
                   GATHER: tl.constexpr, VARLEN: tl.constexpr):
    """dq of span s for one K-tile (all of V), and the span's local state gradient.

    Walks forward from the span's incoming state h. dU_s = Σ_c e^{Σ_{c'<c} γ_c'} ·
    scale (q ⊙ e^Γ)ᵀ do over the span's chunks c (the gradient of the span's
    outputs w.r.t. its incoming state). A row weight also writes this K-tile's share of
    Σ_k q⊙dq per token to q_dq[token, head, K-tile] (where the row weight is 0: of q·dq
    as if it were 1, the weight's own gradient).

    DG (the decay's gradient wanted): writes each chunk's incoming state to
    chunk_states[span_chunk0[s] + i] and this K-tile's share of dg's incoming-state term
    to dg_q[token, head, K-tile] (module docstring): for token u of a chunk,
    Σ_{t ≥ u in the chunk} q_t·dq_t, dq_t's part that reads the incoming state.

    ROW_WEIGHT: the output was w ⊙ o, so the true cotangent of o is w_t·do_t. It enters
    in fp32 (dq's rows, the weights of dU, exact as in `decayed_outer_acc`) instead of
    rounding w·do for the dots. GATHER: position t's q and do are row rows[t] of q, do.
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
    g_before = 0.0  # log-decay from the span's start to the current chunk's start
    for i in range(tl.cdiv(end - start, C)):
        offs_t = start + i * C + tl.arange(0, C)
        mask_t = offs_t < end
        q_rows = query_rows(rows, offs_t, mask_t, GATHER)
        b_q = load_tile(q, q_rows, mask_t, h, offs_k, K, H)
        b_k = load_tile(k, offs_t, mask_t, h, offs_k, K, H)
        b_v = load_tile(v, offs_t, mask_t, h, offs_v, V, H)
        b_do = load_tile(do, q_rows, mask_t, h, offs_v, V, H).to(v.dtype.element_ty)
        if ROW_WEIGHT:
            b_w = tl.load(w + offs_t, mask=mask_t, other=0.0)
        dp = tl.dot(b_do, tl.trans(b_v)) * scale
        b_dq = tl.dot(b_do, tl.trans(state.to(b_do.dtype)))
        if USE_G:
            gam, g_last = _chunk_gates(g, offs_t, mask_t, h, H)
            dp *= tl.exp(tl.where(causal, gam[:, None] - gam[None, :], float("-inf")))
            b_dq *= (tl.exp(gam) * scale)[:, None]
        else:
            dp = tl.where(causal, dp, 0.0)
            b_dq *= scale
        if DG:
            from_state = tl.sum(b_q.to(tl.float32) * b_dq, axis=1)
            if ROW_WEIGHT:
                from_state *= b_w
            tl.store(dg_q + (offs_t * H + h) * NK + kt, tl.cumsum(from_state, axis=0, reverse=True), mask=mask_t)
            in_ptrs, in_mask = state_ptrs(chunk_states, first_chunk + i, h, offs_k, offs_v, H, K, V)
            tl.store(in_ptrs, state, mask=in_mask)
        if ROW_WEIGHT:
            # In fp32, before dp's rounding. A zero weight's row is walked with weight 1,
            # so that q_dq holds its own gradient <do, o> (not zero), and its dq is zeroed
            # when stored.
            walk_w = tl.where(b_w != 0.0, b_w, 1.0)
            dp *= walk_w[:, None]
            b_dq *= walk_w[:, None]
        b_dq = tl.dot(dp.to(b_k.dtype), b_k, b_dq)
        if ROW_WEIGHT:
            tl.store(q_dq + (offs_t * H + h) * NK + kt, tl.sum(b_q.to(tl.float32) * b_dq, axis=1), mask=mask_t)
            b_dq = tl.where((b_w != 0.0)[:, None], b_dq, 0.0)
        store_tile(dq, b_dq, offs_t, mask_t, h, offs_k, K, H)
        if USE_G:
            q_weight = tl.exp(gam + g_before)
            if ROW_WEIGHT:
                q_weight *= b_w
            b_qt = load_tile_t(q, q_rows, mask_t, h, offs_k, K, H)
            d_state = decayed_outer_acc(b_qt, q_weight, b_do, d_state, ROW_WEIGHT)
            b_kt = load_tile_t(k, offs_t, mask_t, h, offs_k, K, H)
            state = decayed_outer_acc(b_kt, tl.exp(g_last - gam), b_v, state * tl.exp(g_last), False)
            g_before += g_last
        else:
            if ROW_WEIGHT:
                b_qt = load_tile_t(q, q_rows, mask_t, h, offs_k, K, H)
                d_state = decayed_outer_acc(b_qt, b_w, b_do, d_state, True)
            else:
                d_state = tl.dot(tl.trans(b_q), b_do, d_state)
            state = tl.dot(tl.trans(b_k), b_v, state)

    ptrs, mask = state_ptrs(dU, s, h, offs_k, offs_v, H, K, V)
    tl.store(ptrs, d_state * scale, mask=mask)


@triton.jit
def _bwd_dkdv_kernel(q, k, v, g, w, rows, do, span_bounds, dH_out, dk, dv, dg_k, chunk_states, span_chunk0,
                     scale, T, SPAN_TOKENS, SPANS_PER_ROW,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, DO_DK: tl.constexpr,
                     DO_DV: tl.constexpr, USE_G: tl.constexpr, DG: tl.constexpr,
                     ROW_WEIGHT: tl.constexpr, GATHER: tl.constexpr, VARLEN: tl.constexpr):
    """dk and/or dv of span s, walking its chunks backwards from its outgoing gradient.

    The carried dh is the gradient w.r.t. the state leaving the current chunk:
    dh ← e^γ dh + scale (q ⊙ e^Γ)ᵀ do. dv needs all of K (BK ≥ K, tiles over V); dk
    needs all of V (BV ≥ V, tiles over K); both at once need the whole K×V tile. With the
    decay's gradient (DG), DO_DK also writes this K-tile's share of dg's other terms
    (module docstring) to dg_k[token, head, K-tile]: the chunk's pairs that cross each
    token, the chunk's keys read after the chunk, and e^γ <dh, incoming state> (read
    from the dq walk's `chunk_states`). ROW_WEIGHT (as in the dq walk) scales the
    query-token columns of the chunk's score matrices and the weights of dh by w, in
    fp32. GATHER reads q and do as the dq walk does.
    """
    NV: tl.constexpr = triton.cdiv(V, BV)
    n_tiles: tl.constexpr = triton.cdiv(K, BK) * NV
    tile = tl.program_id(0) % n_tiles
    s = tl.program_id(0) // n_tiles
    h = tl.program_id(1)
    kt = tile // NV
    offs_k = kt * BK + tl.arange(0, BK)
    offs_v = (tile % NV) * BV + tl.arange(0, BV)
    start, end = span_range(span_bounds, s, T, SPAN_TOKENS, SPANS_PER_ROW, VARLEN)
    # Transposed causal mask: row s (key), column t (query), s ≤ t.
    causal_t = tl.arange(0, C)[:, None] <= tl.arange(0, C)[None, :]
    # Row s, column u: key s is before token u (s < u).
    before = tl.arange(0, C)[:, None] < tl.arange(0, C)[None, :]
    NK: tl.constexpr = triton.cdiv(K, BK)
    DG_K: tl.constexpr = DG and DO_DK
    if DG_K:
        first_chunk = tl.load(span_chunk0 + s)

    ptrs, mask = state_ptrs(dH_out, s, h, offs_k, offs_v, H, K, V)
    d_state = tl.load(ptrs, mask=mask, other=0.0)
    n_chunks = tl.cdiv(end - start, C)
    for j in range(n_chunks):
        c = n_chunks - 1 - j
        offs_t = start + c * C + tl.arange(0, C)
        mask_t = offs_t < end
        if DG_K:
            # <dh, incoming state> first, before the chunk's tiles take registers.
            in_ptrs, in_mask = state_ptrs(chunk_states, first_chunk + c, h, offs_k, offs_v, H, K, V)
            h_in = tl.load(in_ptrs, mask=in_mask, other=0.0).to(tl.float32)
            through = tl.sum(tl.sum(h_in * d_state, axis=1), axis=0)
        q_rows = query_rows(rows, offs_t, mask_t, GATHER)
        b_q = load_tile(q, q_rows, mask_t, h, offs_k, K, H)
        b_k = load_tile(k, offs_t, mask_t, h, offs_k, K, H)
        b_v = load_tile(v, offs_t, mask_t, h, offs_v, V, H)
        b_do = load_tile(do, q_rows, mask_t, h, offs_v, V, H).to(v.dtype.element_ty)
        if USE_G:
            gam, g_last = _chunk_gates(g, offs_t, mask_t, h, H)
            decay_t = tl.exp(tl.where(causal_t, gam[None, :] - gam[:, None], float("-inf")))
        if ROW_WEIGHT:
            b_w = tl.load(w + offs_t, mask=mask_t, other=0.0)
        d_state_in = d_state.to(b_q.dtype)
        if DO_DV or DG_K:
            # scale (k qᵀ) ⊙ Mᵀ, query columns weighted: dv's matrix; with dg, A's other factor.
            scores_t = tl.dot(b_k, tl.trans(b_q)) * scale
            if USE_G:
                scores_t *= decay_t
            else:
                scores_t = tl.where(causal_t, scores_t, 0.0)
            if ROW_WEIGHT:
                scores_t *= b_w[None, :]
        if DO_DV:
            b_dv = tl.dot(b_k, d_state_in)
            if USE_G:
                b_dv *= tl.exp(g_last - gam)[:, None]
            b_dv = tl.dot(scores_t.to(b_do.dtype), b_do, b_dv)
            store_tile(dv, b_dv, offs_t, mask_t, h, offs_v, V, H)
        if DO_DK:
            v_do = tl.dot(b_v, tl.trans(b_do))
            b_dk = tl.dot(b_v, tl.trans(d_state_in))
            if USE_G:
                b_dk *= tl.exp(g_last - gam)[:, None]
            if DG_K:
                # For token u: Σ_{s<u≤t} A_ts (A_ts = pair (s, t)'s term, s < t strictly, so
                # the chunk's diagonal never enters) as the reverse cumulative sum of (pairs
                # into t) − (pairs out of t), plus Σ_{s<u} k_s·dk_s's state part and
                # e^γ <dh, incoming state>: the terms that g_u decays.
                pairs = tl.where(before, scores_t * v_do, 0.0)
                k_dk = tl.sum(b_k.to(tl.float32) * b_dk, axis=1)
                dg_u = (tl.cumsum(tl.sum(pairs, axis=0) - tl.sum(pairs, axis=1), axis=0, reverse=True)
                        + tl.sum(tl.where(before, k_dk[:, None], 0.0), axis=0) + through * tl.exp(g_last))
                tl.store(dg_k + (offs_t * H + h) * NK + kt, dg_u, mask=mask_t)
            dp_t = v_do * scale
            if USE_G:
                dp_t *= decay_t
            else:
                dp_t = tl.where(causal_t, dp_t, 0.0)
            if ROW_WEIGHT:
                dp_t *= b_w[None, :]
            b_dk = tl.dot(dp_t.to(b_q.dtype), b_q, b_dk)
            store_tile(dk, b_dk, offs_t, mask_t, h, offs_k, K, H)
        if USE_G:
            q_weight = tl.exp(gam) * scale
            if ROW_WEIGHT:
                q_weight *= b_w
            b_qt = load_tile_t(q, q_rows, mask_t, h, offs_k, K, H)
            d_state = decayed_outer_acc(b_qt, q_weight, b_do, d_state * tl.exp(g_last), ROW_WEIGHT)
        elif ROW_WEIGHT:
            b_qt = load_tile_t(q, q_rows, mask_t, h, offs_k, K, H)
            d_state = decayed_outer_acc(b_qt, b_w * scale, b_do, d_state, True)
        else:
            d_state += tl.dot(tl.trans(b_q), b_do) * scale


# --------------------------------------------------------------------------------------
# Host side: launches (the phases and autograd: lasp.kernels.common.span_phases)
# --------------------------------------------------------------------------------------


def _forward_states(k, v, g, h0, plan: SpanPlan):
    """Summary and scan launches: every span's incoming state (overwriting its summary),
    the spans' log-decays (or None) and each document's final state."""
    H, K, V, NS = plan.H, plan.K, plan.V, plan.n_spans
    dev, use_g = k.device, g is not None
    span_bounds, sizes = plan.span_args(k)

    states = launch.new_tensor((NS, H, K, V), torch.float32, dev)
    g_span = launch.new_tensor((NS, H), torch.float32, dev) if use_g else None
    BK, BV = (min(LAUNCH["scalar.summary"].block, triton.next_power_of_2(dim)) for dim in (K, V))
    _fwd_summary_kernel[(triton.cdiv(K, BK) * triton.cdiv(V, BV) * NS, H)](
        k, v, g if use_g else k, span_bounds, states, states if g_span is None else g_span, *sizes,
        H=H, K=K, V=V, C=plan.chunk, BK=BK, BV=BV, USE_G=use_g, VARLEN=plan.varlen, **launch_kw("scalar.summary"))

    final = launch.new_tensor((plan.n_docs, H, K, V), torch.float32, dev)
    scan_spans(states, g_span, h0, final, plan, reverse=False)
    return states, g_span, final


def _forward_output(q, k, v, g, w, rows, states, scale, plan: SpanPlan):
    """Output launch: every span walked again from its incoming state (rows scaled by
    the row weight `w` when given; queries gathered by `rows` when given, the output then
    fp32)."""
    H, K, V, NS = plan.H, plan.K, plan.V, plan.n_spans
    use_g = g is not None
    span_bounds, sizes = plan.span_args(q)
    o = launch.new_tensor((plan.B, plan.T, H, V), q.dtype if rows is None else torch.float32, q.device)
    BK, BV = triton.next_power_of_2(K), tile("scalar.output", V, K)
    _fwd_output_kernel[(triton.cdiv(V, BV) * NS, H)](
        q, k, v, g if use_g else q, q if w is None else w, q if rows is None else rows, span_bounds, states,
        o, scale, *sizes, H=H, K=K, V=V, C=plan.chunk, BK=BK, BV=BV, USE_G=use_g,
        ROW_WEIGHT=w is not None, GATHER=rows is not None, VARLEN=plan.varlen, **launch_kw("scalar.output"))
    return o


def chunk_state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Element type of the chunk states the dq walk stores for dg: bf16 for 16-bit inputs
    (half the bytes of the largest tensor of g's backward, T/C·H·K·V; on an H100 at 1×32K
    g's fwd+bwd 2.75 ms against 2.97 with fp32 states), fp32 for fp32 inputs."""
    return torch.float32 if dtype == torch.float32 else torch.bfloat16


def _backward_dq(q, k, v, g, w, rows, do, states, scale, plan: SpanPlan, decay_grad: bool):
    """dq launch: dq, every span's local state gradient dU_s, q_dq (for a row weight `w`;
    else None) and the dq walk's parts of dg (`decay_grad`: dg_q, the chunk states and
    each span's first chunk slot; else None). With `rows`, dq is per position, fp32."""
    H, K, V, NS, TT = plan.H, plan.K, plan.V, plan.n_spans, plan.tokens
    dev, use_g = q.device, g is not None
    span_bounds, sizes = plan.span_args(q)
    row = "scalar.dq_dg" if decay_grad else "scalar.dq"
    BK, BV = tile(row, K, V), triton.next_power_of_2(V)
    n_k_tiles = triton.cdiv(K, BK)
    dq = launch.new_tensor(k.shape, q.dtype if rows is None else torch.float32, dev)
    d_states = launch.new_tensor((NS, H, K, V), torch.float32, dev)
    q_dq = launch.new_tensor((TT, H, n_k_tiles), torch.float32, dev) if w is not None else None
    dg_parts = None
    if decay_grad:
        span_chunk0, n_slots = span_chunk_slots(plan, dev)
        dg_parts = (launch.new_tensor((TT, H, n_k_tiles), torch.float32, dev),
                    launch.new_tensor((n_slots, H, K, V), chunk_state_dtype(q.dtype), dev), span_chunk0)
    dg_q, chunk_states, span_chunk0 = dg_parts or (q, q, q)
    _bwd_dq_kernel[(n_k_tiles * NS, H)](
        q, k, v, g if use_g else q, q if w is None else w, q if rows is None else rows, do, span_bounds,
        states, dq, d_states, q if q_dq is None else q_dq, dg_q, chunk_states, span_chunk0, scale, *sizes,
        H=H, K=K, V=V, C=plan.chunk, BK=BK, BV=BV, USE_G=use_g, DG=decay_grad,
        ROW_WEIGHT=w is not None, GATHER=rows is not None, VARLEN=plan.varlen, **launch_kw(row))
    return dq, d_states, q_dq, dg_parts


def _backward_kvg(q, k, v, g, w, rows, do, d_final, d_states, g_span, dg_parts, scale, want_dh0, want_dg,
                  plan: SpanPlan, fuse_dkdv: bool):
    """Reverse scan (from d final_state) and dk/dv launches (dg's last terms with dk):
    returns dk, dv, dg (or None), d initial_state (or None). `d_states` is overwritten."""
    H, K, V, NS, TT = plan.H, plan.K, plan.V, plan.n_spans, plan.tokens
    dev, use_g = q.device, g is not None
    if want_dg and dg_parts is None:
        raise RuntimeError("dg was asked for, but g did not require grad when the call was planned")
    decay_grad = dg_parts is not None
    span_bounds, sizes = plan.span_args(q)
    common = dict(H=H, K=K, V=V, C=plan.chunk, USE_G=use_g, DG=decay_grad, ROW_WEIGHT=w is not None,
                  GATHER=rows is not None, VARLEN=plan.varlen)

    dh0 = launch.new_tensor((plan.n_docs, H, K, V), torch.float32, dev) if want_dh0 else None
    scan_spans(d_states, g_span, d_final, dh0, plan, reverse=True)

    dk = launch.new_tensor(k.shape, k.dtype, dev)
    dv = launch.new_tensor(v.shape, v.dtype, dev)
    PK, PV = triton.next_power_of_2(K), triton.next_power_of_2(V)
    row = "scalar.dkdv_dg" if decay_grad else "scalar.dkdv"
    BK = PK if fuse_dkdv else tile(row, K, V)
    n_k_tiles = triton.cdiv(K, BK)
    dg_q, chunk_states, span_chunk0 = dg_parts or (q, q, q)
    dg_k = launch.new_tensor((TT, H, n_k_tiles), torch.float32, dev) if decay_grad else q
    args = (q, k, v, g if use_g else q, q if w is None else w, q if rows is None else rows, do, span_bounds,
            d_states, dk, dv, dg_k, chunk_states, span_chunk0, scale, *sizes)
    common.update(launch_kw(row))
    if fuse_dkdv:
        _bwd_dkdv_kernel[(NS, H)](*args, BK=PK, BV=PV, DO_DK=True, DO_DV=True, **common)
    else:
        BV = tile(row, V, K)
        _bwd_dkdv_kernel[(triton.cdiv(V, BV) * NS, H)](*args, BK=PK, BV=BV, DO_DK=False, DO_DV=True, **common)
        _bwd_dkdv_kernel[(n_k_tiles * NS, H)](*args, BK=BK, BV=PV, DO_DK=True, DO_DV=False, **common)
    dg = (dg_q.sum(-1) + dg_k.sum(-1)).view(plan.B, plan.T, H) if want_dg else None
    return dk, dv, dg, dh0


LAUNCHES = span_phases.SpanLaunches(_forward_states, _forward_output, _backward_dq, _backward_kvg,
                                    default_chunk=partial(chunk_for_head_dims, "scalar"), family="scalar")


def triton_phases(q, k, v, g, scale, initial_state, cu_seqlens, **knobs):
    """`span_phases.triton_phases` on this family's kernels (g: None or [B,T,H])."""
    return span_phases.triton_phases(LAUNCHES, q, k, v, g, scale, initial_state, cu_seqlens, **knobs)


def triton_linear_attention(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, **knobs):
    """`span_phases.triton_linear_attention` on this family's kernels: g None or the
    per-token log-decay [B,T,H] (≤ 0); knobs row_weight, chunk_size, span_chunks, fuse_dkdv."""
    return span_phases.triton_linear_attention(LAUNCHES, q, k, v, g, scale, initial_state, output_final_state,
                                               cu_seqlens, **knobs)


def linear_attention(q, k, v, g, *, scale, initial_state=None, output_final_state=False, cu_seqlens=None,
                     causal=True):
    """The family's entry for `lasp.kernels.linear_attention` (validated arguments, causal;
    `g` the per-token log-decay [B,T,H] or None): `triton_linear_attention`."""
    return triton_linear_attention(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def phases(q, k, v, g, *, scale, initial_state=None, cu_seqlens=None, causal=True):
    """The family's entry for `lasp.kernels.linear_attention_phases` (causal): `triton_phases`."""
    return triton_phases(q, k, v, g, scale, initial_state, cu_seqlens)
