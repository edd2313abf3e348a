"""The delta rule on the GPU: the chunk-parallel WY pieces in torch, the sequential state
pass in Triton, forward and backward.

The chunkwise form (`lasp.kernels.delta.wy`) has one sequential part: the state pass
from chunk to chunk inside each document,

    δ_c = U_c − W_c S_c,        S_{c+1} = e^{γ_c} ⊙ S_c + k_endᵀ_c δ_c

which `_state_pass_kernel` walks per (document, head, V-tile), keeping S in fp32
registers, as fla's `chunk_gated_delta_rule_fwd_h` does; `_state_pass_grad_kernel` walks
back, carrying dS (the gradient of the state leaving the chunk):

    dδ_c = dδ_c(outputs) + k_end_c dS_{c+1},    dS_c = e^{γ_c} ⊙ dS_{c+1} + dS_c(outputs) − W_cᵀ dδ_c

Everything else is batched over all chunks of all documents at once and differentiated
by autograd: the UT transform (one batched unit-triangular solve per chunk, fp32), the
outputs `scale [(Q ⊙ e^Γ) S_c + A δ_c]` and the gradients of W, U, k_end and γ from the
two walks' states (dW = −dδ Sᵀ, dk_end = δ dS_{c+1}ᵀ, dγ = e^γ Σ S ⊙ dS_{c+1}).

Packed documents are laid out as whole chunks on the device (`ChunkLayout`: no host
sync; the number of chunk slots is a bound from shapes). Everything is fp32 whatever the
inputs' dtype, the walks' `tl.dot`s included (TF32 on the GPU; rounding the state to
bf16 for the dots, as fla does, took the bf16 outputs' error from 1.6e-3 to 2.5e-3 under
the bf16-emulating interpreter). Launch parameters: the `delta.*` rows of
`lasp.kernels.common.launch.LAUNCH`.

Speed (H100, H=16, D=128, bf16, fwd+bwd): at 1×32K DeltaNet 25 ms, Gated DeltaNet 31 ms
and KDA 186 ms (benchmarks/results/kernels_delta_1x32768_h100_2026-12-06.json); at 8×4K
DeltaNet 23 ms against fla's `chunk_delta_rule` 3.5 ms
(benchmarks/results/kernels_delta_8x4096_h100_2026-12-06.json). The batched torch pieces
dominate (strided copies, the triangular solves, fp32 GEMMs; the two walks take ~5 ms):
fused Triton kernels for the WY pieces and the outputs are what remains to be written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from lasp.kernels.common import launch
from lasp.kernels.common.documents import TorchPhases
from lasp.kernels.common.launch import CHUNK_SIZE, launch_kw, tile
from lasp.kernels.common.plan import document_chunk_slots
from lasp.kernels.common.scan import DECAY_NONE, DECAY_PER_KEY, DECAY_SCALAR
from lasp.kernels.delta.chunk import check_chunk_size
from lasp.kernels.delta.wy import chunk_log_decay, chunk_outputs, chunk_pieces


# --------------------------------------------------------------------------------------
# Chunk layout
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkLayout:
    """Every document cut into whole chunks of `chunk` tokens, as `n_slots` chunk slots
    ([n_slots, H, C, ...] tensors; padded tokens are zero).

    `doc_chunk0` / `doc_chunks` (int32 [N], device): each document's first slot and
    number of chunks. Packed input (`token_slot` int64 [T]: each token's row in the
    flattened slots) may leave trailing slots unused: `slot_valid` (bool [n_slots]) marks
    the used ones; unpacked rows use every slot (`token_slot`, `slot_valid` None).
    """

    B: int
    T: int
    chunk: int
    n_slots: int
    doc_chunk0: torch.Tensor
    doc_chunks: torch.Tensor
    token_slot: torch.Tensor | None
    slot_valid: torch.Tensor | None

    @property
    def n_docs(self) -> int:
        return self.doc_chunks.numel()

    def to_chunks(self, x, dtype=torch.float32):
        """[B, T, H, ...] -> [n_slots, H, C, ...] in `dtype`, contiguous (every batched
        product then reads it in place), zero-padded; differentiable."""
        C = self.chunk
        if self.token_slot is None:
            pad = [0, 0] * (x.dim() - 2) + [0, self.n_slots // self.B * C - self.T]
            x = F.pad(x, pad).reshape(self.n_slots, C, *x.shape[2:])
        else:
            flat = x.new_zeros(self.n_slots * C, *x.shape[2:]).index_copy(0, self.token_slot, x[0])
            x = flat.view(self.n_slots, C, *x.shape[2:])
        return x.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format)

    def from_chunks(self, y):
        """[n_slots, H, C, ...] -> [B, T, H, ...] (differentiable)."""
        y = y.transpose(1, 2)
        if self.token_slot is None:
            return y.reshape(self.B, -1, *y.shape[2:])[:, :self.T]
        return y.reshape(-1, *y.shape[2:]).index_select(0, self.token_slot)[None]

    def used(self, x):
        """x [n_slots, ...] with unused slots (which no walk writes) set to zero."""
        if self.slot_valid is None:
            return x
        return torch.where(self.slot_valid.view(-1, *([1] * (x.dim() - 1))), x, 0.0)


def chunk_layout(B: int, T: int, cu_seqlens, chunk: int, device) -> ChunkLayout:
    """The `ChunkLayout` of B rows of T tokens, packed by `cu_seqlens` (None, or an int
    device tensor [N+1] with B == 1): device ops only."""
    if cu_seqlens is None:
        per_row = triton.cdiv(T, chunk)
        doc_chunks = torch.full((B,), per_row, dtype=torch.int32, device=device)
        doc_chunk0 = torch.arange(B, dtype=torch.int32, device=device) * per_row
        return ChunkLayout(B, T, chunk, B * per_row, doc_chunk0, doc_chunks, None, None)
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    chunk0, n_slots = document_chunk_slots(cu, T, chunk)
    chunks = chunk0[1:] - chunk0[:-1]
    t = torch.arange(T, device=device)
    doc = torch.searchsorted(cu[1:], t, right=True)
    local = t - cu[doc]
    token_slot = (chunk0[doc] + local // chunk) * chunk + local % chunk
    slot_valid = torch.arange(n_slots, device=device) < chunk0[-1]
    return ChunkLayout(B, T, chunk, n_slots, chunk0[:-1].to(torch.int32), chunks.to(torch.int32), token_slot,
                       slot_valid)


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _chunk_rows(ptr, base, offs_c, offs_d, D: tl.constexpr, C: tl.constexpr):
    """[C, BD] tile of chunk slot `base` (= slot·H + h) of a [n_slots, H, C, D] tensor."""
    return tl.load(ptr + (base * C + offs_c[:, None]) * D + offs_d[None, :], mask=(offs_d < D)[None, :], other=0.0)


@triton.jit
def _state_tile(ptr, base, offs_k, offs_v, K: tl.constexpr, V: tl.constexpr):
    """Pointers and mask of a [BK, BV] tile of state `base` (= index·H + h) of [*, H, K, V]."""
    return ptr + (base * K + offs_k[:, None]) * V + offs_v[None, :], (offs_k < K)[:, None] & (offs_v < V)[None, :]


@triton.jit
def _decay_state(state, g_end, base, offs_k, K: tl.constexpr, DECAY: tl.constexpr):
    """e^γ ⊙ state for chunk `base` (γ: [n, H, 1] scalar or [n, H, K] per key)."""
    if DECAY == 1:
        state = state * tl.exp(tl.load(g_end + base))
    elif DECAY == 2:
        state = state * tl.exp(tl.load(g_end + base * K + offs_k, mask=offs_k < K, other=0.0))[:, None]
    return state


@triton.jit
def _state_pass_kernel(w, u, k_end, g_end, h0, doc_chunk0, doc_chunks, states, delta, final,
                       H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, HAS_INIT: tl.constexpr):
    """One document, head and V-tile: every chunk's incoming state (`states`), its
    δ = U − W S (`delta`, fp32) and the document's final state."""
    n = tl.program_id(0)
    h = tl.program_id(1)
    offs_k = tl.arange(0, BK)
    offs_v = tl.program_id(2) * BV + tl.arange(0, BV)
    offs_c = tl.arange(0, C)
    doc = n.to(tl.int64) * H + h
    ptrs, mask = _state_tile(h0, doc, offs_k, offs_v, K, V)
    if HAS_INIT:
        state = tl.load(ptrs, mask=mask, other=0.0)
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)
    first = tl.load(doc_chunk0 + n).to(tl.int64)
    for i in range(tl.load(doc_chunks + n)):
        base = (first + i) * H + h
        ptrs, mask = _state_tile(states, base, offs_k, offs_v, K, V)
        tl.store(ptrs, state, mask=mask)
        b_w = _chunk_rows(w, base, offs_c, offs_k, K, C)
        b_u = _chunk_rows(u, base, offs_c, offs_v, V, C).to(tl.float32)
        b_delta = b_u - tl.dot(b_w, state.to(b_w.dtype))
        tl.store(delta + (base * C + offs_c[:, None]) * V + offs_v[None, :], b_delta, mask=(offs_v < V)[None, :])
        b_k = _chunk_rows(k_end, base, offs_c, offs_k, K, C)
        state = _decay_state(state, g_end, base, offs_k, K, DECAY)
        state = tl.dot(tl.trans(b_k), b_delta.to(b_k.dtype), state)
    ptrs, mask = _state_tile(final, doc, offs_k, offs_v, K, V)
    tl.store(ptrs, state, mask=mask)


