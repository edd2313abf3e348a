"""Triton backend of causal linear attention with optional scalar decay: forward and backward.

Per head the recurrence is (DESIGN.md §1)::

    S_t = exp(g_t) S_{t-1} + k_t v_tᵀ          o_t = scale · q_tᵀ S_t

Work is cut into chunks of C tokens and *segments* of a few consecutive chunks; neither
crosses a packed-sequence boundary. The segment-summary idea of LASP-2 is used inside the
GPU so that one long sequence still fills every SM: instead of walking all chunks of a
sequence in B·H programs (the sequential state pass of chunkwise kernels), every segment
is walked by its own programs and only a tiny scan over segment summaries is sequential.

Forward (three launches):

Segment kernels run one program per (segment, tile) on grid axis 0, tiles of a segment
adjacent so that they share its chunk loads through L2, and per head on axis 1.

1. `_fwd_summary_kernel`, one program per (segment, head, K-tile, V-tile): walks the
   segment's chunks from a zero state and writes the segment's local state `U_s` and its
   log-transition `G_s` (sum of g over the segment).
2. `_scan_kernel`: per (sequence, head), scans the summaries in order from the initial
   state (or zero), overwriting each `U_s` in place with the segment's incoming state and
   writing the final state.
3. `_fwd_output_kernel`, one program per (segment, head, V-tile): walks the segment again
   from its incoming state and writes each chunk's output
   `o = scale[(q ⊙ e^Γ) h_c + ((q kᵀ) ⊙ M) v]`.

Backward (three launches plus a small torch epilogue for dg):

1. `_bwd_dq_kernel`, one program per (segment, head, K-tile): walks forward from the
   segment's incoming state (saved by the forward: small), writes
   `dq = scale[((do vᵀ) ⊙ M) k + e^Γ (do h_cᵀ)]`, and accumulates the segment's local
   state gradient `dU_s` (gradient of the segment's outputs w.r.t. its incoming state).
2. `_scan_kernel` in reverse: from d final_state (or zero) turns `dU_s` in place into the
   gradient of each segment's outgoing state, and writes d initial_state.
3. `_bwd_dkdv_kernel`, walking each segment backwards from its outgoing state gradient:
   `dv = scale((q kᵀ) ⊙ M)ᵀ do + (k ⊙ e^{γ−Γ}) dh`, `dk = scale((do vᵀ) ⊙ M)ᵀ q +
   e^{γ−Γ} (v dhᵀ)`. When the full K×V state gradient fits one program's registers
   (K, V ≤ 128) one launch writes both; otherwise two launches
   (dv over V-tiles with all of K, dk over K-tiles with all of V) each carry a slice.

Here Γ is the chunk-local inclusive cumulative log-decay, γ = Γ at the chunk's last token
and M_ts = exp(Γ_t − Γ_s) for s ≤ t, 0 otherwise (masked before the exp, so no overflow).
With a decay, dg follows from `dB_t = q_t·dq_t − k_t·dk_t` (fp32, from the kernels'
accumulators): dg is the reverse cumulative sum of dB within each sequence plus
`<d final_state, final_state>` of that sequence (the final state scales with every g).
Those long sums cancel q·dq against k·dk, which amplifies any rounding inside dB, so when
g requires grad (`_Plan.decay_grad`, the kernels' DG switch) the states and state
gradients add back their bf16 rounding residuals in extra dots; a fixed decay (g_gamma
as a buffer) skips them and dB.

A row weight w (MoM's routing weights) makes the output w_t·o_t; the backward applies
w in fp32 inside the kernels rather than receiving w·do rounded to bf16.

`TritonPhases` groups these launches at their data dependencies: summary + scan (reads
k, v, g; gives the final states) | output | dq (needs no d final_state) | reverse scan +
dk/dv + dg epilogue, so that LASP-2 can run its collectives in between
(`lasp.kernels.linear_attention_phases`); `triton_linear_attention` runs them back to back.

No host synchronisation: launch grids depend on shapes only (for packed input an upper
bound on the number of segments, or the exact count from `cu_seqlens_host`); segment
bounds are computed on the device and surplus programs find an empty segment.
States, summaries and accumulators are fp32; `tl.dot` operands are in the input dtype
(fp32 inputs use the tensor cores' default TF32 on GPUs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


def _fix_interpreter_loop_bounds() -> None:
    """Let `range(tensor)` work in the Triton interpreter under NumPy >= 2.4.

    The interpreter holds scalars as 1-element arrays and converts loop bounds with
    `int(array)`, which NumPy 2.4 turned into a TypeError. The segment walks loop over
    a device-computed number of chunks, so the CPU tests need this conversion. Patches
    only the interpreter (TRITON_INTERPRET=1), nothing on GPUs.
    """
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_lasp_index_fix", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._lasp_index_fix = True
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_loop_bounds()

CHUNK_SIZE = 64
# Segment length: up to MAX_SEGMENT_CHUNKS chunks, shorter when that leaves fewer than
# about SEGMENT_PROGRAMS (segment, head) pairs, so that small problems still fill the GPU.
MAX_SEGMENT_CHUNKS = 64
SEGMENT_PROGRAMS = 128
# The widest K×V state gradient one program keeps in registers for the fused dk/dv
# launch; wider states take the split launch (dv over V-tiles with all of K, dk over
# K-tiles with all of V), which reads q, k, v and do twice: on an H200 at B=1, T=32K,
# H=16, D=128 the split launch costs 1.24 / 1.81 / 2.77 ms fwd+bwd against the fused
# one's 0.92 / 1.44 / 2.32 (plain / g_gamma / g; benchmarks/results/tune_launch_*-s4).
FUSED_DKDV_MAX_ELEMENTS = 128 * 128


@dataclass(frozen=True)
class Launch:
    """Launch parameters of one kernel: warps, software-pipeline stages and `block`, the
    widest tile along each head dimension the kernel splits across programs (halved when
    the dimension it keeps whole exceeds 128, to bound registers), or the scan's block of
    state elements."""

    num_warps: int
    num_stages: int
    block: int


# One row per kernel, the only place launch parameters are set; chosen on an H200 at
# H=16, D=128 by `benchmarks/check_triton_gpu.py --tune`.
LAUNCH = {
    "summary": Launch(num_warps=4, num_stages=2, block=64),
    # The summary walk with the decay's gradient (DG): twice the dots, wider tiles pay.
    "summary_dg": Launch(num_warps=8, num_stages=2, block=128),
    "output": Launch(num_warps=4, num_stages=2, block=64),
    "dq": Launch(num_warps=4, num_stages=2, block=64),
    "dkdv": Launch(num_warps=8, num_stages=2, block=64),
    # The dk/dv walk with the decay's gradient (DG): more registers, no room to pipeline.
    "dkdv_dg": Launch(num_warps=8, num_stages=1, block=64),
    "scan": Launch(num_warps=4, num_stages=3, block=1024),
}


def _tile(kernel: str, split_dim: int, whole_dim: int) -> int:
    """Tile along `split_dim` for `kernel` when the other head dim (`whole_dim`, padded
    to a power of two) stays whole in each program."""
    cap = LAUNCH[kernel].block if whole_dim <= 128 else LAUNCH[kernel].block // 2
    return min(cap, triton.next_power_of_2(split_dim))


def _launch_kw(kernel: str) -> dict:
    row = LAUNCH[kernel]
    return dict(num_warps=row.num_warps, num_stages=row.num_stages)


# Tests set this to fill every kernel output with NaN before the kernels run, so that an
# element a kernel forgets to write fails the comparison. Off in production (extra fills).
POISON_OUTPUTS = False


def _new(shape, dtype, device):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------


@triton.jit
def _segment_span(seg_bounds, s, T, SEG_TOKENS, SEGS_PER_SEQ, VARLEN: tl.constexpr):
    """Token range [start, end) of segment `s` on the flattened B·T token axis.

    Packed input reads it from `seg_bounds` (int64 [NS, 2], device-computed; surplus
    segments are empty); otherwise segment s is the (s % SEGS_PER_SEQ)-th of row s // SEGS_PER_SEQ.
    """
    if VARLEN:
        start = tl.load(seg_bounds + 2 * s)
        end = tl.load(seg_bounds + 2 * s + 1)
    else:
        row = (s // SEGS_PER_SEQ).to(tl.int64)
        start = row * T + (s % SEGS_PER_SEQ).to(tl.int64) * SEG_TOKENS
        end = tl.minimum(start + SEG_TOKENS, (row + 1) * T)
    return start, end


@triton.jit
def _chunk_gates(g, offs_t, mask_t, h, H: tl.constexpr):
    """Chunk-local inclusive cumulative log-decay Γ [C] and its last value γ.

    Padded tokens load g = 0, so Γ stays flat after the chunk's last real token.
    """
    b_g = tl.load(g + offs_t * H + h, mask=mask_t, other=0.0)
    return tl.cumsum(b_g, axis=0), tl.sum(b_g, axis=0)


@triton.jit
def _load_tile(ptr, offs_t, mask_t, h, offs_d, D: tl.constexpr, H: tl.constexpr):
    """[C, BD] tile of a [tokens, H, D] tensor, zero outside the chunk and beyond D."""
    ptrs = ptr + (offs_t[:, None] * H + h) * D + offs_d[None, :]
    return tl.load(ptrs, mask=mask_t[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def _query_rows(rows, offs_t, mask_t, GATHER: tl.constexpr):
    """Rows of q and do that positions `offs_t` read: rows[t] when GATHER, else t."""
    if GATHER:
        return tl.load(rows + offs_t, mask=mask_t, other=0)
    return offs_t


@triton.jit
def _store_tile(ptr, value, offs_t, mask_t, h, offs_d, D: tl.constexpr, H: tl.constexpr):
    ptrs = ptr + (offs_t[:, None] * H + h) * D + offs_d[None, :]
    tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=mask_t[:, None] & (offs_d < D)[None, :])


@triton.jit
def _state_ptrs(ptr, s, h, offs_k, offs_v, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """Pointers and mask of a [BK, BV] tile of state `s` in a [*, H, K, V] fp32 buffer."""
    base = (s.to(tl.int64) * H + h) * K
    ptrs = ptr + (base + offs_k[:, None]) * V + offs_v[None, :]
    return ptrs, (offs_k < K)[:, None] & (offs_v < V)[None, :]


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _decayed_outer_acc(a, weight, b, acc, EXACT: tl.constexpr):
    """acc + (a ⊙ weight)ᵀ b, `a ⊙ weight` rounded to b's dtype for the dot. EXACT adds
    its rounding residual in a second dot: the states built so feed the decay gradient,
    whose sums over a whole sequence cancel q·dq against k·dk and would amplify it."""
    scaled = a.to(tl.float32) * weight[:, None]
    rounded = scaled.to(b.dtype)
    acc = tl.dot(tl.trans(rounded), b, acc)
    if EXACT:
        acc = tl.dot(tl.trans((scaled - rounded.to(tl.float32)).to(b.dtype)), b, acc)
    return acc


@triton.jit
def _fwd_summary_kernel(k, v, g, seg_bounds, U, G_seg, T, SEG_TOKENS, SEGS_PER_SEQ,
                        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr,
                        USE_G: tl.constexpr, DG: tl.constexpr, VARLEN: tl.constexpr):
    """U_s = Σ_chunks decayed kᵀv of segment s from a zero state; G_s = Σ g over s. DG:
    the decay's gradient will be wanted (states exact to fp32, `_decayed_outer_acc`)."""
    NV: tl.constexpr = triton.cdiv(V, BV)
    n_tiles: tl.constexpr = triton.cdiv(K, BK) * NV
    tile = tl.program_id(0) % n_tiles
    s = tl.program_id(0) // n_tiles
    h = tl.program_id(1)
    offs_k = (tile // NV) * BK + tl.arange(0, BK)
    offs_v = (tile % NV) * BV + tl.arange(0, BV)
    start, end = _segment_span(seg_bounds, s, T, SEG_TOKENS, SEGS_PER_SEQ, VARLEN)

    state = tl.zeros([BK, BV], dtype=tl.float32)
    g_total = 0.0
    for i in range(tl.cdiv(end - start, C)):
        offs_t = start + i * C + tl.arange(0, C)
        mask_t = offs_t < end
        b_k = _load_tile(k, offs_t, mask_t, h, offs_k, K, H)
        b_v = _load_tile(v, offs_t, mask_t, h, offs_v, V, H)
        if USE_G:
            gam, g_last = _chunk_gates(g, offs_t, mask_t, h, H)
            state = _decayed_outer_acc(b_k, tl.exp(g_last - gam), b_v, state * tl.exp(g_last), DG)
            g_total += g_last
        else:
            state = tl.dot(tl.trans(b_k), b_v, state)

    ptrs, mask = _state_ptrs(U, s, h, offs_k, offs_v, H, K, V)
    tl.store(ptrs, state, mask=mask)
    if USE_G:
        if tile == 0:
            tl.store(G_seg + s.to(tl.int64) * H + h, g_total)


@triton.jit
def _scan_kernel(U, G_seg, init, out, seq_segs, SEGS_PER_SEQ,
                 H: tl.constexpr, KV: tl.constexpr, BLOCK: tl.constexpr,
                 USE_G: tl.constexpr, HAS_INIT: tl.constexpr, STORE_OUT: tl.constexpr,
                 REVERSE: tl.constexpr, VARLEN: tl.constexpr):
    """Scan one sequence's segment summaries: U_s is replaced by the carried value at s.

    Forward: carried = incoming state, carried ← e^{G_s}·carried + U_s, starting from
    `init` (initial state) and ending in `out` (final state). REVERSE runs the segments
    backwards with the state gradients (dU_s in, outgoing-state gradient out, `init` =
    d final_state, `out` = d initial_state).
    """
    n = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < KV
    if VARLEN:
        first = tl.load(seq_segs + n)
        count = tl.load(seq_segs + n + 1) - first
    else:
        first = n * SEGS_PER_SEQ
        count = SEGS_PER_SEQ
    state_offs = (n.to(tl.int64) * H + h) * KV + offs
    if HAS_INIT:
        carried = tl.load(init + state_offs, mask=mask, other=0.0)
    else:
        carried = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(count):
        if REVERSE:
            s = (first + count - 1 - i).to(tl.int64)
        else:
            s = (first + i).to(tl.int64)
        ptrs = U + (s * H + h) * KV + offs
        summary = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, carried, mask=mask)
        if USE_G:
            carried = carried * tl.exp(tl.load(G_seg + s * H + h))
        carried += summary
    if STORE_OUT:
        tl.store(out + state_offs, carried, mask=mask)


