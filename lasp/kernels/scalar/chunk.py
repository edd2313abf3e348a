"""Chunkwise torch form of plain linear attention and of a scalar decay per head and token.

Per head (DESIGN.md §1)::

    S_t = exp(g_t) · S_{t-1} + k_t v_tᵀ        o_t = scale · q_tᵀ S_t

Per chunk of C tokens: `((Q Kᵀ) ⊙ decay-mask) V` plus `Q · S_in`, then the state is
carried. Runs on any device and dtype (float64 included: the oracle of the Triton
kernels) and is the `torch` backend of `lasp.kernels.linear_attention` for this family
(`linear_attention`, and `phases`: the generic `TorchPhases` of
`lasp.kernels.common.documents` over this chunk form). Arguments are already validated;
`g` is per token (a fixed per-head decay arrives expanded). Every document runs independently; states and accumulation use
`accumulation_dtype(q.dtype)`.
"""

from __future__ import annotations

import torch

from lasp.kernels.common.documents import TorchPhases, accumulation_dtype, run_documents
from lasp.kernels.common.launch import CHUNK_SIZE

# Bidirectional attention sums each packed document in pieces of this many tokens.
NONCAUSAL_PIECE_TOKENS = 256


def carry(state, k, v, g):
    """The state after a run of tokens: the decayed incoming state plus their decayed kᵀv
    (`g`: their log-decays [t, H], None for plain)."""
    if g is None:
        return state + torch.einsum("thk,thv->hkv", k, v)
    return (state * g.sum(0).exp()[:, None, None]
            + torch.einsum("thk,thv->hkv", k * _decay_to_end(g).exp()[..., None], v))


def chunk_step(q, k, v, g, scale, state, chunk_size=CHUNK_SIZE):
    """One document in chunks: (o [t, H, V] or None when q is None, final state)."""
    outs = []
    for s in range(0, k.shape[0], chunk_size):
        kc, vc = k[s:s + chunk_size], v[s:s + chunk_size]
        gc = None if g is None else g[s:s + chunk_size]
        if q is not None:
            outs.append(scale * _chunk_output(q[s:s + chunk_size], kc, vc, gc, state))
        state = carry(state, kc, vc, gc)
    if q is None:
        return None, state
    o = torch.cat(outs) if outs else q.new_zeros(0, *v.shape[1:])
    return o, state


# Every log-decay between two tokens is summed directly from the g's between them, never
# as a difference of cumulative sums (Γ_t − Γ_s): the backward of such a difference gives
# dg_u as Σ_{t ≥ u} (row terms − column terms), which cancels the near-diagonal terms
# (size ~1) to leave a result of size ~exp(g). With g = −30 that lost every digit of dg in
# float64. Summed directly, autograd adds only the pairs (s < u ≤ t) that g_u decays.


def _decay_to_end(g):
    """Σ_{u > t} g_u over the run, [t, H]: the log-decay from token t to the run's end."""
    return torch.cat([g[1:].flip(0).cumsum(0).flip(0), g.new_zeros(1, g.shape[1])])


def _pair_log_decays(g):
    """Σ_{s < u ≤ t} g_u, [H, t, s]: the log-decay from token s to token t, −inf for s > t."""
    C = g.shape[0]
    later = torch.ones(C, C, dtype=torch.bool, device=g.device).tril(-1)       # [u, s]: u > s
    sums = g.T[:, :, None].expand(-1, C, C).masked_fill(~later, 0).cumsum(1)  # [h, t, s]
    causal = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
    return sums.masked_fill(~causal, float("-inf"))


def _chunk_output(qc, kc, vc, gc, state):
    """Unscaled outputs of one chunk: intra-chunk masked product plus the incoming state."""
    C = qc.shape[0]
    scores = torch.einsum("thk,shk->hts", qc, kc)
    if gc is None:
        causal = torch.ones(C, C, dtype=torch.bool, device=qc.device).tril()
        scores = scores.masked_fill(~causal, 0)
        return torch.einsum("hts,shv->thv", scores, vc) + torch.einsum("thk,hkv->thv", qc, state)
    o = torch.einsum("hts,shv->thv", scores * _pair_log_decays(gc).exp(), vc)
    return o + torch.einsum("thk,hkv->thv", qc * gc.cumsum(0).exp()[..., None], state)