@triton.jit
def _state_pass_grad_kernel(w, k_end, g_end, d_states, d_delta_out, d_final, doc_chunk0, doc_chunks,
                            d_delta, d_next, dh0,
                            H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                            BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, HAS_D_FINAL: tl.constexpr):
    """One document, head and V-tile, backwards: each chunk's total dδ (`d_delta`), the
    gradient of the state leaving it (`d_next`) and the document's d initial state.
    `d_states` / `d_delta_out`: the gradients the outputs give each chunk's incoming
    state and δ."""
    n = tl.program_id(0)
    h = tl.program_id(1)
    offs_k = tl.arange(0, BK)
    offs_v = tl.program_id(2) * BV + tl.arange(0, BV)
    offs_c = tl.arange(0, C)
    doc = n.to(tl.int64) * H + h
    ptrs, mask = _state_tile(d_final, doc, offs_k, offs_v, K, V)
    if HAS_D_FINAL:
        d_state = tl.load(ptrs, mask=mask, other=0.0)
    else:
        d_state = tl.zeros([BK, BV], dtype=tl.float32)
    first = tl.load(doc_chunk0 + n).to(tl.int64)
    count = tl.load(doc_chunks + n)
    for j in range(count):
        base = (first + count - 1 - j) * H + h
        ptrs, mask = _state_tile(d_next, base, offs_k, offs_v, K, V)
        tl.store(ptrs, d_state, mask=mask)
        b_k = _chunk_rows(k_end, base, offs_c, offs_k, K, C)
        delta_ptrs = (base * C + offs_c[:, None]) * V + offs_v[None, :]
        b_dd = tl.load(d_delta_out + delta_ptrs, mask=(offs_v < V)[None, :], other=0.0)
        b_dd = tl.dot(b_k, d_state.to(b_k.dtype), b_dd)
        tl.store(d_delta + delta_ptrs, b_dd, mask=(offs_v < V)[None, :])
        b_w = _chunk_rows(w, base, offs_c, offs_k, K, C)
        ptrs, mask = _state_tile(d_states, base, offs_k, offs_v, K, V)
        d_state = _decay_state(d_state, g_end, base, offs_k, K, DECAY) + tl.load(ptrs, mask=mask, other=0.0)
        d_state -= tl.dot(tl.trans(b_w), b_dd.to(b_w.dtype))
    ptrs, mask = _state_tile(dh0, doc, offs_k, offs_v, K, V)
    tl.store(ptrs, d_state, mask=mask)


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------