@triton.jit
def _fwd_output_kernel(q, k, v, g, w, rows, seg_bounds, H_in, o, scale, T, SEG_TOKENS, SEGS_PER_SEQ,
                       H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr,
                       ROW_WEIGHT: tl.constexpr, GATHER: tl.constexpr, VARLEN: tl.constexpr):
    """Outputs of segment s for one V-tile, carrying the state (all of K) chunk to chunk;
    ROW_WEIGHT scales each token's output by w[token] (fp32) before it is stored; GATHER
    reads position t's query from row rows[t] of q."""
    NV: tl.constexpr = triton.cdiv(V, BV)
    s = tl.program_id(0) // NV
    h = tl.program_id(1)
    offs_k = tl.arange(0, BK)
    offs_v = (tl.program_id(0) % NV) * BV + tl.arange(0, BV)
    start, end = _segment_span(seg_bounds, s, T, SEG_TOKENS, SEGS_PER_SEQ, VARLEN)
    causal = tl.arange(0, C)[:, None] >= tl.arange(0, C)[None, :]

    ptrs, mask = _state_ptrs(H_in, s, h, offs_k, offs_v, H, K, V)
    state = tl.load(ptrs, mask=mask, other=0.0)
    for i in range(tl.cdiv(end - start, C)):
        offs_t = start + i * C + tl.arange(0, C)
        mask_t = offs_t < end
        b_q = _load_tile(q, _query_rows(rows, offs_t, mask_t, GATHER), mask_t, h, offs_k, K, H)
        b_k = _load_tile(k, offs_t, mask_t, h, offs_k, K, H)
        b_v = _load_tile(v, offs_t, mask_t, h, offs_v, V, H)
        scores = tl.dot(b_q, tl.trans(b_k)) * scale
        b_o = tl.dot(b_q, state.to(b_q.dtype))
        if USE_G:
            gam, g_last = _chunk_gates(g, offs_t, mask_t, h, H)
            scores *= tl.exp(tl.where(causal, gam[:, None] - gam[None, :], float("-inf")))
            b_o *= (tl.exp(gam) * scale)[:, None]
            b_k = (b_k * tl.exp(g_last - gam)[:, None]).to(b_v.dtype)
            state = state * tl.exp(g_last)
        else:
            scores = tl.where(causal, scores, 0.0)
            b_o *= scale
        b_o = tl.dot(scores.to(b_v.dtype), b_v, b_o)
        if ROW_WEIGHT:
            b_o *= tl.load(w + offs_t, mask=mask_t, other=0.0)[:, None]
        _store_tile(o, b_o, offs_t, mask_t, h, offs_v, V, H)
        state = tl.dot(tl.trans(b_k), b_v, state)


