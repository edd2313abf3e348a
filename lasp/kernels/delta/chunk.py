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

The affine run. A run's outputs and final states are affine in its initial state S::

    o = o(0) + X S          final = U + M S          (U = final(0))

with X [B,T,H,K] (row t: scale · P_tᵀ q_t, P_t the product of the document's transitions
through t). The delta rule updates each value column of the state on its own, so ONE run
over the values with K zero columns appended, from the initial state [0 | I], gives all
four: its outputs are [o(0) | X] and its final states [U | M] (`widen`, `split`). LASP-2
runs it before the incoming state is known, exchanges (M, U), and adds X S_in
(`lasp.kernels.state.dense_state_output`). `affine_phases` splits it at the exchange::

    (U, M), saved = phases.summarize(k, v, decay, beta)
    o0, x = phases.output(q, k, v, decay, beta, saved)             # accumulation dtype
    partial = phases.output_grad(q, k, v, decay, beta, saved, do, dx)   # needs no dU, dM
    dq, dk, dv, d_decay, d_beta = phases.grad(q, k, v, decay, beta, saved, partial, dU, dM)

(d_decay None without a decay). It costs one run of V + K value columns, where a
summary, a transition and a run from the incoming state cost three runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lasp.kernels.common.documents import (TorchPhases, accumulation_dtype, document_count, documents,
                                           run_documents)
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


# --------------------------------------------------------------------------------------
# The run as an affine map of its initial state (LASP-2's dense transitions)
# --------------------------------------------------------------------------------------


def widen(v, K: int, n_docs: int, state_dtype):
    """The affine run's inputs (module docstring): the values with K zero columns
    appended, [B,T,H,V+K], and every document's initial state [0 | I], [n_docs, H, K, V+K]
    in `state_dtype`."""
    B, T, H, V = v.shape
    v_wide = torch.cat([v, v.new_zeros(B, T, H, K)], -1)
    h0 = torch.zeros(n_docs, H, K, V + K, dtype=state_dtype, device=v.device)
    h0[..., V:] = torch.eye(K, dtype=state_dtype, device=v.device)
    return v_wide, h0


def split(wide, V: int):
    """A widened run's outputs or final states, [..., V+K]: (the part from a zero initial
    state [..., V], the part the initial state maps through [..., K])."""
    return wide[..., :V], wide[..., V:]


@dataclass(frozen=True)
class TorchAffinePhases:
    """The affine phases (module docstring) on the torch chunk form, the oracle of the
    Triton ones: `summarize` and `output` run the widened form, `grad` reruns it under
    autograd and differentiates the outputs and final states at once."""

    scale: float
    cu_seqlens: torch.Tensor | None

    def _run(self, q, k, v, decay, beta):
        acc = accumulation_dtype(k.dtype)
        v_wide, h0 = widen(v, k.shape[-1], document_count(k.shape[0], self.cu_seqlens), acc)
        return chunk_linear_attention(None if q is None else q.to(acc), k, v_wide, decay, beta, scale=self.scale,
                                      initial_state=h0, output_final_state=True, cu_seqlens=self.cu_seqlens)

    def summarize(self, k, v, decay, beta):
        return split(self._run(None, k, v, decay, beta)[1], v.shape[-1]), ()

    def output(self, q, k, v, decay, beta, saved):
        return split(self._run(q, k, v, decay, beta)[0], v.shape[-1])

    def output_grad(self, q, k, v, decay, beta, saved, do, dx):
        return torch.cat([do.to(dx.dtype), dx], -1)

    def grad(self, q, k, v, decay, beta, saved, partial, d_states, d_transitions):
        with torch.enable_grad():
            leaves = [None if x is None else x.detach().requires_grad_() for x in (q, k, v, decay, beta)]
            o, final = self._run(*leaves)
            live = [x for x in leaves if x is not None]
            grads = iter(torch.autograd.grad([o, final], live, [partial, torch.cat([d_states, d_transitions], -1)]))
        return tuple(None if x is None else next(grads) for x in leaves)


def affine_phases(q, k, v, decay, beta, *, scale, cu_seqlens=None):
    """The family's entry for `lasp.kernels.linear_attention.plan_affine_phases`:
    (`TorchAffinePhases`, the inputs `(q, k, v, decay, beta)`)."""
    return TorchAffinePhases(scale, cu_seqlens), (q, k, v, decay, beta)
