"""Chunkwise torch form of the delta rule (DeltaNet, Gated DeltaNet, KDA): the oracle of
the Triton path.

Per head (DESIGN.md §1; fla's semantics), with `beta` [B,T,H] and the decay A_t of the
family (`decay` None: DeltaNet; g [B,T,H]: Gated DeltaNet; gk [B,T,H,K]: KDA)::

    S_t = A_t(S_{t-1}) + β_t k_t (v_t − k_tᵀ A_t(S_{t-1}))ᵀ        o_t = scale · q_tᵀ S_t

Per chunk the UT transform (`lasp.kernels.delta.wy`) gives δ = U − W S_in; the state is
carried chunk to chunk, `S_out = e^γ ⊙ S_in + (K ⊙ e^{γ−Γ})ᵀ δ`, and the outputs are
`scale [(Q ⊙ e^Γ) S_in + A δ]`. Runs on any device and dtype (float64 included) with states
in `accumulation_dtype(q.dtype)`; every document runs alone (the loop reads `cu_seqlens`
on the host: this is the reference, not the hot path). Gradients by autograd.

`run_transitions` gives each document's dense transition M [N, H, K, K] (the product of
its chunks' `diag(e^γ) − (K ⊙ e^{γ−Γ})ᵀ W`): final(S_in) = M S_in + final(0), so that a
run's summary is (M, final(0)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lasp.kernels.common.documents import TorchPhases, accumulation_dtype, documents, run_documents
from lasp.kernels.common.launch import CHUNK_SIZE
from lasp.kernels.delta.wy import carry, chunk_log_decay, chunk_outputs, chunk_pieces, chunk_transitions


def check_chunk_size(chunk_size: int) -> None:
    """Chunks of a power of two tokens (the per-key scores halve the chunk)."""
    if not (isinstance(chunk_size, int) and chunk_size >= 1 and chunk_size & (chunk_size - 1) == 0):
        raise ValueError(f"chunk_size must be a power of two, got {chunk_size}")


def to_chunks(x, n, chunk_size):
    """One document's [L, H, ...] as [n, H, C, ...], zero-padded to whole chunks (padded
    tokens have k = v = β = 0 and no decay: they leave the state unchanged)."""
    pad = [0, 0] * (x.dim() - 1) + [0, n * chunk_size - x.shape[0]]
    return F.pad(x, pad).view(n, chunk_size, *x.shape[1:]).transpose(1, 2)


def document_step(q, k, v, beta, decay, scale, state, chunk_size=CHUNK_SIZE):
    """One document in chunks ([L, H, D] tensors in the accumulation dtype): (o [L, H, V],
    or None when q is None, and the final state)."""
    L, H, _ = k.shape
    V = v.shape[-1]
    if L == 0:
        return (None if q is None else q.new_zeros(0, H, V)), state
    n = -(-L // chunk_size)
    kc, vc, bc = (to_chunks(x, n, chunk_size) for x in (k, v, beta))
    gam = chunk_log_decay(None if decay is None else to_chunks(decay, n, chunk_size))
    pieces = chunk_pieces(kc, vc, bc, gam)
    incoming, deltas = [], []
    for c in range(n):
        incoming.append(state)
        delta, state = carry(state, pieces, c)
        deltas.append(delta)
    if q is None:
        return None, state
    o = chunk_outputs(to_chunks(q, n, chunk_size), kc, gam, torch.stack(deltas), torch.stack(incoming), scale)
    return o.transpose(1, 2).reshape(n * chunk_size, H, V)[:L], state


def chunk_linear_attention(q, k, v, decay, beta, *, scale, initial_state=None, output_final_state=False,
                           cu_seqlens=None, causal=True, chunk_size=CHUNK_SIZE):
    """The delta rule in chunks (validated arguments): `decay` None, g [B,T,H] or gk
    [B,T,H,K] (log-decays ≤ 0), `beta` [B,T,H]. q None computes the final states only.
    Returns (o [B,T,H,V] in q's dtype or None, final_state [N,H,K,V] or None)."""
    if not causal:
        raise ValueError("the delta rule (beta) needs causal=True")
    check_chunk_size(chunk_size)

    def step(q, k, v, gates, scale, state):
        return document_step(q, k, v, *gates, scale, state, chunk_size)
    return run_documents(step, q, k, v, (beta, decay), scale, initial_state, output_final_state, cu_seqlens)


def run_transitions(k, decay, beta, *, cu_seqlens=None, chunk_size=CHUNK_SIZE):
    """Each document's (row's) dense transition M [N, H, K, K] in the accumulation dtype:
    final(S_in) = M S_in + final(0). The product of its chunks' transitions (identity for
    an empty document); differentiable in k, decay and beta."""
    check_chunk_size(chunk_size)
    B, T, H, K = k.shape
    acc = accumulation_dtype(k.dtype)
    out = []
    for b, start, end in documents(B, T, cu_seqlens):
        m = torch.eye(K, dtype=acc, device=k.device).expand(H, K, K)
        L = end - start
        if L:
            n = -(-L // chunk_size)
            kc, bc = (to_chunks(x[b, start:end].to(acc), n, chunk_size) for x in (k, beta))
            gam = chunk_log_decay(None if decay is None else to_chunks(decay[b, start:end].to(acc), n, chunk_size))
            # W does not depend on v: solve with an empty value block.
            pieces = chunk_pieces(kc, kc.new_zeros(*kc.shape[:3], 0), bc, gam)
            for mc in chunk_transitions(pieces):
                m = mc @ m
        out.append(m)
    return torch.stack(out)


def linear_attention(q, k, v, decay, beta, *, scale, initial_state=None, output_final_state=False,
                     cu_seqlens=None, causal=True):
    """The family's entry for `lasp.kernels.linear_attention` (validated arguments):
    `chunk_linear_attention`."""
    return chunk_linear_attention(q, k, v, decay, beta, scale=scale, initial_state=initial_state,
                                  output_final_state=output_final_state, cu_seqlens=cu_seqlens, causal=causal)


def phases(q, k, v, decay, beta, *, scale, initial_state=None, cu_seqlens=None, causal=True):
    """The family's entry for `lasp.kernels.linear_attention_phases`: (`TorchPhases` over
    `linear_attention`, the inputs `(q, k, v, (decay, beta), initial_state)`)."""
    if not causal:
        raise ValueError("the delta rule (beta) needs causal=True")
    return TorchPhases(linear_attention, scale, causal, cu_seqlens), (q, k, v, (decay, beta), initial_state)