@triton.jit
def _bwd_dq_kernel(q, k, v, g, w, rows, do, seg_bounds, H_in, dq, dU, dB_q, scale, T,
                   SEG_TOKENS, SEGS_PER_SEQ,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr,
                   USE_G: tl.constexpr, DG: tl.constexpr, ROW_WEIGHT: tl.constexpr,
                   GATHER: tl.constexpr, VARLEN: tl.constexpr):
    """dq of segment s for one K-tile (all of V), and the segment's local state gradient.

    Walks forward from the segment's incoming state h. dU_s = Σ_c e^{Σ_{c'<c} γ_c'} ·
    scale (q ⊙ e^Γ)ᵀ do over the segment's chunks c (the gradient of the segment's
    outputs w.r.t. its incoming state). With the decay's gradient (DG) or a row weight
    also writes this K-tile's share of Σ_k q⊙dq per token to dB_q[token, head, K-tile].

    ROW_WEIGHT: the output was w ⊙ o, so the true cotangent of o is w_t·do_t. It enters
    in fp32 (dq's rows, the weights of dU, exact as in `_decayed_outer_acc`) instead of
    rounding w·do for the dots. GATHER: position t's q and do are row rows[t] of q, do.
    """
    NK: tl.constexpr = triton.cdiv(K, BK)
    kt = tl.program_id(0) % NK
    s = tl.program_id(0) // NK
    h = tl.program_id(1)
    offs_k = kt * BK + tl.arange(0, BK)
    offs_v = tl.arange(0, BV)
    start, end = _segment_span(seg_bounds, s, T, SEG_TOKENS, SEGS_PER_SEQ, VARLEN)
    causal = tl.arange(0, C)[:, None] >= tl.arange(0, C)[None, :]

    ptrs, mask = _state_ptrs(H_in, s, h, offs_k, offs_v, H, K, V)
    state = tl.load(ptrs, mask=mask, other=0.0)
    d_state = tl.zeros([BK, BV], dtype=tl.float32)
    g_before = 0.0  # log-decay from the segment's start to the current chunk's start
    for i in range(tl.cdiv(end - start, C)):
        offs_t = start + i * C + tl.arange(0, C)
        mask_t = offs_t < end
        q_rows = _query_rows(rows, offs_t, mask_t, GATHER)
        b_q = _load_tile(q, q_rows, mask_t, h, offs_k, K, H)
        b_k = _load_tile(k, offs_t, mask_t, h, offs_k, K, H)
        b_v = _load_tile(v, offs_t, mask_t, h, offs_v, V, H)
        b_do = _load_tile(do, q_rows, mask_t, h, offs_v, V, H).to(v.dtype.element_ty)
        if ROW_WEIGHT:
            b_w = tl.load(w + offs_t, mask=mask_t, other=0.0)
        dp = tl.dot(b_do, tl.trans(b_v)) * scale
        state_in = state.to(b_do.dtype)
        b_dq = tl.dot(b_do, tl.trans(state_in))
        if DG:
            # dg sums q·dq over the whole sequence, where the state's rounding to the dot
            # dtype (2^-9 in bf16) would accumulate: the rounding residual goes in too.
            b_dq = tl.dot(b_do, tl.trans((state - state_in.to(tl.float32)).to(b_do.dtype)), b_dq)
        if USE_G:
            gam, g_last = _chunk_gates(g, offs_t, mask_t, h, H)
            dp *= tl.exp(tl.where(causal, gam[:, None] - gam[None, :], float("-inf")))
            b_dq *= (tl.exp(gam) * scale)[:, None]
        else:
            dp = tl.where(causal, dp, 0.0)
            b_dq *= scale
        if ROW_WEIGHT:
            # Before dp's rounding, as the dk walk weights its dpᵀ: dB's long sums cancel
            # q·dq against k·dk pair by pair only when both round the same values.
            dp *= b_w[:, None]
            b_dq *= b_w[:, None]
        b_dq = tl.dot(dp.to(b_k.dtype), b_k, b_dq)
        if DG or ROW_WEIGHT:
            tl.store(dB_q + (offs_t * H + h) * NK + kt, tl.sum(b_q.to(tl.float32) * b_dq, axis=1),
                     mask=mask_t)
        _store_tile(dq, b_dq, offs_t, mask_t, h, offs_k, K, H)
        if USE_G:
            q_weight = tl.exp(gam + g_before)
            if ROW_WEIGHT:
                q_weight *= b_w
            d_state = _decayed_outer_acc(b_q, q_weight, b_do, d_state, DG or ROW_WEIGHT)
            state = _decayed_outer_acc(b_k, tl.exp(g_last - gam), b_v, state * tl.exp(g_last), DG)
            g_before += g_last
        else:
            if ROW_WEIGHT:
                d_state = _decayed_outer_acc(b_q, b_w, b_do, d_state, True)
            else:
                d_state = tl.dot(tl.trans(b_q), b_do, d_state)
            state = tl.dot(tl.trans(b_k), b_v, state)

    ptrs, mask = _state_ptrs(dU, s, h, offs_k, offs_v, H, K, V)
    tl.store(ptrs, d_state * scale, mask=mask)


