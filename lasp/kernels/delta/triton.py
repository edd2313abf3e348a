"""The delta rule on the GPU: fused Triton kernels for DeltaNet, Gated DeltaNet and KDA
(decay none, g or gk: the kernels' DECAY 0 / 1 / 2), forward and backward.

The chunkwise WY / UT-transform form (`lasp.kernels.delta.wy`): per chunk of C tokens,
with Γ the chunk-local inclusive cumulative log-decay (zero without a decay), γ its last
value and E_ts = e^{Γ_t − Γ_s} (s ≤ t, masked to −inf before the exp elsewhere)::

    N = StrictTril(diag(β) K Kᵀ ⊙ E)       R = (I + N)⁻¹
    w = R diag(β) (K ⊙ e^Γ)                 u = R diag(β) V
    δ = u − w S                             S_next = e^γ S + (K ⊙ e^{γ−Γ})ᵀ δ
    o = scale [(Q ⊙ e^Γ) S + A δ],          A = tril(Q Kᵀ ⊙ E)

(with a per-key gk, Γ is [C, K] and the products with E are per key:
N_ts = β_t Σ_k k_tk k_sk e^{Γ_tk − Γ_sk}, A likewise).

Per-key decays: where every key of a tile decays by less than e^-60 over the chunk, the
products through the pair decays (the UT transform's N, the outputs' scores, the chunk
backward's) are one tensor-core product of the factors · ⊙ e^Γ and · ⊙ e^{−Γ}
(`PER_KEY_BRANCHES`; below e^60, finite in fp32; KDA at 1×32K on an H100, ms against the exact
form's: UT transform 1.93 / 4.89, outputs 1.42 / 4.38, outputs' dδ 0.99 / 3.60, chunk
backward 2.58 / 7.93 and 3.17 / 8.10). Strong decays never form e^{−Γ}: pairs inside a
16-token block are summed exactly, column by column, with exponents Σ_{s<u≤t} gk_u
(`_block_pairs`); pairs across blocks go through a reference token between them, one
halving level of the chunk per tensor-core product (`_halving`, as
`lasp.kernels.delta.wy._per_key_scores`), so both factors are ≤ 1. The walk's factors
K ⊙ e^{γ−Γ}, Q ⊙ e^Γ and K ⊙ e^Γ are ≤ 1 too: any decay (gk ~ −30 per token) stays
finite and exact. The choice is made per chunk on the device, as the per-key family's
(`lasp.kernels.diagonal.triton`): each per-chunk kernel is launched twice, once compiled for
the factored chunks and once for the exact ones (`PER_KEY_BRANCHES`), so that neither holds
the other's registers.

Launches (one program per chunk slot and head unless said):

forward
  1. `_inverse_kernel`: R (the 16×16 diagonal blocks of I + N inverted by forward
     substitution in fp32, all blocks at once; then the blocks below by the product form
     (I + P)(I + P²)… of P = −D⁻¹ N_below, nilpotent of index C/16).
  2. `_wy_kernel`: w, u, and the walk's k_end = K ⊙ e^{γ−Γ} and γ.
  3. `_state_pass_kernel`, per (document, head, V-tile): δ and every chunk's incoming
     state S, walking the document (as fla's `chunk_gated_delta_rule_fwd_h`).
  4. `_output_kernel`, per (chunk, head, V-tile): o.

backward
  1. `_output_grad_kernel`, per (chunk, head, V-tile): the outputs' dδ = scale Aᵀ do,
     and (once per chunk and head) the walk's factor scale Q ⊙ e^Γ in the walk operands'
     dtype: the walk's V-tile programs read it instead of each decaying q again (H100,
     1×32K, the backward walk 1.75 ms against 3.29 for KDA, 1.64 / 1.84 Gated DeltaNet,
     1.54 / 1.73 DeltaNet; delta_walk_q_decayed_1x32768_h100_2026-12-07-s11).
  2. `_state_pass_grad_kernel`, per (document, head, V-tile), walking back: the total
     dδ = dδ(outputs) + k_end dS_next, and dS = e^γ dS_next + (scale Q ⊙ e^Γ)ᵀ do − wᵀ dδ,
     d initial state.
  3. `_key_grad_kernel`, per (chunk, head, K-tile), V in tiles: from S, dS_next, δ and
     dδ the terms that need all of V for the tile's keys: the outputs' (dq, final) and
     the walk's (k_end, γ) into a partial dk (fp32) and dw = −dδ Sᵀ (in the walk
     operands' dtype; scratch [n_slots, H, C, K] each); the decay's share of dg (into dg
     per key; for g one row per K-tile).
  4. `_wy_grad_kernel`, K and V in tiles: the UT transform's terms, which need all of K:
     u = R βV (dv; dR ← dδ (βV)ᵀ), w = R B (dR ← dw Bᵀ over the K-tiles first), then
     R = (I + N)⁻¹ (dN = −Rᵀ dR Rᵀ) per K-tile: dk, dβ, the rest of dg. dg / dgk is the
     chunk's reverse cumulative sum of dΓ plus dγ (chunk-local: per key for gk).
     Splitting the chunk backward so (one program per chunk holding ~8 [C, K] fp32 tiles
     spilled 1.7-4 KB a thread at K = 128 on sm_90) leaves no launch spilling there
     (benchmarks/kernel_resources.py).

Intermediates live in chunk slots ([n_slots, H, C, ·]; `ChunkLayout`); inputs and
gradients stay token-major [B, T, H, ·]. Packed documents: a slot table on the device (no
host sync; the number of slots is a bound from shapes).

Precision. The walks' stored operands w and k_end take `WALK_OPERANDS` for 16-bit inputs:
bf16 (the default: half the bytes and shared memory of a pipeline stage) or fp32 (TF32
products, the accuracy baseline; fp32 inputs always), and so do the chunks' incoming states
S, which only the outputs and the chunk backward read, and the backward walk's outputs dδ
and dS' (read by the chunk backward). Where a walk's fp32 operand in registers meets a bf16
w or k_end, it is split into two bf16 halves, hi + lo (`_walk_dot`), so that only w's and
k_end's rounding enters: δ (stored in fp32) in the forward walk's S' += k_endᵀ δ, dS' in the
backward walk's dδ = k_end dS'. The forward walk's W S takes S as stored and the backward
walk's Wᵀ dδ takes dδ as stored (one product each, fla's rounding; the chunks read those
same rounded S and dδ). On an H100 (tests/kernels/test_delta_gpu.py, bf16 inputs against the
fp32 chunk form, 24 cases; delta_gpu_h100_2026-12-07-s17) the worst error is 3.83e-3 with
bf16 operands (DeltaNet's dk, packed documents at K = 128; 3.72e-3 before dw took bf16 and
the inverse TF32, 3.16e-3 with every walk product hi + lo and dδ, dS' in fp32) and 2.52e-3
with fp32 ones; Gated DeltaNet and KDA stay within 2.8e-3. One code path: the kernels take
the loaded tiles' dtype, the carried state and every accumulator stay fp32 in registers.
R = (I + N)⁻¹ stays fp32 (every w, u and gradient goes through it, dN = −Rᵀ dR Rᵀ through it
twice, and at [C, C] a chunk it is no big read), as do u and the outputs' dδ (addends, never
operands), the final states and the chunk backward's partial dk and g's partial dg
(gradients, as accurate as registers would keep them); its dw, read only as an operand of
wy_grad's products, takes the walk operands' dtype. A product with an fp32 factor computed in
registers (R, βV, Q ⊙ e^Γ, the scores A) takes its narrow tile widened (TF32), except the
backward walk's (Q ⊙ e^Γ)ᵀ do, a walk product as in fla. Without a per-key decay the outputs' Q Kᵀ and Q S
are products of the stored tiles (exact for bf16, in half the registers), a scalar decay
applied to them after. The inverse's block products are TF32 (`INVERSE_PRECISION`).
Launch parameters: the `delta.*` rows of `lasp.kernels.common.launch.LAUNCH` (the walks'
`_bf16` rows for bf16 operands, the chunk backward's `_per_key` rows for gk).

Speed. The timings of every session are in README.md ("Measured") and benchmarks/results/;
the measurements behind the choices above (1×32K, H=16, D=128, bf16, fwd+bwd, before and
after in one process):
- bf16 walk operands, fp32 walk outputs, hi + lo products: DeltaNet 8.02 ms against 11.23
  with fp32 operands on an H100 (kernels_walk_modes_1x32768_h100_2026-12-07-s7); with the
  walks' outputs in bf16 too, errors reached 4.3e-3. One bf16 product each instead of hi +
  lo (fla's rounding): 0.42 ms less, but DeltaNet's worst error 3.99e-3 against 3.20e-3 on
  an H200 (delta_variants_walks_combo_1x32768_h200_2026-12-07-s13).
- The backward walk's dδ and dS' in the walk operands' dtype, its Wᵀ dδ one product: on an
  H100 DeltaNet 5.72 ms against 6.07, Gated DeltaNet 6.38 against 6.63, worst error 3.64e-3
  against 3.20e-3 (the forward walk's δ in bf16 too: Gated DeltaNet's results differed
  between two runs of one binary; delta_variants_walk_bytes_1x32768_h100_2026-12-07-s14).
- The forward walk's W S one product of S as stored (was hi + lo): on an H100 its walk 536
  µs against 675, DeltaNet 5.64 ms against 5.73, Gated DeltaNet 6.25 against 6.32, KDA
  11.91 against 11.99; worst error against the fp32 chunk form 3.78e-3 against 3.64e-3
  (delta_variants_walk_rounding_1x32768_h100_2026-12-07-s15).
- The walks' V-tiles: 64 wide where documents × heads × V-tiles still give every SM a
  program, halved down to 16 otherwise (`_walk_grid`; every program re-reads its chunks' W
  and k_end); the measurements are beside the walks' rows in `launch.LAUNCH`.
- The walks' register operands loaded a chunk ahead (u and γ forward, the outputs' dδ and
  γ backward) and the outputs' dδ added after the backward walk's k_end dS' rather than
  starting its accumulator: on an H100 at (1,32K) DeltaNet 5.38 ms against 5.64, Gated
  DeltaNet 5.67 against 6.31, KDA 11.24 against 11.91 (backward walk 1.01 / 0.99 / 1.00 ms
  against 1.36 / 1.48 / 1.57; the forward walk 636 / 644 / 647 µs against 553 / 790 / 885:
  u ahead costs DeltaNet there, γ ahead pays), at (8,4K) 4.74 / 5.07 / 10.56 against 4.88 /
  5.15 / 10.69, errors unchanged (delta_variants_walks_ahead_*_h100_2026-12-07-s16; ncu had
  the backward walk stalled on loads into registers half its cycles).
- Not taken: the backward walk's dδ = k_end dS' as one product of dS' as stored, DeltaNet
  5.51 ms against 5.64 but a worst error of 3.95e-3
  (delta_variants_bwd_round_1x32768_h100_2026-12-07-s15).
- The walks' chain is not what limits them: with the next state made independent of δ
  (timing only) the forward walk took as long and the backward 1.31 ms against 1.55; walks
  passing S' = e^γ S − P S + k_endᵀ u with P = k_endᵀ w formed per chunk (one product on
  the chain, [K, K] read a chunk) took 2.4 + 4.9 ms fp32 and 1.2 + 1.5 ms bf16 against
  0.66 + 1.55, before forming P (delta_variants_transitions_1x32768_h100_2026-12-07-s14).
- S in the walk operands' dtype: DeltaNet 6.61 ms against 7.42 on an H100
  (delta_states_bf16_1x32768_h100_2026-12-07-s12). dδ Sᵀ with dδ split hi + lo instead
  gave KDA dk 3.00e-3 and 3.25e-3 in two runs of one binary (triton 3.6 on Hopper), so dδ
  is rounded to S's dtype there.
- The outputs' exact products: DeltaNet 6.20 ms against 6.52 on an H200; the substitution
  loading N's rows: UT transform 1.00 ms against 1.33 (DeltaNet)
  (delta_variants_parts_1x32768_h200_2026-12-07-s13).
- Session 17, each against session 16's kernels in one process on an H100, fwd+bwd ms at
  (1,32K) for DeltaNet / Gated DeltaNet / KDA, main 5.39 / 5.65 / 11.14
  (delta_variants_ut_candidates_*_h100_2026-12-07-s17):
  - the substitution of every diagonal block at once (15 steps, not C/16 × 15), N's
    blocks loaded under every decay: 5.34 / 5.67 / 10.75 (UT transform 1.01 / 1.00 / 1.96
    ms → 0.96 / 0.99 / 1.42; at (8,4K) KDA 10.58 → 10.12);
  - the inverse's products in TF32 instead of 3×TF32: 5.20 / 5.53 / 10.89, and with the
    former 5.22 / 5.53 / 10.55 (UT 0.81 / 0.85 / 1.24 ms). Errors against the float64 chunk
    form: equal with random keys; with each chunk's keys near one direction and β near 1
    (T = 8192) DeltaNet's worst 1.60e-2 → 1.33e-2, Gated DeltaNet's 8.86e-3 → 9.06e-3,
    KDA's 9.08e-3 → 9.28e-3;
  - dw in the walk operands' dtype: 5.12 / 5.48 / 10.92 (worst error 3.78e-3 → 3.86e-3);
  - the forward walk loading γ ahead but u in its chunk: 5.30 / 5.64 / 11.12;
  - KDA's two launches per per-chunk kernel: 10.03 against 11.14 (8.66 with only the
    factored branch compiled, timing only; at (8,4K) 9.51 / 8.04 against 10.56); with
    decays strong enough that every chunk takes the exact branch, 30.9 against 30.2
    (delta_variants_kda_two_launch_*_h100_2026-12-07-s17).
- The backward walk reading scale Q ⊙ e^Γ stored by `_output_grad_kernel`: KDA 13.21 ms
  against 14.31 on an H100 (delta_walk_q_decayed_1x32768_h100_2026-12-07-s11).
- Session 18, against session 17's kernels in one process on an H100
  (delta_variants_ut_split_*_h100_2026-12-07-s18): the UT transform in two launches
  (`_inverse_kernel`) and KDA's per-chunk programs deciding their launch before loading q:
  (1,32K) 4.91 / 5.24 / 9.32 → 4.77 / 5.17 / 9.01, (8,4K) 4.37 / 4.70 / 8.74 → 4.25 /
  4.67 / 8.50, KDA with every chunk exact 28.6 → 28.3. Not taken: the chunk backward in one
  launch per chunk and head (key tiles, a barrier, then the UT transform's gradient reading
  their scratch back from L2): 928 B of spills a thread on 4 warps, DeltaNet 5.45 ms at
  (8,4K) (4.93 on 8 warps) against 4.37.
Now, on an H100, in one run with fla's `chunk_delta_rule`
(kernels_delta_vs_fla_*_h100_2026-12-07-s18): DeltaNet 4.22 / 4.75 / 18.6 ms at (8,4K) /
(1,32K) / (1,128K) against fla's 3.52 / 5.03 / 19.5; Gated DeltaNet 4.64 / 5.13 / 20.2, KDA
8.43 / 8.90 / 35.4 (fla's `chunk_kda` 10.7 / 13.4 / 52.7 in session 16's run,
kernels_delta_vs_fla_walks_ahead_h100_2026-12-07-s16).

Bytes, an estimate from the tensors' shapes (DeltaNet, C = 64, K = V = 128, bf16 walk
operands, a tile re-read by several V-tile programs counted once): the launches above move
~992 KB per chunk and head (UT inverse 32, w and u 112, forward walk 128, outputs 112,
outputs' dδ 96, backward walk 144, key_grad 224, wy_grad 144): 2.74 ms for the 8192 chunks
and heads of (8,4K) at the copy bandwidth session 18 measured on its H100, 3.04 TB/s
(kernels_delta_vs_fla_8x4096_1x32768_h100_2026-12-07-s18), against DeltaNet's 4.25 ms there,
4.23 of it in these launches (delta_variants_ut_split_8x4096_h100_2026-12-07-s18). Every
launch but the UT inverse (4.1× its bytes' time) and wy_grad (2.5×) runs at 74-95% of that
bandwidth. fla's `chunk_delta_rule` moves about as many bytes (bf16 intermediates, but w, u
and the walk recomputed in the backward). A time of 2.35 ms at (8,4K), 1.5× fla's,
therefore needs fewer bytes (δ, u, the outputs' dδ and the partial dk narrower or never
stored), not only faster launches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lasp.kernels import compiled
from lasp.kernels.common import launch
from lasp.kernels.common.documents import TorchPhases, document_count
from lasp.kernels.common.launch import chunk_for_head_dims, launch_kw, multiprocessors, tile
from lasp.kernels.common.plan import document_chunk_slots
from lasp.kernels.common.scan import DECAY_NONE, DECAY_PER_KEY, DECAY_SCALAR
from lasp.kernels.common.tiles import FACTORED_LOG_DECAY, factored, load_tile, span_range, store_tile
from lasp.kernels.delta.chunk import check_chunk_size, split, widen

# The diagonal blocks of the UT transform are inverted exactly, BLOCK×BLOCK each, by forward
# substitution; the blocks below the diagonal by products. Chunks are whole blocks.
BLOCK = 16

# The walks' narrowest V-tile: tl.dot's smallest N.
NARROWEST_V_TILE = 16

# Precision of the products that assemble (I + N)⁻¹ from its diagonal blocks: TF32, faster
# than 3×TF32 (about fp32) at errors within 5% of its even for the worst-conditioned inverse
# (module docstring, "Speed", session 17).
INVERSE_PRECISION = "tf32"

# Element type of the walks' stored operands (w, k_end) for 16-bit inputs: "bfloat16"
# (fp16 inputs take bf16 too) or "float32"; fp32 inputs always take float32.
# `triton_linear_attention(walk_operands=...)` overrides it per call. bf16: the walks take
# half the time of fp32 ones at 2.97e-3 against 2.51e-3 worst error on an H100 (module
# docstring, "Precision" and "Speed").
WALK_OPERANDS = "bfloat16"
WALK_OPERAND_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


# --------------------------------------------------------------------------------------
# Chunk layout
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkLayout:
    """Every document cut into whole chunks of `chunk` tokens, as `n_slots` chunk slots
    ([n_slots, H, C, ...] tensors; padded tokens are zero).

    `doc_chunk0` / `doc_chunks` (int32 [N], device): each document's first slot and
    number of chunks. Unpacked rows have `per_row` slots each; packed input has
    `slot_bounds` (int64 [n_slots, 2], device: each slot's token range on the flattened
    B·T axis, empty for the trailing slots no document uses); unpacked: None.
    """

    B: int
    T: int
    chunk: int
    n_slots: int
    per_row: int
    doc_chunk0: torch.Tensor
    doc_chunks: torch.Tensor
    slot_bounds: torch.Tensor | None

    @property
    def n_docs(self) -> int:
        return self.doc_chunks.numel()

    @property
    def varlen(self) -> bool:
        return self.slot_bounds is not None

    def slot_args(self, dummy):
        """The slot arguments of the per-chunk kernels: (slot table or `dummy`, T, per_row)."""
        return (self.slot_bounds if self.varlen else dummy), self.T, self.per_row


def chunk_layout(B: int, T: int, cu_seqlens, chunk: int, device) -> ChunkLayout:
    """The `ChunkLayout` of B rows of T tokens, packed by `cu_seqlens` (None, or an int
    device tensor [N+1] with B == 1): device ops only."""
    if cu_seqlens is None:
        per_row = triton.cdiv(T, chunk)
        doc_chunks = torch.full((B,), per_row, dtype=torch.int32, device=device)
        doc_chunk0 = torch.arange(B, dtype=torch.int32, device=device) * per_row
        return ChunkLayout(B, T, chunk, B * per_row, per_row, doc_chunk0, doc_chunks, None)
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    n_docs = cu.numel() - 1
    chunk0, n_slots = document_chunk_slots(cu, T, chunk)
    chunks = chunk0[1:] - chunk0[:-1]
    slot = torch.arange(n_slots, device=device)
    slot_valid = slot < chunk0[-1]
    slot_doc = torch.searchsorted(chunk0[1:], slot, right=True).clamp_(max=n_docs - 1)
    start = cu[slot_doc] + (slot - chunk0[slot_doc]) * chunk
    end = torch.minimum(start + chunk, cu[slot_doc + 1])
    slot_bounds = torch.stack([start * slot_valid, end * slot_valid], 1).contiguous()
    return ChunkLayout(B, T, chunk, n_slots, 0, chunk0[:-1].to(torch.int32), chunks.to(torch.int32), slot_bounds)


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _chunk_rows(ptr, base, offs_c, offs_d, D: tl.constexpr, C: tl.constexpr, valid=True):
    """[C, BD] tile of chunk slot `base` (= slot·H + h) of a [n_slots, H, C, D] tensor; zeros
    unless `valid` (a walk's load one chunk ahead: none past its last chunk)."""
    return tl.load(ptr + (base * C + offs_c[:, None]) * D + offs_d[None, :],
                   mask=(offs_d < tl.where(valid, D, 0))[None, :], other=0.0)


@triton.jit
def _state_tile(ptr, base, offs_k, offs_v, K: tl.constexpr, V: tl.constexpr):
    """Pointers and mask of a [BK, BV] tile of state `base` (= index·H + h) of [*, H, K, V]."""
    return ptr + (base * K + offs_k[:, None]) * V + offs_v[None, :], (offs_k < K)[:, None] & (offs_v < V)[None, :]


@triton.jit
def _chunk_log_decay(g_end, base, offs_k, valid, K: tl.constexpr, DECAY: tl.constexpr):
    """γ of chunk `base` (g_end: [n, H, 1] scalar or [n, H, K] per key), 0 unless `valid`
    (none read without a decay)."""
    if DECAY == 2:
        gam = tl.load(g_end + base * K + offs_k, mask=offs_k < tl.where(valid, K, 0), other=0.0)
    elif DECAY == 1:
        gam = tl.load(g_end + base, mask=valid, other=0.0)
    else:
        gam = 0.0
    return gam


@triton.jit
def _decay_state(state, gam, DECAY: tl.constexpr):
    """e^γ ⊙ state (γ from `_chunk_log_decay`; none without a decay)."""
    if DECAY == 1:
        state = state * tl.exp(gam)
    elif DECAY == 2:
        state = state * tl.exp(gam)[:, None]
    return state


@triton.jit
def _slot_dims(start, end, offs_k, offs_v, K: tl.constexpr, V: tl.constexpr):
    """Masks of the K and V offsets that exist in a slot's walk outputs: none for an
    empty slot (start == end), which no walk writes."""
    return offs_k < tl.where(start < end, K, 0), offs_v < tl.where(start < end, V, 0)


@triton.jit
def _chunk_gates(g, offs_t, mask_t, h, offs_k, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
                 DECAY: tl.constexpr):
    """Γ, the chunk-local inclusive cumulative log-decay, and γ, its last value: [C] and a
    number for g [tokens, H] (zero without a decay, DECAY 0), [C, BK] and [BK] for gk
    [tokens, H, K] (DECAY 2). Padded tokens load zero: Γ stays flat after them."""
    if DECAY == 2:
        b_g = load_tile(g, offs_t, mask_t, h, offs_k, K, H)
    elif DECAY == 1:
        b_g = tl.load(g + offs_t * H + h, mask=mask_t, other=0.0)
    else:
        b_g = tl.zeros([C], dtype=tl.float32)
    return tl.cumsum(b_g, 0), tl.sum(b_g, 0)


@triton.jit
def _decayed(x, factor, DECAY: tl.constexpr):
    """x [C, BK] times a decay factor: one per row ([C]), or per element ([C, BK], DECAY 2)."""
    if DECAY == 2:
        out = x * factor
    else:
        out = x * factor[:, None]
    return out


@triton.jit
def _causal(rows, STRICT: tl.constexpr):
    """[C, C] mask of the pairs s ≤ t (s < t when STRICT) of a chunk's rows."""
    if STRICT:
        keep = rows[:, None] > rows[None, :]
    else:
        keep = rows[:, None] >= rows[None, :]
    return keep


@triton.jit
def _pair_decays(gam, offs_c, STRICT: tl.constexpr):
    """[C, C]: e^{Γ_t − Γ_s} for s ≤ t (s < t when STRICT), else 0 (masked before the exp)."""
    return tl.exp(tl.where(_causal(offs_c, STRICT), gam[:, None] - gam[None, :], float("-inf")))


# Per-key decays (KDA), module docstring: the factored products in the factored launch
# (`PER_KEY_BRANCHES`), else a pair s ≤ t of a chunk is either in one 16-token block (the
# diagonal blocks, computed exactly: `_block_pairs`, `_block_apply`, `_block_apply_t`) or
# split by one level of a binary halving of the chunk into blocks of 32, 64, … tokens: s in
# the left half and t in the right half of one block, whose right half starts at r
# (s < r ≤ t), so
# e^{Γ_t − Γ_s} = e^{Γ_t − Γ_r} e^{Γ_r − Γ_s} with both factors ≤ 1 (`_halving`): one
# tensor-core product per level (log2(C/16) levels), no exponent ever positive.
# The factors are fp32 here (the tiles are widened), so every input dtype takes the shared bound.
FACTORED_BOUND = tl.constexpr(FACTORED_LOG_DECAY)


# A per-key decay launches each per-chunk kernel twice: `BRANCH` 1 takes the chunks whose
# every key stays factored (`tiles.factored`) and computes them factored, 2 takes the rest and
# computes them exactly; a program returns at once when its chunk is the other launch's. Each
# launch is compiled for its own branch only, so it holds one branch's registers, not both.
# Without a per-key decay BRANCH is 0: one launch, and no per-key product to choose for.
PER_KEY_BRANCHES = (1, 2)


@triton.jit
def _other_launch(log_decays, BRANCH: tl.constexpr):
    """Whether a chunk belongs to the other launch of a per-key kernel (BRANCH 1 or 2), from
    its log-decays ([n], ≤ 0: its Γ tile's row minima or its γ)."""
    return factored(log_decays, FACTORED_BOUND) != (BRANCH == 1)


@triton.jit
def _other_launch_gamma(g_end, base, K: tl.constexpr, BRANCH: tl.constexpr):
    """`_other_launch` from chunk `base`'s γ (g_end [n, H, K]): for the K-tiled kernels,
    whose Γ tile holds only some keys."""
    gamma = _chunk_log_decay(g_end, base, tl.arange(0, triton.next_power_of_2(K)), True, K, 2)  # DECAY 2: per key
    return _other_launch(gamma, BRANCH)


@triton.jit
def _row(x, rows, r):
    """Row r of a [C, D] register tile, as [D]."""
    return tl.sum(tl.where((rows == r)[:, None], x, 0.0), axis=0)


@triton.jit
def _halving(gam, rows, LEVEL: tl.constexpr, C: tl.constexpr):
    """Halving level LEVEL (blocks of 32·2^LEVEL tokens) of a per-key Γ [C, BK]: (e^{Γ_t − Γ_r}
    on right-half rows, e^{Γ_r − Γ_s} on left-half rows, zero on the other rows, [C, BK]
    each, both ≤ 1; the [C, C] mask of pairs in one block)."""
    HALF: tl.constexpr = 16 << LEVEL
    ref = tl.zeros_like(gam)
    for i in tl.static_range(C // (2 * HALF)):
        ref = tl.where((rows // (2 * HALF) == i)[:, None], _row(gam, rows, i * 2 * HALF + HALF)[None, :], ref)
    right = ((rows % (2 * HALF)) >= HALF)[:, None]
    to_ref = tl.exp(tl.where(right, gam - ref, float("-inf")))
    from_ref = tl.exp(tl.where(right, float("-inf"), ref - gam))
    return to_ref, from_ref, (rows[:, None] // (2 * HALF)) == (rows[None, :] // (2 * HALF))


@triton.jit
def _block_pairs(a, b_ptr, g, start, end, h, rows, offs_k, H: tl.constexpr, K: tl.constexpr,
                 C: tl.constexpr, STRICT: tl.constexpr):
    """The 16×16 diagonal blocks of the [C, C] scores Σ_k a_tk b_sk e^{Γ_tk − Γ_sk} of a
    chunk starting at token `start` (`rows` its C local rows), exactly, for a per-key decay
    gk (`g`, token-major), over s ≤ t (s < t when STRICT) in t's block; zero elsewhere.
    b's rows are read from the token-major `b_ptr`; each exponent is the sum
    Σ_{s<u≤t} gk_u (never positive, no cancellation), so any decay is exact."""
    pos = rows % 16
    first = rows - pos
    expo = tl.zeros_like(a)                 # Σ_{first+j < u ≤ t} gk_u for column j of t's block
    out = tl.zeros([C, C], dtype=tl.float32)
    for jj in range(16):
        j = 15 - jj
        expo, term = _block_source(b_ptr, g, expo, start, end, h, first, pos, j, offs_k, H, K, STRICT)
        column = rows[None, :] == (first + j)[:, None]
        out += tl.where(column, tl.sum(a * term, 1)[:, None], 0.0)
    return out


@triton.jit
def _block_source(b_ptr, g, expo, start, end, h, first, pos, j, offs_k, H: tl.constexpr, K: tl.constexpr,
                  STRICT: tl.constexpr):
    """One step of a walk over the sources of each row's 16-token block, from its end: the
    source s = first + j, `expo` advanced to Σ_{s<u≤t} gk_u, and b_s ⊙ e^{expo} ([C, BK];
    zero where s is not kept: s > t, or s = t when STRICT)."""
    nxt = start + first + j + 1
    later = pos > j
    expo += load_tile(g, nxt, later & (nxt < end), h, offs_k, K, H)
    src = start + first + j
    b_s = load_tile(b_ptr, src, src < end, h, offs_k, K, H).to(tl.float32)
    if STRICT:
        keep = later
    else:
        keep = pos >= j
    return expo, b_s * tl.exp(tl.where(keep[:, None], expo, float("-inf")))


@triton.jit
def _diagonal_blocks(w, rows, C: tl.constexpr):
    """[C, 16]: each row's entries in its 16×16 diagonal block of w [C, C], w[t, 16⌊t/16⌋ + j]
    at [t, j] (gathered once for the K-tiles of `_block_apply` / `_block_apply_t`)."""
    NB: tl.constexpr = C // 16
    own = (rows // 16)[:, None, None] == tl.arange(0, NB)[None, :, None]
    return tl.sum(tl.where(own, tl.reshape(w, [C, NB, 16]), 0.0), 1)


@triton.jit
def _block_column(blocks, j):
    """Column j of a [C, 16] `_diagonal_blocks`, as [C]."""
    return tl.sum(tl.where(tl.arange(0, 16)[None, :] == j, blocks, 0.0), 1)


@triton.jit
def _block_apply(blocks, b_ptr, g, start, end, h, rows, offs_k, H: tl.constexpr, K: tl.constexpr,
                 BK: tl.constexpr, C: tl.constexpr, STRICT: tl.constexpr):
    """[C, BK] Σ_s w_ts b_s ⊙ e^{Γ_t − Γ_s} over s ≤ t (s < t when STRICT) in t's 16-token
    block, exactly (as `_block_pairs`), from w's `_diagonal_blocks`."""
    pos = rows % 16
    first = rows - pos
    expo = tl.zeros([C, BK], dtype=tl.float32)  # Σ_{first+j < u ≤ t} gk_u for column j of t's block
    out = tl.zeros([C, BK], dtype=tl.float32)
    for jj in range(16):
        j = 15 - jj
        expo, term = _block_source(b_ptr, g, expo, start, end, h, first, pos, j, offs_k, H, K, STRICT)
        out += _block_column(blocks, j)[:, None] * term
    return out


@triton.jit
def _block_apply_t(blocks_t, a_ptr, g, start, end, h, rows, offs_k, H: tl.constexpr, K: tl.constexpr,
                   BK: tl.constexpr, C: tl.constexpr, STRICT: tl.constexpr):
    """[C, BK] Σ_t w_ts a_t ⊙ e^{Γ_t − Γ_s} over t ≥ s (t > s when STRICT) in s's 16-token
    block, exactly (as `_block_pairs`; a's rows read from the token-major `a_ptr`), from
    wᵀ's `_diagonal_blocks`."""
    pos = rows % 16
    first = rows - pos
    expo = tl.zeros([C, BK], dtype=tl.float32)  # Σ_{s < u ≤ t} gk_u, t = first + j
    out = tl.zeros([C, BK], dtype=tl.float32)
    for j in range(16):
        tok = start + first + j
        later = j > pos
        expo += load_tile(g, tok, later & (tok < end), h, offs_k, K, H)
        a_t = load_tile(a_ptr, tok, tok < end, h, offs_k, K, H).to(tl.float32)
        if STRICT:
            keep = later
        else:
            keep = j >= pos
        out += _block_column(blocks_t, j)[:, None] * a_t * tl.exp(tl.where(keep[:, None], expo, float("-inf")))
    return out


@triton.jit
def _cross_block_scores(a, b, gam, rows, C: tl.constexpr, LEVELS: tl.constexpr):
    """[C, C] M_ts = Σ_k a_tk b_sk e^{Γ_tk − Γ_sk} for a per-key Γ [C, BK] over the pairs s < t
    in different 16-token blocks, else 0: the halving levels, every exponent ≤ 0."""
    out = tl.zeros([C, C], dtype=tl.float32)
    for level in tl.static_range(LEVELS):
        to_ref, from_ref, same = _halving(gam, rows, level, C)
        out += tl.where(same, tl.dot(a * to_ref, tl.trans(b * from_ref)), 0.0)
    return out


@triton.jit
def _key_scores(a, b, gam, b_ptr, g, start, end, h, rows, offs_k, H: tl.constexpr, K: tl.constexpr,
                C: tl.constexpr, LEVELS: tl.constexpr, STRICT: tl.constexpr, BRANCH: tl.constexpr):
    """[C, C] M_ts = Σ_k a_tk b_sk e^{Γ_tk − Γ_sk} for a per-key Γ [C, BK], s ≤ t (s < t when
    STRICT), else 0: factored in the factored launch (BRANCH 1, `PER_KEY_BRANCHES`), else the
    exact diagonal blocks and the halving levels."""
    if BRANCH == 1:
        out = tl.where(_causal(rows, STRICT), tl.dot(a * tl.exp(gam), tl.trans(b * tl.exp(-gam))), 0.0)
    else:
        out = (_block_pairs(a, b_ptr, g, start, end, h, rows, offs_k, H, K, C, STRICT)
               + _cross_block_scores(a, b, gam, rows, C, LEVELS))
    return out


@triton.jit
def _key_apply(w, blocks, b, gam, b_ptr, g, start, end, h, rows, offs_k, H: tl.constexpr, K: tl.constexpr,
               BK: tl.constexpr, C: tl.constexpr, LEVELS: tl.constexpr, STRICT: tl.constexpr,
               BRANCH: tl.constexpr):
    """[C, BK] Σ_s w_ts b_s ⊙ e^{Γ_t − Γ_s} (w [C, C] masked to s ≤ t, or s < t when STRICT;
    `blocks` its `_diagonal_blocks`): the gradient of the left factor of `_key_scores` for
    dM = w. Factored in the factored launch (w is masked already)."""
    if BRANCH == 1:
        out = tl.exp(gam) * tl.dot(w, b * tl.exp(-gam))
    else:
        out = _block_apply(blocks, b_ptr, g, start, end, h, rows, offs_k, H, K, BK, C, STRICT)
        for level in tl.static_range(LEVELS):
            to_ref, from_ref, same = _halving(gam, rows, level, C)
            out += to_ref * tl.dot(tl.where(same, w, 0.0), b * from_ref)
    return out


@triton.jit
def _key_apply_t(w, blocks_t, a, gam, a_ptr, g, start, end, h, rows, offs_k, H: tl.constexpr, K: tl.constexpr,
                 BK: tl.constexpr, C: tl.constexpr, LEVELS: tl.constexpr, STRICT: tl.constexpr,
                 BRANCH: tl.constexpr):
    """[C, BK] Σ_t w_ts a_t ⊙ e^{Γ_t − Γ_s} (w masked as in `_key_apply`; `blocks_t` the
    `_diagonal_blocks` of wᵀ): the gradient of the right factor of `_key_scores` for dM = w.
    Factored in the factored launch."""
    if BRANCH == 1:
        out = tl.exp(-gam) * tl.dot(tl.trans(w), a * tl.exp(gam))
    else:
        out = _block_apply_t(blocks_t, a_ptr, g, start, end, h, rows, offs_k, H, K, BK, C, STRICT)
        for level in tl.static_range(LEVELS):
            to_ref, from_ref, same = _halving(gam, rows, level, C)
            out += from_ref * tl.dot(tl.trans(tl.where(same, w, 0.0)), a * to_ref)
    return out


@triton.jit
def _scores(b_q, b_k, gam, k, g, start, end, h, rows, offs_k, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
            LEVELS: tl.constexpr, DECAY: tl.constexpr, BRANCH: tl.constexpr):
    """A [C, C], A_ts = Σ_k q_tk k_sk e^{Γ_tk − Γ_sk} for s ≤ t, else 0 (q, k in one dtype; k also
    token-major for the per-key diagonal blocks)."""
    if DECAY == 2:
        out = _key_scores(b_q.to(tl.float32), b_k.to(tl.float32), gam, k, g, start, end, h, rows, offs_k, H, K, C,
                          LEVELS, False, BRANCH)
    else:
        out = tl.dot(b_q, tl.trans(b_k)) * _pair_decays(gam, rows, False)
    return out


@triton.jit
def _slot_tokens(slot_bounds, s, T, PER_ROW, C: tl.constexpr, VARLEN: tl.constexpr):
    """Chunk slot s's token range (start, end) and its C rows' token indices and mask."""
    start, end = span_range(slot_bounds, s, T, C, PER_ROW, VARLEN)
    offs_t = start + tl.arange(0, C)
    return start, end, offs_t, offs_t < end


@triton.jit
def _slot_program(slot_bounds, T, PER_ROW, H: tl.constexpr, C: tl.constexpr, NV: tl.constexpr,
                  VARLEN: tl.constexpr):
    """The chunk slot and head of a per-chunk program (grid (slots · NV V-tiles, H)):
    (slot·H + h, h, `_slot_tokens` of the slot)."""
    s = tl.program_id(0) // NV
    h = tl.program_id(1)
    start, end, offs_t, mask_t = _slot_tokens(slot_bounds, s, T, PER_ROW, C, VARLEN)
    return s.to(tl.int64) * H + h, h, start, end, offs_t, mask_t


@triton.jit
def _diagonal_block_inverses(a_inv, base, C: tl.constexpr):
    """Chunk `base`'s a_inv [C, C], holding N's 16×16 diagonal blocks N_b (strictly lower),
    gets their inverses (I + N_b)⁻¹ in place: forward substitution, row by row in fp32, every
    block at once (15 steps, each loading row i of every N_b)."""
    offs_b = tl.arange(0, C // 16)
    offs_i = tl.arange(0, 16)
    corner = base * C * C + offs_b * 16 * (C + 1)            # each block's (0, 0) in a_inv
    eye = tl.where(offs_i[:, None] == offs_i[None, :], 1.0, 0.0)
    inv = tl.broadcast_to(eye[None, :, :], (C // 16, 16, 16))
    for i in range(1, 16):
        # row i = e_i − Σ_{j<i} N_ij (row j), rows j < i already final (N_ij = 0 for j ≥ i)
        n_row = tl.load(a_inv + corner[:, None] + i * C + offs_i[None, :])     # [NB, 16]
        inv -= tl.where(offs_i[None, :, None] == i, tl.sum(n_row[:, :, None] * inv, 1)[:, None, :], 0.0)
    tl.debug_barrier()                  # every thread has read the blocks of N
    tl.store(a_inv + corner[:, None, None] + offs_i[None, :, None] * C + offs_i[None, None, :], inv)


@triton.jit
def _inverse_kernel(k, beta, g, slot_bounds, a_inv, T, PER_ROW, H: tl.constexpr, K: tl.constexpr,
                    C: tl.constexpr, BK: tl.constexpr, LEVELS: tl.constexpr, PRECISION: tl.constexpr,
                    DECAY: tl.constexpr, VARLEN: tl.constexpr, BRANCH: tl.constexpr):
    """R = (I + N)⁻¹ of one chunk slot and head (`a_inv`, [C, C]), the UT transform's first
    launch.

    N comes whole, [C, C] in registers (a per-key decay's from `_key_scores`, strict:
    factored in TF32 in the factored launch, as the outputs' scores). R: the inverses of
    N's 16×16 diagonal blocks D⁻¹ first (`_diagonal_block_inverses`, through `a_inv`), then
    with N_below the entries of N under the diagonal blocks and P = −D⁻¹ N_below
    (nilpotent: C/16 blocks), R = (I + P)(I + P²)…(I + P^{2^(LEVELS−1)}) D⁻¹
    = Σ_{j < C/16} Pʲ D⁻¹, LEVELS = log2(C/16).

    A launch of its own (w and u in `_wy_kernel`): the 15-step substitution is serial
    latency, which more programs an SM hide (at K = 128 on sm_90, 128 registers a thread
    against 234 with w and u; with a per-key decay 416 B of spills against 576). H100 at
    (8,4K), UT transform ms in two launches against one: 0.76 / 0.83 DeltaNet, 0.80 / 0.84
    Gated DeltaNet, 1.32 / 1.30 KDA (delta_variants_ut_split_8x4096_h100_2026-12-07-s18).
    N from `_scores` (non-strict, fp32 operands) instead measured 1.32 / 1.34 / 2.22 ms
    against 1.31 / 1.30 / 1.93 (DeltaNet / Gated DeltaNet / KDA at 1×32K, one launch,
    delta_wy_variants_1x32768_h100_2026-12-07-s11).
    """
    base, h, start, end, offs_t, mask_t = _slot_program(slot_bounds, T, PER_ROW, H, C, 1, VARLEN)
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    rows, cols = offs_c[:, None], offs_c[None, :]
    gam, _ = _chunk_gates(g, offs_t, mask_t, h, offs_k, H, K, C, DECAY)
    if BRANCH != 0:
        if _other_launch(tl.min(gam, axis=1), BRANCH):
            return
    b_k = load_tile(k, offs_t, mask_t, h, offs_k, K, H)
    b_beta = tl.load(beta + offs_t * H + h, mask=mask_t, other=0.0)
    if DECAY == 2:
        b_kf = b_k.to(tl.float32)
        n = _key_scores(b_kf, b_kf, gam, k, g, start, end, h, offs_c, offs_k, H, K, C, LEVELS, True, BRANCH)
    else:
        n = tl.dot(b_k, tl.trans(b_k)) * _pair_decays(gam, offs_c, True)
    n = n * b_beta[:, None]                 # N, strictly lower
    a_ptrs = a_inv + (base * C + rows) * C + cols
    diagonal_block = (rows // 16) == (cols // 16)
    tl.store(a_ptrs, n, mask=diagonal_block)
    tl.debug_barrier()                  # N's blocks, visible to every thread
    _diagonal_block_inverses(a_inv, base, C)
    n_below = tl.where((rows // 16) > (cols // 16), n, 0.0)
    tl.debug_barrier()                      # the blocks' stores, visible to every thread
    inv = tl.load(a_ptrs, mask=diagonal_block, other=0.0)
    power = -tl.dot(inv, n_below, input_precision=PRECISION)
    for _ in tl.static_range(LEVELS):
        inv += tl.dot(power, inv, input_precision=PRECISION)
        power = tl.dot(power, power, input_precision=PRECISION)
    tl.debug_barrier()                      # every thread has read the blocks
    tl.store(a_ptrs, inv)


@triton.jit
def _wy_kernel(k, v, beta, g, slot_bounds, a_inv, w, u, k_end, g_end, T, PER_ROW,
               H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, VARLEN: tl.constexpr):
    """The rest of the UT transform of one chunk slot and head, R read from `a_inv`
    (`_inverse_kernel`): w = R B (B = βK ⊙ e^Γ), u = R βV (V in tiles), the walk's
    k_end = K ⊙ e^{γ−Γ} and γ (`g_end` [1] or [K] per slot and head, with a decay). Padded
    rows come out zero in w, u and k_end (their k, v and β are zero). No per-key branch:
    every product here is with R or by a per-row factor."""
    base, h, start, end, offs_t, mask_t = _slot_program(slot_bounds, T, PER_ROW, H, C, 1, VARLEN)
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    rows, cols = offs_c[:, None], offs_c[None, :]
    k_mask = (offs_k < K)[None, :]
    b_kf = load_tile(k, offs_t, mask_t, h, offs_k, K, H).to(tl.float32)
    b_beta = tl.load(beta + offs_t * H + h, mask=mask_t, other=0.0)
    gam, g_last = _chunk_gates(g, offs_t, mask_t, h, offs_k, H, K, C, DECAY)
    tl.store(k_end + (base * C + rows) * K + offs_k[None, :], _decayed(b_kf, tl.exp(g_last - gam), DECAY),
             mask=k_mask)
    if DECAY == 1:
        tl.store(g_end + base, g_last)
    elif DECAY == 2:
        tl.store(g_end + base * K + offs_k, g_last, mask=offs_k < K)
    inv = tl.load(a_inv + (base * C + rows) * C + cols)
    b_b = _decayed(b_kf * b_beta[:, None], tl.exp(gam), DECAY)
    tl.store(w + (base * C + rows) * K + offs_k[None, :], tl.dot(inv, b_b), mask=k_mask)
    for vt in tl.static_range(triton.cdiv(V, BV)):
        offs_v = vt * BV + tl.arange(0, BV)
        b_v = load_tile(v, offs_t, mask_t, h, offs_v, V, H).to(tl.float32)
        b_u = tl.dot(inv, b_v * b_beta[:, None])
        tl.store(u + (base * C + rows) * V + offs_v[None, :], b_u, mask=(offs_v < V)[None, :])


@triton.jit
def _walk_dot(a, b, acc):
    """acc + a @ b for a walk: `b` (fp32, in registers) split into a's dtype as hi + lo when
    that is bf16, so that only a's rounding enters (two products instead of one)."""
    hi = b.to(a.dtype)
    acc = tl.dot(a, hi, acc)
    if a.dtype == tl.bfloat16:
        acc = tl.dot(a, (b - hi.to(tl.float32)).to(a.dtype), acc)
    return acc


@triton.jit
def _stored_dot(a, b):
    """a @ b of two tiles as loaded: in their dtype when they share it (bf16 products are
    exact, as TF32's of bf16 values, at twice the rate), else both widened (TF32)."""
    if a.dtype == b.dtype:
        out = tl.dot(a, b)
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32))
    return out


@triton.jit
def _walk_start(start_state, doc_chunk0, doc_chunks, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, HAS_START: tl.constexpr):
    """The program of a state walk (document n, head h, V-tile): (n·H + h, h, its K and V
    offsets, the [BK, BV] state it starts from: `start_state`'s tile or zeros unless
    HAS_START, the document's first chunk slot, its number of chunks)."""
    n = tl.program_id(0)
    h = tl.program_id(1)
    offs_k = tl.arange(0, BK)
    offs_v = tl.program_id(2) * BV + tl.arange(0, BV)
    doc = n.to(tl.int64) * H + h
    if HAS_START:
        ptrs, mask = _state_tile(start_state, doc, offs_k, offs_v, K, V)
        state = tl.load(ptrs, mask=mask, other=0.0)
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)
    return doc, h, offs_k, offs_v, state, tl.load(doc_chunk0 + n).to(tl.int64), tl.load(doc_chunks + n)


@triton.jit
def _state_pass_kernel(w, u, k_end, g_end, h0, doc_chunk0, doc_chunks, states, delta, final,
                       H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, HAS_INIT: tl.constexpr):
    """One document, head and V-tile: every chunk's incoming state (`states`, in the walk
    operands' dtype), its δ = U − W S (`delta`, fp32) and the document's final state
    (fp32)."""
    doc, h, offs_k, offs_v, state, first, count = _walk_start(h0, doc_chunk0, doc_chunks, H, K, V, BK, BV, HAS_INIT)
    offs_c = tl.arange(0, C)
    # γ is loaded a chunk ahead (off the chain of products); u in its own chunk, since loading
    # it ahead too made DeltaNet's walk slower (H100, session 16: 553 -> 636 µs at 1 x 32K)
    next_gam = _chunk_log_decay(g_end, first * H + h, offs_k, count > 0, K, DECAY)
    for i in range(count):
        base = (first + i) * H + h
        ptrs, mask = _state_tile(states, base, offs_k, offs_v, K, V)
        tl.store(ptrs, state, mask=mask)
        b_w = _chunk_rows(w, base, offs_c, offs_k, K, C)
        b_u = _chunk_rows(u, base, offs_c, offs_v, V, C).to(tl.float32)
        gam = next_gam
        next_gam = _chunk_log_decay(g_end, base + H, offs_k, i + 1 < count, K, DECAY)
        # S as stored (the walk operands' dtype, the S the outputs read): one product
        b_delta = b_u - tl.dot(b_w, state.to(b_w.dtype))
        tl.store(delta + (base * C + offs_c[:, None]) * V + offs_v[None, :], b_delta, mask=(offs_v < V)[None, :])
        b_k = _chunk_rows(k_end, base, offs_c, offs_k, K, C)
        state = _decay_state(state, gam, DECAY)
        state = _walk_dot(tl.trans(b_k), b_delta, state)
    ptrs, mask = _state_tile(final, doc, offs_k, offs_v, K, V)
    tl.store(ptrs, state, mask=mask)


@triton.jit
def _chunk_program(g, slot_bounds, T, PER_ROW, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, NV: tl.constexpr,
                   VARLEN: tl.constexpr):
    """The program of a per-chunk kernel over (chunk slot, V-tile) × head: (slot·H + h, h,
    its V offsets, the slot's token range, its rows' tokens and mask, the K offsets, Γ).
    The caller loads q once its per-key branch is decided (a program of the other launch
    loads only g)."""
    base, h, start, end, offs_t, mask_t = _slot_program(slot_bounds, T, PER_ROW, H, C, NV, VARLEN)
    offs_v = (tl.program_id(0) % NV) * BV + tl.arange(0, BV)
    offs_k = tl.arange(0, BK)
    gam, _ = _chunk_gates(g, offs_t, mask_t, h, offs_k, H, K, C, DECAY)
    return base, h, offs_v, start, end, offs_t, mask_t, offs_k, gam


@triton.jit
def _chunk_scores(b_q, k, g, gam, start, end, h, offs_t, mask_t, offs_k, H: tl.constexpr, K: tl.constexpr,
                  C: tl.constexpr, LEVELS: tl.constexpr, DECAY: tl.constexpr, BRANCH: tl.constexpr):
    """The chunk's decayed causal scores A (`_scores`), its keys loaded here (in q's dtype:
    without a per-key decay Q Kᵀ is one product of the stored tiles, exact as TF32's)."""
    b_k = load_tile(k, offs_t, mask_t, h, offs_k, K, H)
    return _scores(b_q, b_k, gam, k, g, start, end, h, tl.arange(0, C), offs_k, H, K, C, LEVELS, DECAY, BRANCH)


@triton.jit
def _output_kernel(q, k, g, slot_bounds, states, delta, o, scale, T, PER_ROW,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, LEVELS: tl.constexpr, DECAY: tl.constexpr,
                   VARLEN: tl.constexpr, BRANCH: tl.constexpr):
    """Outputs of one chunk slot, head and V-tile: scale [(Q ⊙ e^Γ) S + A δ], A the
    decayed causal scores (`_scores`)."""
    base, h, offs_v, start, end, offs_t, mask_t, offs_k, gam = _chunk_program(
        g, slot_bounds, T, PER_ROW, H, K, C, BK, BV, DECAY, triton.cdiv(V, BV), VARLEN)
    if BRANCH != 0:
        if _other_launch(tl.min(gam, axis=1), BRANCH):
            return
    b_q = load_tile(q, offs_t, mask_t, h, offs_k, K, H)
    scores = _chunk_scores(b_q, k, g, gam, start, end, h, offs_t, mask_t, offs_k, H, K, C, LEVELS, DECAY, BRANCH)
    offs_c = tl.arange(0, C)
    # A trailing slot of packed input (no tokens): the walk wrote no state, nothing is read.
    k_ok, v_ok = _slot_dims(start, end, offs_k, offs_v, K, V)
    b_s = tl.load(_state_tile(states, base, offs_k, offs_v, K, V)[0], mask=k_ok[:, None] & v_ok[None, :], other=0.0)
    b_delta = tl.load(delta + (base * C + offs_c[:, None]) * V + offs_v[None, :], mask=v_ok[None, :], other=0.0)
    if DECAY == 2:
        b_o = tl.dot(b_q * tl.exp(gam), b_s.to(tl.float32))
    else:
        # (Q ⊙ e^Γ) S = e^Γ ⊙ (Q S): the stored tiles' product (exact), decayed after
        b_o = _stored_dot(b_q, b_s)
        if DECAY == 1:
            b_o = b_o * tl.exp(gam)[:, None]
    b_o = tl.dot(scores, b_delta.to(tl.float32), b_o)
    store_tile(o, b_o * scale, offs_t, mask_t, h, offs_v, V, H)


@triton.jit
def _output_grad_kernel(q, k, g, do, slot_bounds, d_delta_out, q_decayed, scale, T, PER_ROW,
                        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, LEVELS: tl.constexpr, DECAY: tl.constexpr,
                        VARLEN: tl.constexpr, BRANCH: tl.constexpr):
    """The outputs' gradient of δ for one chunk slot, head and V-tile: scale Aᵀ do
    (`_scores`), every row of the slot (zero past its tokens); from the first V-tile also
    the backward walk's factor scale Q ⊙ e^Γ (`q_decayed`, in the walk operands' dtype)."""
    NV: tl.constexpr = triton.cdiv(V, BV)
    base, h, offs_v, start, end, offs_t, mask_t, offs_k, gam = _chunk_program(
        g, slot_bounds, T, PER_ROW, H, K, C, BK, BV, DECAY, NV, VARLEN)
    if BRANCH != 0:
        if _other_launch(tl.min(gam, axis=1), BRANCH):
            return
    b_q = load_tile(q, offs_t, mask_t, h, offs_k, K, H)
    offs_c = tl.arange(0, C)
    # stored before the scores are formed: fewer live tiles (KDA at K = 128 on sm_90: 656
    # bytes of spills a thread, 1000 storing it after them, 760 before the walk read it)
    if tl.program_id(0) % NV == 0:
        _slot_rows_store(q_decayed, _decayed(b_q.to(tl.float32) * scale, tl.exp(gam), DECAY), base, offs_c, offs_k,
                         K, C)
    scores = _chunk_scores(b_q, k, g, gam, start, end, h, offs_t, mask_t, offs_k, H, K, C, LEVELS, DECAY, BRANCH)
    b_do = load_tile(do, offs_t, mask_t, h, offs_v, V, H).to(tl.float32)
    b_dd = tl.dot(tl.trans(scores), b_do) * scale
    tl.store(d_delta_out + (base * C + offs_c[:, None]) * V + offs_v[None, :], b_dd, mask=(offs_v < V)[None, :])


@triton.jit
def _state_pass_grad_kernel(w, k_end, g_end, d_delta_out, q_decayed, do, d_final, doc_chunk0, doc_chunks,
                            slot_bounds, T, PER_ROW, d_delta, d_next, dh0,
                            H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                            BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, HAS_D_FINAL: tl.constexpr,
                            OUTPUT_GRAD: tl.constexpr, VARLEN: tl.constexpr):
    """One document, head and V-tile, backwards: each chunk's total dδ (`d_delta`), the
    gradient of the state leaving it (`d_next`) and the document's d initial state.

    OUTPUT_GRAD: the outputs' gradients enter, as `d_delta_out` (their dδ per chunk) and
    (scale Q ⊙ e^Γ)ᵀ do from `q_decayed` (per chunk, `_output_grad_kernel`'s) and do
    (token-major, the chunk's tokens from the slot table); else only the final states'.
    """
    doc, h, offs_k, offs_v, d_state, first, count = _walk_start(d_final, doc_chunk0, doc_chunks, H, K, V, BK, BV,
                                                                HAS_D_FINAL)
    offs_c = tl.arange(0, C)
    # the outputs' dδ and γ are loaded a chunk ahead (their loads off the chain of products)
    last = (first + count - 1) * H + h
    if OUTPUT_GRAD:
        next_dd = _chunk_rows(d_delta_out, last, offs_c, offs_v, V, C, count > 0)
    next_gam = _chunk_log_decay(g_end, last, offs_k, count > 0, K, DECAY)
    for j in range(count):
        slot = first + count - 1 - j
        base = slot * H + h
        ptrs, mask = _state_tile(d_next, base, offs_k, offs_v, K, V)
        tl.store(ptrs, d_state, mask=mask)
        b_k = _chunk_rows(k_end, base, offs_c, offs_k, K, C)
        delta_ptrs = (base * C + offs_c[:, None]) * V + offs_v[None, :]
        # the outputs' dδ added after the product, not as its accumulator: the product
        # does not wait for the load
        b_dd = _walk_dot(b_k, d_state, tl.zeros([C, BV], dtype=tl.float32))
        if OUTPUT_GRAD:
            b_dd += next_dd
            next_dd = _chunk_rows(d_delta_out, base - H, offs_c, offs_v, V, C, j + 1 < count)
        gam = next_gam
        next_gam = _chunk_log_decay(g_end, base - H, offs_k, j + 1 < count, K, DECAY)
        tl.store(d_delta + delta_ptrs, b_dd, mask=(offs_v < V)[None, :])
        b_w = _chunk_rows(w, base, offs_c, offs_k, K, C)
        d_state = _decay_state(d_state, gam, DECAY)
        if OUTPUT_GRAD:
            _, _, offs_t, mask_t = _slot_tokens(slot_bounds, slot, T, PER_ROW, C, VARLEN)
            b_qg = _chunk_rows(q_decayed, base, offs_c, offs_k, K, C)
            b_do = load_tile(do, offs_t, mask_t, h, offs_v, V, H)
            d_state = tl.dot(tl.trans(b_qg), b_do.to(b_qg.dtype), d_state)
        # dδ as stored (the walk operands' dtype): one product, not hi + lo
        d_state = tl.dot(tl.trans(b_w), (-b_dd).to(b_w.dtype), d_state)
    ptrs, mask = _state_tile(dh0, doc, offs_k, offs_v, K, V)
    tl.store(ptrs, d_state, mask=mask)


@triton.jit
def _slot_rows_store(ptr, value, base, offs_c, offs_d, D: tl.constexpr, C: tl.constexpr):
    """Store a [C, BD] tile into chunk slot `base` of a [n_slots, H, C, D] tensor (every row)."""
    tl.store(ptr + (base * C + offs_c[:, None]) * D + offs_d[None, :], value, mask=(offs_d < D)[None, :])


@triton.jit
def _key_grad_kernel(q, k, g, g_end, do, slot_bounds, states, delta, d_next, d_delta, dq, dk_part, d_w, dg,
                     dg_part, scale, T, PER_ROW, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                     C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, LEVELS: tl.constexpr,
                     DECAY: tl.constexpr, HAS_Q: tl.constexpr, VARLEN: tl.constexpr, BRANCH: tl.constexpr):
    """The chunk backward's terms that need all of V, for one chunk slot, head and K-tile
    (the tile's keys only; V in tiles).

    From the walks: S (incoming state), dS' (`d_next`, of the state leaving), δ and the
    total dδ. Over V: do Sᵀ, dP = do δᵀ (HAS_Q), dw = −dδ Sᵀ, dk_end = δ dS'ᵀ and Σ S ⊙ dS'.
    Then o = scale [(Q ⊙ e^Γ) S + A δ] gives dq (final) and dk's share; the walk's
    S' = e^γ S + k_endᵀ δ gives dk's share and dγ. Out: dq, dw (`d_w`, fp32 [n_slots, H,
    C, K]) and the partial dk (`dk_part`, likewise) for `_wy_grad_kernel`; the decay's
    share (reverse cumulative sum of dΓ plus dγ) into `dg` for a per-key decay (its own
    keys), else, with a decay, one [C] row per K-tile into `dg_part` ([n_slots, H, NK, C]).
    """
    NK: tl.constexpr = triton.cdiv(K, BK)
    base, h, start, end, offs_t, mask_t = _slot_program(slot_bounds, T, PER_ROW, H, C, NK, VARLEN)
    if BRANCH != 0:
        if _other_launch_gamma(g_end, base, K, BRANCH):
            return
    kt = tl.program_id(0) % NK
    offs_c = tl.arange(0, C)
    offs_k = kt * BK + tl.arange(0, BK)
    rows, cols = offs_c[:, None], offs_c[None, :]

    d_out_k = tl.zeros([C, BK], dtype=tl.float32)      # do Sᵀ
    d_w_neg = tl.zeros([C, BK], dtype=tl.float32)      # dδ Sᵀ = −dw
    d_k_end = tl.zeros([C, BK], dtype=tl.float32)      # δ dS'ᵀ
    d_scores = tl.zeros([C, C], dtype=tl.float32)      # do δᵀ
    state_dot = tl.zeros([BK], dtype=tl.float32)       # Σ_v S ⊙ dS', per key
    for vt in range(triton.cdiv(V, BV)):
        offs_v = vt * BV + tl.arange(0, BV)
        # A trailing slot of packed input (no tokens): the walks wrote nothing there.
        k_ok, v_ok = _slot_dims(start, end, offs_k, offs_v, K, V)
        s_mask = k_ok[:, None] & v_ok[None, :]
        b_s = tl.load(_state_tile(states, base, offs_k, offs_v, K, V)[0], mask=s_mask, other=0.0)
        b_dn = tl.load(_state_tile(d_next, base, offs_k, offs_v, K, V)[0], mask=s_mask, other=0.0).to(tl.float32)
        c_ptrs = (base * C + rows) * V + offs_v[None, :]
        b_delta = tl.load(delta + c_ptrs, mask=v_ok[None, :], other=0.0)
        b_dd = tl.load(d_delta + c_ptrs, mask=v_ok[None, :], other=0.0)
        # S, dS' and dδ as stored (the walk operands' dtype), δ fp32: do Sᵀ and dδ Sᵀ in
        # S's dtype, δ dS'ᵀ a TF32 product of fp32 δ and dS' widened
        if HAS_Q:
            b_do = load_tile(do, offs_t, mask_t, h, offs_v, V, H)
            d_out_k = tl.dot(b_do.to(b_s.dtype), tl.trans(b_s), d_out_k)
            d_scores = tl.dot(b_do.to(tl.float32), tl.trans(b_delta), d_scores)
        d_w_neg = tl.dot(b_dd.to(b_s.dtype), tl.trans(b_s), d_w_neg)
        d_k_end = tl.dot(b_delta, tl.trans(b_dn), d_k_end)
        state_dot += tl.sum(b_s.to(tl.float32) * b_dn, 1)
    _slot_rows_store(d_w, -d_w_neg, base, offs_c, offs_k, K, C)

    b_k = load_tile(k, offs_t, mask_t, h, offs_k, K, H).to(tl.float32)
    gam, g_last = _chunk_gates(g, offs_t, mask_t, h, offs_k, H, K, C, DECAY)
    # o = scale [(Q ⊙ e^Γ) S + A δ]
    if HAS_Q:
        b_q = load_tile(q, offs_t, mask_t, h, offs_k, K, H).to(tl.float32)
        d_out_k = _decayed(d_out_k * scale, tl.exp(gam), DECAY)
        if DECAY == 2:
            d_qk = tl.where(rows >= cols, d_scores, 0.0) * scale
            b_dq = d_out_k + _key_apply(d_qk, _diagonal_blocks(d_qk, offs_c, C), b_k, gam, k, g, start, end, h,
                                        offs_c, offs_k, H, K, BK, C, LEVELS, False, BRANCH)
            b_dk = _key_apply_t(d_qk, _diagonal_blocks(tl.trans(d_qk), offs_c, C), b_q, gam, q, g, start, end, h,
                                offs_c, offs_k, H, K, BK, C, LEVELS, False, BRANCH)
            d_gam = b_q * b_dq - b_k * b_dk
        else:
            d_qk = d_scores * _pair_decays(gam, offs_c, False) * scale
            b_dq = tl.dot(d_qk, b_k, d_out_k)
            b_dk = tl.dot(tl.trans(d_qk), b_q)
            d_gam = tl.sum(b_q * b_dq, 1) - tl.sum(b_k * b_dk, 1)
        store_tile(dq, b_dq, offs_t, mask_t, h, offs_k, K, H)
    else:
        b_dk = tl.zeros([C, BK], dtype=tl.float32)
        d_gam = tl.zeros_like(gam)
    # S' = e^γ S + (K ⊙ e^{γ−Γ})ᵀ δ
    d_k_end = _decayed(d_k_end, tl.exp(g_last - gam), DECAY)
    _slot_rows_store(dk_part, b_dk + d_k_end, base, offs_c, offs_k, K, C)
    k_end_dot = b_k * d_k_end
    if DECAY == 2:
        d_last = tl.sum(k_end_dot, 0) + tl.exp(g_last) * state_dot
        store_tile(dg, tl.cumsum(d_gam - k_end_dot, 0, reverse=True) + d_last[None, :], offs_t, mask_t, h, offs_k,
                   K, H)
    elif DECAY == 1:
        k_end_dot = tl.sum(k_end_dot, 1)
        d_last = tl.sum(k_end_dot, 0) + tl.exp(g_last) * tl.sum(state_dot, 0)
        tl.store(dg_part + (base * NK + kt) * C + offs_c, tl.cumsum(d_gam - k_end_dot, 0, reverse=True) + d_last)


@triton.jit
def _key_tile(k, g, gam_row, offs_t, mask_t, h, offs_k, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
              DECAY: tl.constexpr):
    """A chunk's keys in the K-tile `offs_k` (fp32), their log-decay Γ (the tile's own per key,
    else the chunk's `gam_row`) and B / β = K ⊙ e^Γ."""
    b_k = load_tile(k, offs_t, mask_t, h, offs_k, K, H).to(tl.float32)
    if DECAY == 2:
        gam, _ = _chunk_gates(g, offs_t, mask_t, h, offs_k, H, K, C, DECAY)
    else:
        gam = gam_row
    return b_k, gam, _decayed(b_k, tl.exp(gam), DECAY)


@triton.jit
def _wy_grad_kernel(k, v, beta, g, g_end, slot_bounds, a_inv, d_delta, dk_part, d_w, dg_part, dk, dv, dbeta, dg,
                    T, PER_ROW, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, LEVELS: tl.constexpr, DECAY: tl.constexpr,
                    VARLEN: tl.constexpr, DG_ROWS: tl.constexpr, BRANCH: tl.constexpr):
    """The rest of the chunk backward, one chunk slot and head, K and V in tiles: the UT
    transform's u = R (βV) and w = R B (B = β K ⊙ e^Γ) and R = (I + N)⁻¹.

    Over V: d(βV) = Rᵀ dδ (dv, dβ), dR ← dδ (βV)ᵀ. Over K (dw from `_key_grad_kernel`):
    dR ← dw Bᵀ; then dN = −Rᵀ dR Rᵀ under the diagonal; over K again: dB = Rᵀ dw and N's
    terms, added to the partial dk (`dk_part`) into dk, and their dβ and dΓ. dg: the
    reverse cumulative sum of these dΓ added to `_key_grad_kernel`'s share (`dg` itself
    per key, for g the DG_ROWS rows of `dg_part`: one per `_key_grad_kernel` K-tile, whose
    tiles need not be this kernel's). A per-key decay (DECAY 2) takes the
    products through the decayed scores by `_key_apply` / `_key_apply_t` (every exponent
    ≤ 0), dN's diagonal blocks gathered once for all K-tiles.
    """
    NK: tl.constexpr = triton.cdiv(K, BK)
    base, h, start, end, offs_t, mask_t = _slot_program(slot_bounds, T, PER_ROW, H, C, 1, VARLEN)
    if BRANCH != 0:
        if _other_launch_gamma(g_end, base, K, BRANCH):
            return
    offs_c = tl.arange(0, C)
    rows, cols = offs_c[:, None], offs_c[None, :]
    b_beta = tl.load(beta + offs_t * H + h, mask=mask_t, other=0.0)
    inv = tl.load(a_inv + (base * C + rows) * C + cols)

    d_inv = tl.zeros([C, C], dtype=tl.float32)         # dR
    d_beta = tl.zeros([C], dtype=tl.float32)
    for vt in range(triton.cdiv(V, BV)):
        offs_v = vt * BV + tl.arange(0, BV)
        v_ok = offs_v < tl.where(start < end, V, 0)     # an empty slot: the walk wrote no dδ
        b_dd = tl.load(d_delta + (base * C + rows) * V + offs_v[None, :], mask=v_ok[None, :], other=0.0)
        b_dd = b_dd.to(tl.float32)                      # R and βV stay fp32: dδ meets them widened
        b_v = load_tile(v, offs_t, mask_t, h, offs_v, V, H).to(tl.float32)
        b_dbv = tl.dot(tl.trans(inv), b_dd)             # d(βV)
        store_tile(dv, b_dbv * b_beta[:, None], offs_t, mask_t, h, offs_v, V, H)
        d_beta += tl.sum(b_dbv * b_v, 1)
        d_inv = tl.dot(b_dd, tl.trans(b_v * b_beta[:, None]), d_inv)

    # w = R B: dR ← dw Bᵀ (without a per-key decay also the Gram matrix K Kᵀ of N)
    if DECAY == 2:
        gam_row = tl.zeros([C], dtype=tl.float32)      # (per key: each tile loads its own)
    else:
        gam_row, _ = _chunk_gates(g, offs_t, mask_t, h, offs_c, H, K, C, DECAY)
        gram = tl.zeros([C, C], dtype=tl.float32)
        d_gam_row = tl.zeros([C], dtype=tl.float32)
    for kt in range(NK):
        offs_k = kt * BK + tl.arange(0, BK)
        b_k, gam, b_kg = _key_tile(k, g, gam_row, offs_t, mask_t, h, offs_k, H, K, C, DECAY)
        if DECAY != 2:
            gram = tl.dot(b_k, tl.trans(b_k), gram)
        b_dw = _chunk_rows(d_w, base, offs_c, offs_k, K, C).to(tl.float32)
        d_inv = tl.dot(b_dw, tl.trans(b_kg * b_beta[:, None]), d_inv)

    # R = (I + N)⁻¹, N = diag(β) (K Kᵀ ⊙ E) strictly lower
    d_n = -tl.dot(tl.dot(tl.trans(inv), d_inv), tl.trans(inv))
    d_n = tl.where(rows > cols, d_n, 0.0)
    if DECAY == 2:
        d_n_beta = d_n * b_beta[:, None]
        n_blocks = _diagonal_blocks(d_n, offs_c, C)
        n_blocks_t = _diagonal_blocks(tl.trans(d_n_beta), offs_c, C)
    else:
        decays = _pair_decays(gam_row, offs_c, True)           # zero on and above the diagonal
        gram = gram * decays
        d_beta += tl.sum(d_n * gram, 1)
        d_gram = d_n * b_beta[:, None] * decays
        d_pair = d_n * gram * b_beta[:, None]
        d_gam_row += tl.sum(d_pair, 1) - tl.sum(d_pair, 0)

    for kt in range(NK):
        offs_k = kt * BK + tl.arange(0, BK)
        b_k, gam, b_kg = _key_tile(k, g, gam_row, offs_t, mask_t, h, offs_k, H, K, C, DECAY)
        d_b = tl.dot(tl.trans(inv), _chunk_rows(d_w, base, offs_c, offs_k, K, C).to(tl.float32))
        b_dk = _chunk_rows(dk_part, base, offs_c, offs_k, K, C) + _decayed(d_b * b_beta[:, None], tl.exp(gam), DECAY)
        kg_dot = b_kg * d_b
        d_beta += tl.sum(kg_dot, 1)
        if DECAY == 2:
            d_left = _key_apply(d_n, n_blocks, b_k, gam, k, g, start, end, h, offs_c, offs_k, H, K, BK, C, LEVELS,
                                True, BRANCH)
            d_right = _key_apply_t(d_n_beta, n_blocks_t, b_k, gam, k, g, start, end, h, offs_c, offs_k, H, K, BK, C,
                                   LEVELS, True, BRANCH)
            d_beta += tl.sum(b_k * d_left, 1)
            b_dk += d_left * b_beta[:, None] + d_right
            d_gam = (kg_dot + b_k * d_left) * b_beta[:, None] - b_k * d_right
            b_dg = load_tile(dg, offs_t, mask_t, h, offs_k, K, H) + tl.cumsum(d_gam, 0, reverse=True)
            store_tile(dg, b_dg, offs_t, mask_t, h, offs_k, K, H)
        else:
            d_gam_row += tl.sum(kg_dot, 1) * b_beta
            b_dk = tl.dot(d_gram, b_k, b_dk)
            b_dk = tl.dot(tl.trans(d_gram), b_k, b_dk)
        store_tile(dk, b_dk, offs_t, mask_t, h, offs_k, K, H)
    tl.store(dbeta + offs_t * H + h, d_beta, mask=mask_t)
    if DECAY == 1:
        b_dg = tl.cumsum(d_gam_row, 0, reverse=True)
        for kt in range(DG_ROWS):
            b_dg += tl.load(dg_part + (base * DG_ROWS + kt) * C + offs_c)
        tl.store(dg + offs_t * H + h, b_dg, mask=mask_t)


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------


def _decay_kind(g_end) -> int:
    """The kernels' DECAY of a chunk's γ (None, [n, H, 1] or [n, H, K])."""
    if g_end is None:
        return DECAY_NONE
    return DECAY_SCALAR if g_end.shape[-1] == 1 else DECAY_PER_KEY


def _decay_of(decay) -> int:
    """The kernels' DECAY of the decay input: None, g [B,T,H] or gk [B,T,H,K]."""
    if decay is None:
        return DECAY_NONE
    return DECAY_SCALAR if decay.dim() == 3 else DECAY_PER_KEY


def _walk_grid(w, V: int, row: str, layout: ChunkLayout):
    """Grid and launch keywords of a state walk over `w` [n_slots, H, C, K]: one program
    per (document, head, V-tile); each pipeline stage holds a [C, K] tile of W and of k_end
    in w's dtype (`launch_kw` of `row`, or of its `_bf16` row for bf16 operands). V-tiles:
    the row's widest (`tile`), halved down to `NARROWEST_V_TILE` while the walk would leave
    SMs without a program (wide tiles: fewer re-reads of W and k_end; narrow ones: more
    programs)."""
    H, K = w.shape[1], w.shape[3]
    row = f"{row}_bf16" if w.dtype == torch.bfloat16 else row
    BV = tile(row, V, K)
    walks, sms = layout.n_docs * H, multiprocessors(w.device)
    while BV > NARROWEST_V_TILE and walks * triton.cdiv(V, BV) < sms:
        BV //= 2
    kw = launch_kw(row, K)
    return (layout.n_docs, H, triton.cdiv(V, BV)), dict(BK=triton.next_power_of_2(K), BV=BV, **kw)


def _walk(w, u, k_end, g_end, h0, layout: ChunkLayout):
    """The forward state pass: (every chunk's incoming state [n_slots,H,K,V] in the walk
    operands' dtype, δ [n_slots,H,C,V] and the final states [N,H,K,V] in fp32); slots no
    document uses are not written."""
    n_slots, H, C, K = w.shape
    V = u.shape[-1]
    states = launch.new_tensor((n_slots, H, K, V), w.dtype, w.device)
    delta = launch.new_tensor((n_slots, H, C, V), torch.float32, w.device)
    final = launch.new_tensor((layout.n_docs, H, K, V), torch.float32, w.device)
    grid, launch_args = _walk_grid(w, V, "delta.state", layout)
    _state_pass_kernel[grid](
        w, u, k_end, w if g_end is None else g_end, w if h0 is None else h0, layout.doc_chunk0, layout.doc_chunks,
        states, delta, final, H=H, K=K, V=V, C=C, DECAY=_decay_kind(g_end), HAS_INIT=h0 is not None,
        **launch_args)
    return states, delta, final


def _walk_back(w, k_end, g_end, d_final, V: int, layout: ChunkLayout, outputs_grad=None, do=None):
    """The backward state pass: (each chunk's total dδ and the gradient of the state leaving
    each chunk, both in the walk operands' dtype, and d initial states in fp32). The
    outputs' gradients: none, or `output_grad`'s (dδ, scale Q ⊙ e^Γ) per chunk with do
    (token-major)."""
    n_slots, H, C, K = w.shape
    dev = w.device
    d_delta = launch.new_tensor((n_slots, H, C, V), w.dtype, dev)
    d_next = launch.new_tensor((n_slots, H, K, V), w.dtype, dev)
    dh0 = launch.new_tensor((layout.n_docs, H, K, V), torch.float32, dev)
    d_delta_out, q_decayed = (w, w) if outputs_grad is None else outputs_grad
    bounds, T, per_row = layout.slot_args(w)
    row = "delta.state_grad_per_key" if _decay_kind(g_end) == DECAY_PER_KEY else "delta.state_grad"
    grid, launch_args = _walk_grid(w, V, row, layout)
    _state_pass_grad_kernel[grid](
        w, k_end, w if g_end is None else g_end, d_delta_out, q_decayed, w if do is None else do,
        w if d_final is None else d_final, layout.doc_chunk0, layout.doc_chunks, bounds, T, per_row,
        d_delta, d_next, dh0, H=H, K=K, V=V, C=C, DECAY=_decay_kind(g_end), HAS_D_FINAL=d_final is not None,
        OUTPUT_GRAD=outputs_grad is not None, VARLEN=layout.varlen, **launch_args)
    return d_delta, d_next, dh0


def _chunk_kw(layout: ChunkLayout, row: str, H: int, K: int, V: int, decay: int, tiled_k: bool = False) -> dict:
    """Keywords of a per-chunk launch: sizes, tiles (V-tiles of `row`; all of K, or K-tiles
    of `row` when `tiled_k`), the halving levels of 16-token blocks in a chunk, switches."""
    BK = tile(row, K, 0) if tiled_k else triton.next_power_of_2(K)     # tiled: no head dim whole
    return dict(H=H, K=K, V=V, C=layout.chunk, BK=BK, BV=tile(row, V, BK),
                LEVELS=(layout.chunk // BLOCK).bit_length() - 1, DECAY=decay, VARLEN=layout.varlen,
                **launch_kw(row, BK))


def _wy(k, v, beta, g, layout: ChunkLayout, operands: torch.dtype):
    """The UT transform of every chunk slot (`_inverse_kernel`, then `_wy_kernel`): R, w,
    u, k_end and γ (None without a decay; [n_slots, H, 1] for g, [n_slots, H, K] for gk);
    w and k_end, the walks' operands, in `operands`, the rest fp32 (R: every w, u and
    gradient goes through it; u: an addend of δ, never a product's operand)."""
    H, K = k.shape[2:]
    V, C, NS, dev = v.shape[-1], layout.chunk, layout.n_slots, k.device
    a_inv = launch.new_tensor((NS, H, C, C), torch.float32, dev)
    w = launch.new_tensor((NS, H, C, K), operands, dev)
    u = launch.new_tensor((NS, H, C, V), torch.float32, dev)
    k_end = launch.new_tensor((NS, H, C, K), operands, dev)
    decay = _decay_of(g)
    g_end = None if g is None else launch.new_tensor((NS, H, K if decay == DECAY_PER_KEY else 1), torch.float32, dev)
    bounds, T, per_row = layout.slot_args(k)
    _slot_launch(_inverse_kernel, layout, "delta.inverse", K, V, H, decay, None)(
        k, beta, k if g is None else g, bounds, a_inv, T, per_row, PRECISION=INVERSE_PRECISION)
    _slot_launch(_wy_kernel, layout, "delta.wy", K, V, H, decay, None)(
        k, v, beta, k if g is None else g, bounds, a_inv, w, u, k_end, w if g_end is None else g_end, T, per_row)
    return a_inv, w, u, k_end, g_end


def _slot_launch(kernel, layout: ChunkLayout, row: str, K: int, V: int, H: int, decay: int, split: str | None,
                 tiled_k: bool = False):
    """Launch `kernel` once per (chunk slot, head), or per (chunk slot, V-tile, head) when
    `split` is "v", per (chunk slot, K-tile, head) when "k", with the per-chunk keywords
    of `row` that it declares (K in tiles when `tiled_k` or split by K); a kernel with a
    `BRANCH` once per `_branches(decay)`. Returns the launcher."""
    kw = _chunk_kw(layout, row, H, K, V, decay, tiled_k=tiled_k or split == "k")
    n_tiles = {None: 1, "v": triton.cdiv(V, kw["BV"]), "k": triton.cdiv(K, kw["BK"])}[split]
    declared = set(kernel.arg_names) | set(launch_kw(row))        # its parameters, num_warps, num_stages
    kw = {name: value for name, value in kw.items() if name in declared}
    branches = [dict(BRANCH=branch) for branch in _branches(decay)] if "BRANCH" in kernel.arg_names else [{}]

    def run(*args, **switches):
        if layout.n_slots:
            for branch in branches:
                kernel[(layout.n_slots * n_tiles, H)](*args, **switches, **branch, **kw)
    return run


def _branches(decay: int) -> tuple[int, ...]:
    """The `BRANCH` of each launch of a per-chunk kernel: two for a per-key decay
    (`PER_KEY_BRANCHES`), else one that decides nothing."""
    return PER_KEY_BRANCHES if decay == DECAY_PER_KEY else (0,)


def forward_summary(k, v, beta, g, h0, layout: ChunkLayout, operands):
    """The UT transform and the forward walk: (final states fp32, what the output and the
    backward need: a_inv, w, k_end, γ, every chunk's incoming state and δ)."""
    a_inv, w, u, k_end, g_end = _wy(k, v, beta, g, layout, operands)
    states, delta, final = _walk(w, u, k_end, g_end, h0, layout)
    return final, (a_inv, w, k_end, g_end, states, delta)


def forward_output(q, k, g, saved, layout: ChunkLayout, scale, dtype):
    """The outputs [B,T,H,V] in `dtype` from `forward_summary`'s states and δ."""
    states, delta = saved[4:]
    H, K, V = k.shape[2], k.shape[3], delta.shape[-1]
    o = launch.new_tensor(k.shape[:3] + (V,), dtype, q.device)
    bounds, T, per_row = layout.slot_args(k)
    _slot_launch(_output_kernel, layout, "delta.output", K, V, H, _decay_of(g), "v")(
        q, k, k if g is None else g, bounds, states, delta, o, scale, T, per_row)
    return o


def output_grad(q, k, g, do, layout: ChunkLayout, scale, operands: torch.dtype):
    """The part of the backward that needs no gradient of the final states: every chunk's
    outputs' dδ, scale Aᵀ do (fp32), and the backward walk's factor scale Q ⊙ e^Γ (in the
    walk operands' dtype `operands`, per chunk slot: the walk's V-tiles read it instead of
    each decaying q again)."""
    H, K, V = k.shape[2], k.shape[3], do.shape[-1]
    d_delta_out = launch.new_tensor((layout.n_slots, H, layout.chunk, V), torch.float32, k.device)
    q_decayed = launch.new_tensor((layout.n_slots, H, layout.chunk, K), operands, k.device)
    bounds, T, per_row = layout.slot_args(k)
    _slot_launch(_output_grad_kernel, layout, "delta.output_grad", K, V, H, _decay_of(g), "v")(
        q, k, k if g is None else g, do, bounds, d_delta_out, q_decayed, scale, T, per_row)
    return d_delta_out, q_decayed


def state_grad(q, k, v, beta, g, saved, do, outputs_grad, d_final, layout: ChunkLayout, scale):
    """The rest of the backward, from `output_grad`'s result (or None without outputs) and
    d final states (or None): the backward walk and the chunk backward.
    Returns (dq or None, dk, dv, dβ, d decay or None, d initial states)."""
    a_inv, w, k_end, g_end, states, delta = saved
    H, K, V = k.shape[2], k.shape[3], v.shape[-1]
    bounds, T, per_row = layout.slot_args(k)
    has_q = outputs_grad is not None
    d_delta, d_next, dh0 = _walk_back(w, k_end, g_end, d_final, V, layout, outputs_grad, do if has_q else None)
    dq = launch.new_tensor(k.shape, k.dtype, k.device) if has_q else None
    dk = launch.new_tensor(k.shape, k.dtype, k.device)
    dv = launch.new_tensor(v.shape, v.dtype, v.device)
    dbeta = launch.new_tensor(beta.shape, torch.float32, k.device)
    dg = None if g is None else launch.new_tensor(g.shape, torch.float32, k.device)
    # The chunk backward in two launches (fp32 scratch between them): per K-tile, the
    # terms that need all of V; per chunk, the UT transform's, which need all of K.
    decay = _decay_of(g)
    key_row, wy_row = ("delta.key_grad_per_key", "delta.wy_grad_per_key") if decay == DECAY_PER_KEY \
        else ("delta.key_grad", "delta.wy_grad")
    NS, C = layout.n_slots, layout.chunk
    d_w = launch.new_tensor((NS, H, C, K), w.dtype, k.device)     # the walk operands' dtype
    dk_part = launch.new_tensor((NS, H, C, K), torch.float32, k.device)
    n_k = triton.cdiv(K, _chunk_kw(layout, key_row, H, K, V, decay, tiled_k=True)["BK"])
    dg_part = launch.new_tensor((NS, H, n_k, C), torch.float32, k.device) if decay == DECAY_SCALAR else None
    _slot_launch(_key_grad_kernel, layout, key_row, K, V, H, decay, "k")(
        q if has_q else k, k, k if g is None else g, k if g_end is None else g_end, do if has_q else k, bounds,
        states, delta, d_next,
        d_delta, k if dq is None else dq, dk_part, d_w, k if dg is None else dg, k if dg_part is None else dg_part,
        scale, T, per_row, HAS_Q=has_q)
    _slot_launch(_wy_grad_kernel, layout, wy_row, K, V, H, decay, None, tiled_k=True)(
        k, v, beta, k if g is None else g, k if g_end is None else g_end, bounds, a_inv, d_delta, dk_part, d_w,
        k if dg_part is None else dg_part,
        dk, dv, dbeta, k if dg is None else dg, T, per_row, DG_ROWS=n_k)
    return dq, dk, dv, dbeta, dg, dh0


def fused_forward(q, k, v, beta, g, h0, layout: ChunkLayout, scale, operands):
    """The forward launches: (o or None, final states fp32, what `fused_backward` needs)."""
    final, saved = forward_summary(k, v, beta, g, h0, layout, operands)
    o = None if q is None else forward_output(q, k, g, saved, layout, scale, q.dtype)
    return o, final, saved


def fused_backward(q, k, v, beta, g, saved, do, d_final, layout: ChunkLayout, scale):
    """The backward launches: (dq or None, dk, dv, dβ, d decay or None, d initial states)."""
    d_final = None if d_final is None else d_final.float().contiguous()
    outputs_grad = None
    if q is not None and do is not None:
        do = do.contiguous()
        walk_operands = saved[1].dtype                          # w's
        outputs_grad = output_grad(q, k, g, do, layout, scale, walk_operands)
    dq, dk, dv, dbeta, dg, dh0 = state_grad(q, k, v, beta, g, saved, do, outputs_grad, d_final, layout, scale)
    if q is not None and dq is None:
        dq = torch.zeros_like(q)
    return dq, dk, dv, dbeta, dg, dh0


class FusedDeltaRule(torch.autograd.Function):
    """The delta rule on the fused kernels (module docstring). Inputs q (or None: final
    states only), k, v (one dtype, contiguous), β fp32 [B,T,H], the decay (None, g
    [B,T,H] or gk [B,T,H,K]) fp32, h0 (or None) fp32, cu_seqlens (or None), the chunk
    size, the scale, the walk operands' dtype; returns (o or None, final states fp32),
    differentiable in all. The backward's walk operands take the forward's (w's) dtype.
    Forward and backward run as the custom ops `lasp::delta_forward` / `lasp::delta_backward`
    (`fused_forward`, `fused_backward`; `lasp.kernels.compiled`), which torch.compile records
    as one call each."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, h0, cu_seqlens, chunk, scale, operands):
        o, final, *saved = compiled.delta_forward(q, k, v, beta, g, h0, cu_seqlens, chunk, scale, operands)
        ctx.save_for_backward(q, k, v, beta, g, cu_seqlens, *saved)
        ctx.chunk, ctx.scale, ctx.has_q, ctx.has_h0 = chunk, scale, q is not None, h0 is not None
        ctx.set_materialize_grads(False)
        return o if ctx.has_q else None, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, d_final):
        q, k, v, beta, g, cu_seqlens, *saved = ctx.saved_tensors
        dq, dk, dv, dbeta, dg, dh0 = compiled.delta_backward(q, k, v, beta, g, cu_seqlens, *saved, do, d_final,
                                                             ctx.chunk, ctx.scale)
        return (dq if ctx.has_q else None, dk, dv, dbeta, None if g is None else dg, dh0 if ctx.has_h0 else None,
                None, None, None, None)


def _check_chunk(chunk_size: int) -> None:
    """The Triton path cuts chunks into 16×16 blocks of the UT transform."""
    check_chunk_size(chunk_size)
    if chunk_size < BLOCK:
        raise ValueError(f"chunk_size must be at least {BLOCK} on the Triton backend, got {chunk_size}")


def walk_operand_dtype(dtype: torch.dtype, walk_operands: str | None = None) -> torch.dtype:
    """The walk operands' dtype for inputs of `dtype`: fp32 for fp32 inputs, else
    `walk_operands` (None: `WALK_OPERANDS`), "bfloat16" or "float32"."""
    choice = WALK_OPERANDS if walk_operands is None else walk_operands
    if choice not in WALK_OPERAND_DTYPES:
        raise ValueError(f"walk_operands must be one of {sorted(WALK_OPERAND_DTYPES)}, got {choice!r}")
    return WALK_OPERAND_DTYPES[choice] if dtype.itemsize == 2 else torch.float32


def triton_linear_attention(q, k, v, decay, beta, *, scale, initial_state=None, output_final_state=False,
                            cu_seqlens=None, chunk_size=None, walk_operands=None):
    """The delta rule on the Triton backend (validated arguments): the fused kernels.

    Args:
        q, k: [B,T,H,K]; v: [B,T,H,V]; one dtype (bf16/fp16/fp32); CUDA tensors (or CPU
            under TRITON_INTERPRET=1); K and V in 16..256. q None: final states only.
        decay: None, g [B,T,H] or gk [B,T,H,K] (natural-log decays ≤ 0); beta [B,T,H].
        initial_state: None or [N,H,K,V] (N = B, or len(cu_seqlens) - 1).
        cu_seqlens: None or an int device tensor [N+1] of packed offsets (B == 1).
        chunk_size: a power of two ≥ 16; None: `common.launch.chunk_for_head_dims`.
        walk_operands: "bfloat16" or "float32", the stored products' operands' dtype for
            16-bit inputs; None: `WALK_OPERANDS`. fp32 inputs always take float32.

    Returns (o [B,T,H,V] in q.dtype or None, final_state [N,H,K,V] fp32 or None),
    differentiable in q, k, v, decay, beta and initial_state. No host sync.
    """
    if chunk_size is None:
        chunk_size = chunk_for_head_dims("delta", k.shape[-1], v.shape[-1])
    _check_chunk(chunk_size)
    operands = walk_operand_dtype(k.dtype, walk_operands)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    o, final = FusedDeltaRule.apply(
        None if q is None else q.contiguous(), k.contiguous(), v.contiguous(), beta.float().contiguous(),
        None if decay is None else decay.float().contiguous(), h0, cu_seqlens, chunk_size, float(scale), operands)
    return o, final if output_final_state else None


def run_transitions(k, decay, beta, *, cu_seqlens=None, chunk_size=None):
    """Each document's dense transition M [N, H, K, K] (fp32), as
    `lasp.kernels.delta.chunk.run_transitions`, on the Triton kernels: the final state of
    a walk from the identity with no writes (v = 0). No host sync."""
    if chunk_size is None:
        chunk_size = chunk_for_head_dims("delta", k.shape[-1], k.shape[-1])
    _check_chunk(chunk_size)
    B, T, H, K = k.shape
    n_docs = document_count(B, cu_seqlens)
    eye = torch.eye(K, dtype=torch.float32, device=k.device).expand(n_docs, H, K, K).contiguous()
    return FusedDeltaRule.apply(None, k.contiguous(), torch.zeros_like(k), beta.float().contiguous(),
                                None if decay is None else decay.float().contiguous(), eye, cu_seqlens, chunk_size,
                                1.0, walk_operand_dtype(k.dtype))[1]


@dataclass(frozen=True)
class TritonAffinePhases:
    """The affine phases (`lasp.kernels.delta.chunk`: one run over the values widened by K
    identity columns) on the fused launches: the forward split after the walk
    (`forward_summary` | `forward_output`, outputs fp32), the backward after the outputs'
    dδ (`output_grad` | `state_grad`)."""

    layout: ChunkLayout
    scale: float
    operands: torch.dtype

    def summarize(self, k, v, decay, beta):
        v_wide, h0 = widen(v, k.shape[-1], self.layout.n_docs, torch.float32)
        final, saved = forward_summary(k, v_wide, beta, decay, h0, self.layout, self.operands)
        return split(final, v.shape[-1]), saved

    def output(self, q, k, v, decay, beta, saved):
        return split(forward_output(q, k, decay, saved, self.layout, self.scale, torch.float32), v.shape[-1])

    def output_grad(self, q, k, v, decay, beta, saved, do, dx):
        do_wide = torch.cat([do.float(), dx.float()], -1)
        return do_wide, output_grad(q, k, decay, do_wide, self.layout, self.scale, self.operands)

    def grad(self, q, k, v, decay, beta, saved, partial, d_states, d_transitions):
        do_wide, outputs_grad = partial
        v_wide = widen(v, k.shape[-1], 0, torch.float32)[0]          # the widened values alone
        d_final = torch.cat([d_states, d_transitions], -1).float().contiguous()
        dq, dk, dv, dbeta, dg, _ = state_grad(q, k, v_wide, beta, decay, saved, do_wide, outputs_grad, d_final,
                                              self.layout, self.scale)
        return dq, dk, split(dv, v.shape[-1])[0], dg, dbeta


def affine_phases(q, k, v, decay, beta, *, scale, cu_seqlens=None):
    """The family's entry for `lasp.kernels.linear_attention.plan_affine_phases`:
    (`TritonAffinePhases`, the inputs `(q, k, v, decay, beta)` as the kernels take them:
    contiguous, the decay and β fp32). Chunks as for the unwidened values."""
    K, V = k.shape[-1], v.shape[-1]
    chunk = chunk_for_head_dims("delta", K, V)
    layout = chunk_layout(k.shape[0], k.shape[1], cu_seqlens, chunk, k.device)
    inputs = (q.contiguous(), k.contiguous(), v.contiguous(), None if decay is None else decay.float().contiguous(),
              beta.float().contiguous())
    return TritonAffinePhases(layout, float(scale), walk_operand_dtype(k.dtype)), inputs


def linear_attention(q, k, v, decay, beta, *, scale, initial_state=None, output_final_state=False,
                     cu_seqlens=None, causal=True):
    """The family's entry for `lasp.kernels.linear_attention` (validated arguments, causal):
    `triton_linear_attention`."""
    if not causal:
        raise ValueError("the delta rule (beta) needs causal=True")
    return triton_linear_attention(q, k, v, decay, beta, scale=float(scale), initial_state=initial_state,
                                   output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def phases(q, k, v, decay, beta, *, scale, initial_state=None, cu_seqlens=None, causal=True):
    """The family's entry for `lasp.kernels.linear_attention_phases` (causal): `TorchPhases`
    over `linear_attention` (autograd through the Triton kernels), inputs
    `(q, k, v, (decay, beta), initial_state)`."""
    if not causal:
        raise ValueError("the delta rule (beta) needs causal=True")
    return TorchPhases(linear_attention, float(scale), causal, cu_seqlens), (q, k, v, (decay, beta), initial_state)