def chunk_linear_attention(q, k, v, g=None, *, scale, initial_state=None,
                           output_final_state=False, cu_seqlens=None, causal=True,
                           chunk_size=CHUNK_SIZE):
    """Chunkwise form: per chunk, `((Q Kᵀ) ⊙ decay) V` plus `Q · S_in`, then carry S.
    causal=False (plain only): `noncausal_linear_attention`.

    q None computes the final states only. Returns (o [B,T,H,V] in q's dtype or None,
    final_state [N,H,K,V] or None).
    """
    if not causal:
        return noncausal_linear_attention(q, k, v, scale=scale, initial_state=initial_state,
                                          output_final_state=output_final_state, cu_seqlens=cu_seqlens)

    def step(q, k, v, g, scale, state):
        return chunk_step(q, k, v, g, scale, state, chunk_size)
    return run_documents(step, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def noncausal_linear_attention(q, k, v, *, scale, initial_state=None, output_final_state=False,
                               cu_seqlens=None, piece_tokens=NONCAUSAL_PIECE_TOKENS):
    """Bidirectional plain linear attention: every token reads its document's whole state
    S = initial state + Σ k vᵀ over the document (also its final state): o_t = scale q_tᵀ S.

    No host sync and no loop over documents: packed documents are cut into pieces of at
    most `piece_tokens` tokens (at most cdiv(T, piece_tokens) + N pieces, a bound from the
    shapes), found on the device from `cu_seqlens` with searchsorted; each piece's kᵀv
    is one batched matmul, pieces are summed into their documents with index_add, and each
    token gathers its output from its piece. Memory: the pieces' states, about
    (T / piece_tokens + N) states, never one state per token.
    """
    acc = accumulation_dtype(k.dtype)
    if cu_seqlens is None:
        state = torch.einsum("bthk,bthv->bhkv", k.to(acc), v.to(acc))
        if initial_state is not None:
            state = state + initial_state.to(acc)
        o = None if q is None else (scale * torch.einsum("bthk,bhkv->bthv", q.to(acc), state)).to(q.dtype)
        return o, state if output_final_state else None
    _, T, H, K = k.shape
    V, dev = v.shape[-1], k.device
    cu = cu_seqlens.to(torch.int64)
    N = cu.numel() - 1
    pieces_of_doc = (cu[1:] - cu[:-1] + piece_tokens - 1) // piece_tokens
    first_piece = torch.nn.functional.pad(pieces_of_doc.cumsum(0), (1, 0))       # [N+1]
    piece = torch.arange(-(-T // piece_tokens) + N, device=dev)
    doc = torch.searchsorted(first_piece[1:], piece, right=True).clamp_(max=N - 1)
    start = cu[doc] + (piece - first_piece[doc]) * piece_tokens
    pos = start[:, None] + torch.arange(piece_tokens, device=dev)                 # [pieces, P]
    inside = (pos < torch.minimum(start + piece_tokens, cu[doc + 1])[:, None]) & (piece < first_piece[-1])[:, None]
    pos = torch.where(inside, pos, 0)
    k_pieces = k[0].to(acc)[pos] * inside[..., None, None]
    states = torch.einsum("pthk,pthv->phkv", k_pieces, v[0].to(acc)[pos])
    state = states.new_zeros(N, H, K, V).index_add(0, doc, states)
    if initial_state is not None:
        state = state + initial_state.to(acc)
    if q is None:
        return None, state if output_final_state else None
    o_pieces = scale * torch.einsum("pthk,phkv->pthv", q[0].to(acc)[pos], state[doc])
    token = torch.arange(T, device=dev)
    token_doc = torch.searchsorted(cu[1:], token, right=True)
    offset = token - cu[token_doc]
    o = o_pieces[first_piece[token_doc] + offset // piece_tokens, offset % piece_tokens]
    return o[None].to(q.dtype), state if output_final_state else None


def linear_attention(q, k, v, g, *, scale, initial_state=None, output_final_state=False, cu_seqlens=None,
                     causal=True):
    """The family's entry for `lasp.kernels.linear_attention` (validated arguments; `g` the
    per-token log-decay [B,T,H] or None): `chunk_linear_attention`."""
    return chunk_linear_attention(q, k, v, g, scale=scale, initial_state=initial_state,
                                  output_final_state=output_final_state, cu_seqlens=cu_seqlens, causal=causal)


def phases(q, k, v, g, *, scale, initial_state=None, cu_seqlens=None, causal=True):
    """The family's entry for `lasp.kernels.linear_attention_phases`: (`TorchPhases` over
    `chunk_linear_attention`, the inputs unchanged)."""
    return TorchPhases(chunk_linear_attention, scale, causal, cu_seqlens), (q, k, v, g, initial_state)