@triton.jit
def _bwd_dkdv_kernel(q, k, v, g, w, rows, do, seg_bounds, dH_out, dk, dv, dB_k, scale, T,
                     SEG_TOKENS, SEGS_PER_SEQ,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, DO_DK: tl.constexpr,
                     DO_DV: tl.constexpr, USE_G: tl.constexpr, DG: tl.constexpr,
                     ROW_WEIGHT: tl.constexpr, GATHER: tl.constexpr, VARLEN: tl.constexpr):
    """dk and/or dv of segment s, walking its chunks backwards from its outgoing gradient.

    The carried dh is the gradient w.r.t. the state leaving the current chunk:
    dh ← e^γ dh + scale (q ⊙ e^Γ)ᵀ do. dv needs all of K (BK ≥ K, tiles over V); dk
    needs all of V (BV ≥ V, tiles over K); both at once need the whole K×V tile. With the
    decay's gradient (DG), DO_DK also writes this K-tile's share of Σ_k k⊙dk per token to
    dB_k[token, head, K-tile]. ROW_WEIGHT (as in the dq walk) scales the query-token
    columns of the chunk's score matrices and the weights of dh by w, in fp32. GATHER
    reads q and do as the dq walk does.
    """
    NV: tl.constexpr = triton.cdiv(V, BV)
    n_tiles: tl.constexpr = triton.cdiv(K, BK) * NV
    tile = tl.program_id(0) % n_tiles
    s = tl.program_id(0) // n_tiles
    h = tl.program_id(1)
    kt = tile // NV
    offs_k = kt * BK + tl.arange(0, BK)
    offs_v = (tile % NV) * BV + tl.arange(0, BV)
    start, end = _segment_span(seg_bounds, s, T, SEG_TOKENS, SEGS_PER_SEQ, VARLEN)
    # Transposed causal mask: row s (key), column t (query), s ≤ t.
    causal_t = tl.arange(0, C)[:, None] <= tl.arange(0, C)[None, :]

    ptrs, mask = _state_ptrs(dH_out, s, h, offs_k, offs_v, H, K, V)
    d_state = tl.load(ptrs, mask=mask, other=0.0)
    n_chunks = tl.cdiv(end - start, C)
    for j in range(n_chunks):
        offs_t = start + (n_chunks - 1 - j) * C + tl.arange(0, C)
        mask_t = offs_t < end
        q_rows = _query_rows(rows, offs_t, mask_t, GATHER)
        b_q = _load_tile(q, q_rows, mask_t, h, offs_k, K, H)
        b_k = _load_tile(k, offs_t, mask_t, h, offs_k, K, H)
        b_v = _load_tile(v, offs_t, mask_t, h, offs_v, V, H)
        b_do = _load_tile(do, q_rows, mask_t, h, offs_v, V, H).to(v.dtype.element_ty)
        if USE_G:
            gam, g_last = _chunk_gates(g, offs_t, mask_t, h, H)
        if ROW_WEIGHT:
            b_w = tl.load(w + offs_t, mask=mask_t, other=0.0)
        d_state_in = d_state.to(b_q.dtype)
        if DO_DV:
            scores_t = tl.dot(b_k, tl.trans(b_q)) * scale
            b_dv = tl.dot(b_k, d_state_in)
            if USE_G:
                scores_t *= tl.exp(tl.where(causal_t, gam[None, :] - gam[:, None], float("-inf")))
                b_dv *= tl.exp(g_last - gam)[:, None]
            else:
                scores_t = tl.where(causal_t, scores_t, 0.0)
            if ROW_WEIGHT:
                scores_t *= b_w[None, :]
            b_dv = tl.dot(scores_t.to(b_do.dtype), b_do, b_dv)
            _store_tile(dv, b_dv, offs_t, mask_t, h, offs_v, V, H)
        if DO_DK:
            dp_t = tl.dot(b_v, tl.trans(b_do)) * scale
            b_dk = tl.dot(b_v, tl.trans(d_state_in))
            if DG:
                # As in the dq walk: the state gradient's rounding residual, for dg.
                residual = (d_state - d_state_in.to(tl.float32)).to(b_q.dtype)
                b_dk = tl.dot(b_v, tl.trans(residual), b_dk)
            if USE_G:
                dp_t *= tl.exp(tl.where(causal_t, gam[None, :] - gam[:, None], float("-inf")))
                b_dk *= tl.exp(g_last - gam)[:, None]
            else:
                dp_t = tl.where(causal_t, dp_t, 0.0)
            if ROW_WEIGHT:
                dp_t *= b_w[None, :]
            b_dk = tl.dot(dp_t.to(b_q.dtype), b_q, b_dk)
            _store_tile(dk, b_dk, offs_t, mask_t, h, offs_k, K, H)
            if DG:
                NK: tl.constexpr = triton.cdiv(K, BK)
                tl.store(dB_k + (offs_t * H + h) * NK + kt,
                         tl.sum(b_k.to(tl.float32) * b_dk, axis=1), mask=mask_t)
        if USE_G:
            q_weight = tl.exp(gam) * scale
            if ROW_WEIGHT:
                q_weight *= b_w
            d_state = _decayed_outer_acc(b_q, q_weight, b_do, d_state * tl.exp(g_last), DG or ROW_WEIGHT)
        elif ROW_WEIGHT:
            d_state = _decayed_outer_acc(b_q, b_w * scale, b_do, d_state, True)
        else:
            d_state += tl.dot(tl.trans(b_q), b_do) * scale