def _decay_kind(g_end) -> int:
    if g_end is None:
        return DECAY_NONE
    return DECAY_SCALAR if g_end.shape[-1] == 1 else DECAY_PER_KEY


def _grid(layout: ChunkLayout, H: int, K: int, V: int, row: str):
    """Grid and launch keywords of a state walk: one program per (document, head, V-tile);
    each pipeline stage holds a [C, K] fp32 tile of W and of k_end (`launch_kw`)."""
    BV = tile(row, V, K)
    kw = launch_kw(row, K)
    return (layout.n_docs, H, triton.cdiv(V, BV)), dict(BK=triton.next_power_of_2(K), BV=BV, **kw)


class _StatePass(torch.autograd.Function):
    """(every chunk's incoming state [n_slots,H,K,V], δ [n_slots,H,C,V], the final states
    [N,H,K,V]) from the WY pieces (fp32) and the initial states; differentiable in all."""

    @staticmethod
    def forward(ctx, w, u, k_end, g_end, h0, layout):
        n_slots, H, C, K = w.shape
        V = u.shape[-1]
        dev = w.device
        w, k_end = w.contiguous(), k_end.contiguous()
        g_end = None if g_end is None else g_end.contiguous()
        states = launch.new_tensor((n_slots, H, K, V), torch.float32, dev)
        delta = launch.new_tensor((n_slots, H, C, V), torch.float32, dev)
        final = launch.new_tensor((layout.n_docs, H, K, V), torch.float32, dev)
        grid, launch_args = _grid(layout, H, K, V, "delta.state")
        _state_pass_kernel[grid](
            w, u.contiguous(), k_end, w if g_end is None else g_end, w if h0 is None else h0.contiguous(),
            layout.doc_chunk0, layout.doc_chunks, states, delta, final, H=H, K=K, V=V, C=C,
            DECAY=_decay_kind(g_end), HAS_INIT=h0 is not None, **launch_args)
        states, delta = layout.used(states), layout.used(delta)
        ctx.save_for_backward(w, k_end, g_end, states, delta)
        ctx.layout = layout
        ctx.has_h0 = h0 is not None
        ctx.set_materialize_grads(False)
        return states, delta, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_states, d_delta_out, d_final):
        w, k_end, g_end, states, delta = ctx.saved_tensors
        layout = ctx.layout
        n_slots, H, C, K = w.shape
        V = delta.shape[-1]
        dev = w.device
        d_states = torch.zeros_like(states) if d_states is None else d_states.float().contiguous()
        d_delta_out = torch.zeros_like(delta) if d_delta_out is None else d_delta_out.float().contiguous()
        d_delta = launch.new_tensor((n_slots, H, C, V), torch.float32, dev)
        d_next = launch.new_tensor((n_slots, H, K, V), torch.float32, dev)
        dh0 = launch.new_tensor((layout.n_docs, H, K, V), torch.float32, dev)
        grid, launch_args = _grid(layout, H, K, V, "delta.state_grad")
        _state_pass_grad_kernel[grid](
            w, k_end, w if g_end is None else g_end, d_states, d_delta_out,
            d_states if d_final is None else d_final.float().contiguous(), layout.doc_chunk0, layout.doc_chunks,
            d_delta, d_next, dh0, H=H, K=K, V=V, C=C, DECAY=_decay_kind(g_end), HAS_D_FINAL=d_final is not None,
            **launch_args)
        d_delta, d_next = layout.used(d_delta), layout.used(d_next)
        dw = -(d_delta @ states.transpose(-1, -2))
        dk_end = delta @ d_next.transpose(-1, -2)
        dg_end = None
        if g_end is not None:
            per_key = (states * d_next).sum(-1)
            dg_end = g_end.exp() * (per_key.sum(-1, keepdim=True) if g_end.shape[-1] == 1 else per_key)
        return dw, d_delta, dk_end, dg_end, dh0 if ctx.has_h0 else None, None


