"""Chunkwise torch form of GLA's per-key decay (`gk`): the oracle of the Triton kernels.

Per head (DESIGN.md §1), with a log-decay per key dimension (natural log, ≤ 0)::

    S_t = diag(exp(gk_t)) S_{t-1} + k_t v_tᵀ          o_t = scale · q_tᵀ S_t

Per chunk of C tokens, with Γ_t the chunk-local inclusive cumulative log-decay ([K] per
token) and γ = Γ at the chunk's last token::

    o_t   = scale [(q_t ⊙ e^{Γ_t})ᵀ S_in + Σ_{s ≤ t} A_ts v_s],   A_ts = Σ_k q_tk k_sk e^{Γ_tk − Γ_sk}
    S_out = diag(e^γ) S_in + Σ_s (k_s ⊙ e^{γ − Γ_s}) v_sᵀ

With a decay per key, A is no single Q Kᵀ product. It is built in sub-chunks of 16
tokens (the GLA paper's secondary chunking): a block of queries in sub-chunk i against
keys of an earlier sub-chunk j is one product of `q ⊙ e^{Γ_t − Γ_r}` and
`k ⊙ e^{Γ_r − Γ_s}`, with the reference r at sub-chunk i's first token, so that both
exponents are ≤ 0; the 16×16 blocks on the diagonal are elementwise over K, masked before
the exp. No exponent is ever positive, so strong decays cannot overflow.

Runs on any device and dtype (float64 included) with states in
`accumulation_dtype(q.dtype)`; every document runs independently. Arguments are already
validated (causal only). The torch backend of `lasp.kernels.linear_attention` for `gk`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lasp.kernels.common.documents import TorchPhases, run_documents
from lasp.kernels.common.launch import CHUNK_SIZE

# Tokens per sub-chunk: the diagonal blocks of A computed elementwise.
SUB_CHUNK = 16


def _intra(q, k, v, gam, sub_chunk):
    """Σ_{s ≤ t in the chunk} A_ts v_s for chunks [n, C, H, *] (unscaled)."""
    n, C, H, K = q.shape
    sub = min(sub_chunk, C)
    nb = C // sub
    qb, kb, gb = (x.view(n, nb, sub, H, K) for x in (q, k, gam))
    # Diagonal blocks, elementwise: Γ_t − Γ_s for s ≤ t, masked before the exp.
    tril = torch.ones(sub, sub, dtype=torch.bool, device=q.device).tril()
    diff = gb[:, :, :, None] - gb[:, :, None, :]                        # [n, nb, t, s, H, K]
    decay = diff.masked_fill(~tril[:, :, None, None], float("-inf")).exp()
    diag = torch.einsum("nbtshk,nbthk,nbshk->nbhts", decay, qb, kb)      # [n, nb, H, t, s]
    # Earlier sub-chunks: reference r = Γ at the first token of the query's sub-chunk i.
    ref = gb[:, :, 0]                                                     # [n, nb, H, K]
    q_ref = qb * (gb - ref[:, :, None]).exp()                             # e^{Γ_t − Γ_r}, t ≥ r
    earlier = (torch.arange(C, device=q.device) // sub)[None, :] < torch.arange(nb, device=q.device)[:, None]
    to_ref = (ref[:, :, None] - gam[:, None]).masked_fill(~earlier[None, :, :, None, None], float("-inf"))
    k_ref = k[:, None] * to_ref.exp()                                     # [n, nb, C, H, K]: e^{Γ_r − Γ_s}, s < r
    scores = torch.einsum("nbthk,nbshk->nhbts", q_ref, k_ref)             # [n, H, nb, sub, C]
    eye = torch.eye(nb, dtype=q.dtype, device=q.device)
    scores = scores + torch.einsum("nbhts,bc->nhbtcs", diag, eye).reshape(n, H, nb, sub, C)
    return torch.einsum("nhbts,nshv->nbthv", scores, v).reshape(n, C, H, v.shape[-1])


def chunk_step(q, k, v, gk, scale, state, chunk_size=CHUNK_SIZE):
    """One document in chunks: (o [L, H, V] or None when q is None, final state).

    Tokens are padded to whole chunks with k = v = 0 and gk = 0 (no decay), which leaves
    the state after the last real token unchanged.
    """
    L, H, K = k.shape
    V = v.shape[-1]
    if L == 0:
        return (None if q is None else q.new_zeros(0, H, V)), state
    C = chunk_size
    n = -(-L // C)
    pad = (0, 0, 0, 0, 0, n * C - L)
    kc, vc, gc = (F.pad(x, pad).view(n, C, H, -1) for x in (k, v, gk))
    gam = gc.cumsum(1)                                                    # Γ_t: [n, C, H, K]
    last = gam[:, -1]                                                     # γ: [n, H, K]
    local = torch.einsum("nchk,nchv->nhkv", kc * (last[:, None] - gam).exp(), vc)
    incoming = []
    for c in range(n):
        incoming.append(state)
        state = last[c].exp()[..., None] * state + local[c]
    if q is None:
        return None, state
    qc = F.pad(q, pad).view(n, C, H, K)
    o = torch.einsum("nchk,nhkv->nchv", qc * gam.exp(), torch.stack(incoming))
    o = o + _intra(qc, kc, vc, gam, SUB_CHUNK)
    return scale * o.reshape(n * C, H, V)[:L], state


def chunk_linear_attention(q, k, v, gk, *, scale, initial_state=None, output_final_state=False,
                           cu_seqlens=None, causal=True, chunk_size=CHUNK_SIZE):
    """Chunkwise form of the per-key decay `gk` [B,T,H,K] (validated; causal only).

    q None computes the final states only. Returns (o [B,T,H,V] in q's dtype or None,
    final_state [N,H,K,V] or None).
    """
    if not causal:
        raise ValueError("a per-key decay gk needs causal=True")
    if chunk_size % SUB_CHUNK and chunk_size > SUB_CHUNK:
        raise ValueError(f"chunk_size must be a multiple of {SUB_CHUNK} (or smaller), got {chunk_size}")

    def step(q, k, v, gk, scale, state):
        return chunk_step(q, k, v, gk, scale, state, chunk_size)
    return run_documents(step, q, k, v, gk, scale, initial_state, output_final_state, cu_seqlens)


def linear_attention(q, k, v, gk, *, scale, initial_state=None, output_final_state=False, cu_seqlens=None,
                     causal=True):
    """The family's entry for `lasp.kernels.linear_attention` (validated arguments; `gk` the
    per-key log-decay [B,T,H,K]): `chunk_linear_attention`."""
    return chunk_linear_attention(q, k, v, gk, scale=scale, initial_state=initial_state,
                                  output_final_state=output_final_state, cu_seqlens=cu_seqlens, causal=causal)


def phases(q, k, v, gk, *, scale, initial_state=None, cu_seqlens=None, causal=True):
    """The family's entry for `lasp.kernels.linear_attention_phases`: (`TorchPhases` over
    `chunk_linear_attention`, the inputs unchanged)."""
    if not causal:
        raise ValueError("a per-key decay gk needs causal=True")
    return TorchPhases(chunk_linear_attention, scale, causal, cu_seqlens), (q, k, v, gk, initial_state)