# --------------------------------------------------------------------------------------
# Host side: launch geometry, launches, autograd
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Launch geometry shared by the forward and the backward of one call.

    `n_segs` is the segment grid: exact for unpacked input or with `cu_seqlens_host`,
    otherwise the upper bound cdiv(T, segment tokens) + N (surplus segments are empty).
    For packed input `seg_bounds` (int64 [n_segs, 2]: token range of each segment) and
    `seq_segs` (int64 [N+1]: first segment of each sequence) and `seq_ends` (int64 [N]:
    cu_seqlens[1:]) are device tensors. `decay_grad`: the decay needs its gradient (it
    requires grad), so the kernels keep the states exact for it (their DG switch); a
    fixed decay (g_gamma as a buffer) skips that work.
    """

    B: int
    T: int
    H: int
    K: int
    V: int
    n_seqs: int
    chunk: int
    seg_tokens: int
    segs_per_seq: int
    n_segs: int
    fuse_dkdv: bool
    decay_grad: bool
    seg_bounds: torch.Tensor | None
    seq_segs: torch.Tensor | None
    seq_ends: torch.Tensor | None

    @property
    def varlen(self) -> bool:
        return self.seg_bounds is not None

    @property
    def tokens(self) -> int:
        return self.B * self.T


def _default_segment_chunks(tokens: int, H: int, chunk: int) -> int:
    """A power of two in [2, MAX_SEGMENT_CHUNKS]: long segments amortise the per-segment
    state traffic, short ones give more programs. Depends on shapes only (no retuning)."""
    wanted = triton.cdiv(tokens, chunk) * H // SEGMENT_PROGRAMS
    return max(2, min(MAX_SEGMENT_CHUNKS, 1 << max(wanted, 1).bit_length() - 1))


def _make_plan(k, v, decay_grad, cu_seqlens, cu_seqlens_host, chunk, segment_chunks, fuse_dkdv) -> _Plan:
    B, T, H, K = k.shape
    V = v.shape[-1]
    if not (chunk >= 16 and chunk & (chunk - 1) == 0):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk}")
    if segment_chunks is None:
        segment_chunks = _default_segment_chunks(B * T, H, chunk)
    if segment_chunks < 1:
        raise ValueError(f"segment_chunks must be >= 1, got {segment_chunks}")
    seg_tokens = chunk * segment_chunks
    if fuse_dkdv is None:
        fuse_dkdv = triton.next_power_of_2(K) * triton.next_power_of_2(V) <= FUSED_DKDV_MAX_ELEMENTS
    seg_bounds = seq_segs = seq_ends = None
    if cu_seqlens is None:
        # At least one (possibly empty) segment per row, so that T == 0 still scans h0.
        n_seqs, segs_per_seq = B, max(1, triton.cdiv(T, seg_tokens))
        n_segs = B * segs_per_seq
    else:
        n_seqs, segs_per_seq = cu_seqlens.numel() - 1, 0
        if cu_seqlens_host is not None:
            bounds = torch.as_tensor(cu_seqlens_host, dtype=torch.int64, device="cpu")
            # At least one row in the segment table: the grid is never empty.
            n_segs = max(1, int(((bounds[1:] - bounds[:-1] + seg_tokens - 1) // seg_tokens).sum()))
        else:
            n_segs = triton.cdiv(T, seg_tokens) + n_seqs
        cu = cu_seqlens.to(torch.int64)
        n_seg_of_seq = (cu[1:] - cu[:-1] + seg_tokens - 1) // seg_tokens
        seq_segs = torch.nn.functional.pad(n_seg_of_seq.cumsum(0), (1, 0))
        s = torch.arange(n_segs, device=cu.device)
        seq = torch.searchsorted(seq_segs[1:], s, right=True).clamp_(max=n_seqs - 1)
        start = cu[seq] + (s - seq_segs[seq]) * seg_tokens
        end = torch.minimum(start + seg_tokens, cu[seq + 1])
        valid = s < seq_segs[-1]
        seg_bounds = torch.stack([start * valid, end * valid], 1).contiguous()
        seq_ends = cu[1:]
    return _Plan(B, T, H, K, V, n_seqs, chunk, seg_tokens, segs_per_seq, n_segs,
                 fuse_dkdv, decay_grad, seg_bounds, seq_segs, seq_ends)


def _geometry(plan: _Plan, ref: torch.Tensor):
    """The segment table (`ref` as an unused dummy when unpacked) and the size arguments
    (T, SEG_TOKENS, SEGS_PER_SEQ) of every segment kernel."""
    return (plan.seg_bounds if plan.varlen else ref), (plan.T, plan.seg_tokens, plan.segs_per_seq)


def _scan(summaries, g_seg, init, out, plan: _Plan, reverse: bool):
    KV = plan.K * plan.V
    dummy = summaries
    block = LAUNCH["scan"].block
    _scan_kernel[(plan.n_seqs, plan.H, triton.cdiv(KV, block))](
        summaries, dummy if g_seg is None else g_seg, dummy if init is None else init,
        dummy if out is None else out, plan.seq_segs if plan.varlen else dummy, plan.segs_per_seq,
        H=plan.H, KV=KV, BLOCK=block, USE_G=g_seg is not None, HAS_INIT=init is not None,
        STORE_OUT=out is not None, REVERSE=reverse, VARLEN=plan.varlen, **_launch_kw("scan"))


def _forward_states(k, v, g, h0, plan: _Plan):
    """Summary and scan launches: every segment's incoming state (overwriting its summary),
    the segments' log-transitions (or None) and each sequence's final state."""
    H, K, V, NS = plan.H, plan.K, plan.V, plan.n_segs
    dev, use_g = k.device, g is not None
    seg_bounds, sizes = _geometry(plan, k)

    states = _new((NS, H, K, V), torch.float32, dev)
    g_seg = _new((NS, H), torch.float32, dev) if use_g else None
    row = "summary_dg" if plan.decay_grad else "summary"
    BK, BV = (min(LAUNCH[row].block, triton.next_power_of_2(dim)) for dim in (K, V))
    _fwd_summary_kernel[(triton.cdiv(K, BK) * triton.cdiv(V, BV) * NS, H)](
        k, v, g if use_g else k, seg_bounds, states, states if g_seg is None else g_seg, *sizes,
        H=H, K=K, V=V, C=plan.chunk, BK=BK, BV=BV, USE_G=use_g, DG=plan.decay_grad,
        VARLEN=plan.varlen, **_launch_kw(row))

    final = _new((plan.n_seqs, H, K, V), torch.float32, dev)
    _scan(states, g_seg, h0, final, plan, reverse=False)
    return states, g_seg, final


def _forward_output(q, k, v, g, w, rows, states, scale, plan: _Plan):
    """Output launch: every segment walked again from its incoming state (rows scaled by
    the row weight `w` when given; queries gathered by `rows` when given, the output then
    fp32)."""
    H, K, V, NS = plan.H, plan.K, plan.V, plan.n_segs
    use_g = g is not None
    seg_bounds, sizes = _geometry(plan, q)
    o = _new((plan.B, plan.T, H, V), q.dtype if rows is None else torch.float32, q.device)
    BK, BV = triton.next_power_of_2(K), _tile("output", V, K)
    _fwd_output_kernel[(triton.cdiv(V, BV) * NS, H)](
        q, k, v, g if use_g else q, q if w is None else w, q if rows is None else rows, seg_bounds, states,
        o, scale, *sizes, H=H, K=K, V=V, C=plan.chunk, BK=BK, BV=BV, USE_G=use_g,
        ROW_WEIGHT=w is not None, GATHER=rows is not None, VARLEN=plan.varlen, **_launch_kw("output"))
    return o


def _backward_dq(q, k, v, g, w, rows, do, states, scale, plan: _Plan):
    """dq launch: dq, every segment's local state gradient dU_s, and dB_q (for the decay's
    gradient or a row weight `w`; None otherwise). With `rows`, dq is per position, fp32."""
    H, K, V, NS, TT = plan.H, plan.K, plan.V, plan.n_segs, plan.tokens
    dev, use_g = q.device, g is not None
    seg_bounds, sizes = _geometry(plan, q)
    BK, BV = _tile("dq", K, V), triton.next_power_of_2(V)
    n_k_tiles = triton.cdiv(K, BK)
    dq = _new(k.shape, q.dtype if rows is None else torch.float32, dev)
    d_states = _new((NS, H, K, V), torch.float32, dev)
    dB_q = _new((TT, H, n_k_tiles), torch.float32, dev) if plan.decay_grad or w is not None else None
    _bwd_dq_kernel[(n_k_tiles * NS, H)](
        q, k, v, g if use_g else q, q if w is None else w, q if rows is None else rows, do, seg_bounds,
        states, dq, d_states, q if dB_q is None else dB_q, scale, *sizes,
        H=H, K=K, V=V, C=plan.chunk, BK=BK, BV=BV, USE_G=use_g, DG=plan.decay_grad,
        ROW_WEIGHT=w is not None, GATHER=rows is not None, VARLEN=plan.varlen, **_launch_kw("dq"))
    return dq, d_states, dB_q


def _backward_kvg(q, k, v, g, w, rows, do, d_final, d_states, g_seg, final, dB_q, scale, want_dh0, want_dg,
                  plan: _Plan):
    """Reverse scan (from d final_state) and dk/dv launches, then the dg epilogue: returns
    dk, dv, dg (or None), d initial_state (or None). `d_states` is overwritten."""
    H, K, V, NS, TT = plan.H, plan.K, plan.V, plan.n_segs, plan.tokens
    dev, use_g = q.device, g is not None
    seg_bounds, sizes = _geometry(plan, q)
    common = dict(H=H, K=K, V=V, C=plan.chunk, USE_G=use_g, DG=plan.decay_grad, ROW_WEIGHT=w is not None,
                  GATHER=rows is not None, VARLEN=plan.varlen)

    dh0 = _new((plan.n_seqs, H, K, V), torch.float32, dev) if want_dh0 else None
    _scan(d_states, g_seg, d_final, dh0, plan, reverse=True)

    dk = _new(k.shape, k.dtype, dev)
    dv = _new(v.shape, v.dtype, dev)
    PK, PV = triton.next_power_of_2(K), triton.next_power_of_2(V)
    row = "dkdv_dg" if plan.decay_grad else "dkdv"
    BK = PK if plan.fuse_dkdv else _tile(row, K, V)
    n_k_tiles = triton.cdiv(K, BK)
    dB_k = _new((TT, H, n_k_tiles), torch.float32, dev) if plan.decay_grad else q
    args = (q, k, v, g if use_g else q, q if w is None else w, q if rows is None else rows, do, seg_bounds,
            d_states, dk, dv, dB_k, scale, *sizes)
    common.update(_launch_kw(row))
    if plan.fuse_dkdv:
        _bwd_dkdv_kernel[(NS, H)](*args, BK=PK, BV=PV, DO_DK=True, DO_DV=True, **common)
    else:
        BV = _tile(row, V, K)
        _bwd_dkdv_kernel[(triton.cdiv(V, BV) * NS, H)](*args, BK=PK, BV=BV, DO_DK=False, DO_DV=True, **common)
        _bwd_dkdv_kernel[(n_k_tiles * NS, H)](*args, BK=BK, BV=PV, DO_DK=True, DO_DV=False, **common)

    if not want_dg:
        return dk, dv, None, dh0
    if not plan.decay_grad:
        raise RuntimeError("dg was asked for, but g did not require grad when the call was planned")
    return dk, dv, _decay_grad(dB_q.sum(-1) - dB_k.sum(-1), final, d_final, plan), dh0


def _decay_grad(dB, final, d_final, plan: _Plan):
    """dg_u = Σ_{t ≥ u in u's sequence} dB_t + <d final, final> of that sequence.

    dB_t = q_t·dq_t − k_t·dk_t is the gradient w.r.t. the cumulative log-decay at t; g_u
    enters every cumulative decay from u on, and the final state scales with each g_u.
    The long suffix sums run in float64 (device ops only, no host sync).
    """
    B, T, H = plan.B, plan.T, plan.H
    dB = dB.double()
    final_term = None if d_final is None else (d_final.double() * final.double()).sum((-2, -1))
    # Suffix sums along the innermost axis: a cumsum over a long strided axis runs one
    # sequential thread per column on the GPU, along the last axis it is a parallel scan.
    if not plan.varlen:
        dg = _suffix_sum(dB.view(B, T, H).transpose(1, 2)).transpose(1, 2)
        if final_term is not None:
            dg = dg + final_term[:, None, :]
        return dg.float().contiguous()
    suffix = torch.cat([_suffix_sum(dB.T), dB.new_zeros(H, 1)], 1).T
    seq = torch.searchsorted(plan.seq_ends, torch.arange(plan.tokens, device=dB.device), right=True)
    dg = suffix[:-1] - suffix[plan.seq_ends[seq]]
    if final_term is not None:
        dg += final_term[seq]
    return dg.float().view(B, T, H)


def _suffix_sum(x):
    """Inclusive suffix sums along the last axis (made contiguous first)."""
    return x.contiguous().flip(-1).cumsum(-1).flip(-1)


@dataclass(frozen=True)
class TritonPhases:
    """The launches of one call grouped at their data dependencies, in the phases of
    `lasp.kernels.linear_attention_phases`: summary + scan | output | dq | reverse scan +
    dk/dv + dg epilogue. Holds the launch geometry only; tensors are passed in.

    `saved` = (every segment's incoming state, the segments' log-transitions, the final
    states): small, one K×V state per segment and head; the backward recomputes every
    chunk state from those. `partial` = (do, the segments' local state gradients, dB_q).

    `row_weight` (fp32 [B·T] or None, the same for every phase of a call): the output is
    w_t · o_t. MoM passes its routing weights here, so that the backward applies them in
    fp32 rather than receiving w·do rounded to the dot dtype.

    `rows` (int64 [B·T] or None, the same for every phase of a call): position t's query
    and output gradient are row rows[t] of q and do, which may then have any number of
    rows (MoM: its routed copies read their token's row, no copies are materialised).
    The output and dq are per position and fp32, for the caller to sum and round once.
    """

    plan: _Plan
    scale: float

    def summarize(self, k, v, g, initial_state):
        states, g_seg, final = _forward_states(k, v, g, initial_state, self.plan)
        return final, (states, g_seg, final)

    def output(self, q, k, v, g, saved, row_weight=None, rows=None):
        return _forward_output(q, k, v, g, row_weight, rows, saved[0], self.scale, self.plan)

    def grad_q(self, q, k, v, g, saved, do, row_weight=None, rows=None):
        do = do.contiguous()
        dq, d_states, dB_q = _backward_dq(q, k, v, g, row_weight, rows, do, saved[0], self.scale, self.plan)
        return dq, (do, d_states, dB_q)

    def grad_kvg(self, q, k, v, g, saved, partial, d_final, want_dg=True, want_dh0=True,
                 row_weight=None, rows=None):
        """(dk, dv, dg or None, d initial_state or None)."""
        _, g_seg, final = saved
        do, d_states, dB_q = partial
        d_final = None if d_final is None else d_final.float().contiguous()
        return _backward_kvg(q, k, v, g, row_weight, rows, do, d_final, d_states, g_seg, final, dB_q,
                             self.scale, want_dh0, want_dg and g is not None, self.plan)

    @staticmethod
    def grad_row_weight(partial, row_weight):
        """d row_weight [B·T]: Σ over heads of do_t·o_t = q_t·dq_t / w_t, from the dq walk's
        dB_q (0 where w_t = 0: a zero weight's gradient multiplies nothing upstream)."""
        q_dq = partial[2].sum((1, 2))
        return torch.where(row_weight != 0, q_dq / row_weight, 0.0)


class _TritonLinearAttention(torch.autograd.Function):
    """Differentiable in q, k, v, g, the initial state and the row weight, and through the
    final state: the phases run back to back."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, row_weight, phases, output_final_state):
        final, saved = phases.summarize(k, v, g, initial_state)
        o = phases.output(q, k, v, g, saved, row_weight)
        ctx.save_for_backward(q, k, v, g, row_weight, *saved)
        ctx.phases = phases
        ctx.has_initial_state = initial_state is not None
        ctx.set_materialize_grads(False)
        return o, final if output_final_state else None

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, d_final):
        q, k, v, g, row_weight, *saved = ctx.saved_tensors
        if do is None:
            do = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
        dq, partial = ctx.phases.grad_q(q, k, v, g, saved, do, row_weight)
        dk, dv, dg, dh0 = ctx.phases.grad_kvg(
            q, k, v, g, saved, partial, d_final, want_dg=ctx.needs_input_grad[3],
            want_dh0=ctx.has_initial_state and ctx.needs_input_grad[4], row_weight=row_weight)
        dw = ctx.phases.grad_row_weight(partial, row_weight) if ctx.needs_input_grad[5] else None
        return dq, dk, dv, dg, dh0, dw, None, None


def triton_phases(q, k, v, g, scale, initial_state, cu_seqlens, cu_seqlens_host=None, *,
                  chunk_size=CHUNK_SIZE, segment_chunks=None, fuse_dkdv=None):
    """`TritonPhases` for these inputs (arguments as in `triton_linear_attention`), and the
    inputs in the form its phases take: (q, k, v, g, initial_state), contiguous, the decay
    and the state in fp32 (differentiable conversions)."""
    plan = _make_plan(k, v, g is not None and g.requires_grad, cu_seqlens, cu_seqlens_host, chunk_size,
                      segment_chunks, fuse_dkdv)
    inputs = (q.contiguous(), k.contiguous(), v.contiguous(),
              None if g is None else g.float().contiguous(),
              None if initial_state is None else initial_state.float().contiguous())
    return TritonPhases(plan, float(scale)), inputs


def triton_linear_attention(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens,
                            cu_seqlens_host=None, *, row_weight=None, chunk_size=CHUNK_SIZE,
                            segment_chunks=None, fuse_dkdv=None):
    """Causal chunkwise linear attention on the Triton backend (inputs already validated).

    Args:
        q, k: [B,T,H,K]; v: [B,T,H,V]; one dtype (bf16/fp16/fp32); CUDA tensors (or CPU
            under TRITON_INTERPRET=1); K and V in 16..256.
        g: None or [B,T,H] float32 natural-log decay per token (≤ 0).
        scale: python float multiplying q.
        initial_state: None or [N,H,K,V] float32 (N = B, or len(cu_seqlens) - 1).
        output_final_state: also return the state after each sequence's last token.
        cu_seqlens: None or int32/int64 device tensor [N+1] of packed offsets (B == 1).
        cu_seqlens_host: optional host copy (list or CPU tensor) of `cu_seqlens`; it only
            tightens the launch grid, the kernels read the device tensor.
        row_weight: None or fp32 [B·T]: returns w_t·o_t, with w's gradient, and its
            backward applies w in fp32 (`TritonPhases`).
        chunk_size, segment_chunks: tokens per chunk (power of two ≥ 16) and chunks per
            segment (default from the shapes, `_default_segment_chunks`). fuse_dkdv: one
            backward launch for dk and dv (default when the K×V state gradient fits one
            program, `FUSED_DKDV_MAX_ELEMENTS`). Tuning and test knobs.

    Returns (o [B,T,H,V] in q.dtype, final_state [N,H,K,V] float32 or None), differentiable
    in q, k, v, g, initial_state and row_weight.
    """
    phases, inputs = triton_phases(q, k, v, g, scale, initial_state, cu_seqlens, cu_seqlens_host,
                                   chunk_size=chunk_size, segment_chunks=segment_chunks,
                                   fuse_dkdv=fuse_dkdv)
    if row_weight is not None:
        row_weight = row_weight.float().contiguous()
    return _TritonLinearAttention.apply(*inputs, row_weight, phases, bool(output_final_state))