def _pieces(k, v, decay, beta, layout: ChunkLayout):
    """The chunk tensors of k, v (fp32) and Γ, and the WY pieces of every chunk slot."""
    kc, vc = (layout.to_chunks(x) for x in (k, v))
    gam = chunk_log_decay(None if decay is None else layout.to_chunks(decay))
    return kc, gam, chunk_pieces(kc, vc, layout.to_chunks(beta), gam)


def triton_linear_attention(q, k, v, decay, beta, *, scale, initial_state=None, output_final_state=False,
                            cu_seqlens=None, chunk_size=CHUNK_SIZE):
    """The delta rule with the Triton state pass (validated arguments).

    Args:
        q, k: [B,T,H,K]; v: [B,T,H,V]; one dtype (bf16/fp16/fp32); CUDA tensors (or CPU
            under TRITON_INTERPRET=1); K and V in 16..256. q None: final states only.
        decay: None, g [B,T,H] or gk [B,T,H,K] (natural-log decays ≤ 0); beta [B,T,H].
        initial_state: None or [N,H,K,V] (N = B, or len(cu_seqlens) - 1).
        cu_seqlens: None or an int device tensor [N+1] of packed offsets (B == 1).

    Returns (o [B,T,H,V] in q.dtype or None, final_state [N,H,K,V] fp32 or None),
    differentiable in q, k, v, decay, beta and initial_state. No host sync.
    """
    check_chunk_size(chunk_size)
    B, T = k.shape[:2]
    layout = chunk_layout(B, T, cu_seqlens, chunk_size, k.device)
    kc, gam, pieces = _pieces(k, v, decay, beta, layout)
    h0 = None if initial_state is None else initial_state.float()
    states, delta, final = _StatePass.apply(pieces.w, pieces.u, pieces.k_end, pieces.g_end, h0, layout)
    final = final if output_final_state else None
    if q is None:
        return None, final
    o = chunk_outputs(layout.to_chunks(q), kc, gam, delta, states, scale)
    return layout.from_chunks(o).to(q.dtype), final


def run_transitions(k, decay, beta, *, cu_seqlens=None, chunk_size=CHUNK_SIZE):
    """Each document's dense transition M [N, H, K, K] (fp32), as
    `lasp.kernels.delta.chunk.run_transitions`, on the Triton state pass: the final state
    of a walk from the identity with no writes (U = 0). No host sync."""
    check_chunk_size(chunk_size)
    B, T, H, K = k.shape
    layout = chunk_layout(B, T, cu_seqlens, chunk_size, k.device)
    kc, gam, pieces = _pieces(k, k[..., :0], decay, beta, layout)
    eye = torch.eye(K, dtype=torch.float32, device=k.device).expand(layout.n_docs, H, K, K).contiguous()
    return _StatePass.apply(pieces.w, torch.zeros_like(kc), pieces.k_end, pieces.g_end, eye, layout)[2]


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
    over `linear_attention` (autograd through the Triton state pass), inputs
    `(q, k, v, (decay, beta), initial_state)`."""
    if not causal:
        raise ValueError("the delta rule (beta) needs causal=True")
    return TorchPhases(linear_attention, float(scale), causal, cu_seqlens), (q, k, v, (decay, beta), initial_state)
