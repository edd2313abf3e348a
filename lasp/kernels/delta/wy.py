"""The chunk-local pieces of the delta rule's chunkwise (WY / UT-transform) form.

Per head, with the token's decay A_t (none, exp(g_t), or diag(exp(gk_t))) and fla's
semantics (DESIGN.md §1)::

    S_t = A_t(S_{t-1}) + k_t δ_tᵀ,    δ_t = β_t (v_t − k_tᵀ A_t(S_{t-1}))

Within a chunk of C tokens entered with state S, let Γ_t be the chunk-local inclusive
cumulative log-decay ([K] per token; one number for g) and γ = Γ at the chunk's last
token. Unrolling the recurrence, δ solves a unit lower-triangular system (the UT
transform of the DeltaNet paper)::

    (I + diag(β) L) δ = diag(β) (V − (K ⊙ e^Γ) S),   L_ts = Σ_k k_tk k_sk e^{Γ_tk − Γ_sk}  (s < t)

so that δ = U − W S with the pseudo-values U = T V and W = T (K ⊙ e^Γ),
T = (I + diag(β) L)⁻¹ diag(β). Then, with A_ts = Σ_k q_tk k_sk e^{Γ_tk − Γ_sk} (s ≤ t)::

    o     = scale [(Q ⊙ e^Γ) S + A δ]
    S_out = diag(e^γ) S + (K ⊙ e^{γ − Γ})ᵀ δ

and the chunk's transition is `M = diag(e^γ) − (K ⊙ e^{γ−Γ})ᵀ W`: S_out = M S + S_out(0).

Only the state pass (S from chunk to chunk) is sequential; everything here is
batched over chunks. Every exponent is a difference Γ_t − Γ_s with t ≥ s, masked to
−inf elsewhere before the exp, so no factor ever exceeds 1 and strong decays stay finite.
With a per-key decay the scores are built by halving the chunk (`_per_key_scores`): each
pair of tokens goes through a reference token between them, so that both factors are ≤ 1
and every level is one batched product (no [C, C, K] tensor).

Tensors are head-major per chunk: [n, H, C, D] (n chunks), decays [n, H, C, 1] (scalar)
or [n, H, C, K] (per key), β [n, H, C]; any float dtype (float64 for the oracle).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def decayed_scores(a, b, gam, *, strict: bool):
    """[n, H, C, C]: M_ts = Σ_k a_tk b_sk e^{Γ_tk − Γ_sk} for s ≤ t (s < t when `strict`),
    else 0. `gam` (Γ) is None (no decay), [n, H, C, 1] or [n, H, C, K]."""
    C = a.shape[2]
    keep = torch.ones(C, C, dtype=torch.bool, device=a.device).tril(-1 if strict else 0)
    if gam is None:
        return (a @ b.transpose(-1, -2)).masked_fill(~keep, 0)
    if gam.shape[-1] == 1:
        diff = (gam - gam.transpose(-1, -2)).masked_fill(~keep, float("-inf"))
        return (a @ b.transpose(-1, -2)) * diff.exp()
    scores = _per_key_scores(a, b, gam)
    return scores if strict else scores + torch.diag_embed((a * b).sum(-1))


def _per_key_scores(a, b, gam):
    """The strictly lower part of `decayed_scores` for a per-key Γ, by halving.

    Every pair s < t is split at exactly one level of a binary halving of the chunk: s in
    the left half and t in the right half of one block. With r the right half's first token
    (s < r ≤ t), e^{Γ_t − Γ_s} = e^{Γ_t − Γ_r} e^{Γ_r − Γ_s}, both factors ≤ 1: each level is
    one batched product of `a ⊙ e^{Γ − Γ_r}` (right halves) and `b ⊙ e^{Γ_r − Γ}` (left
    halves). log2(C) levels of O(C·K) elementwise work, no [C, C, K] tensor, and no
    exponent ever positive: exact for any decay. C must be a power of two.
    """
    n, H, C, K = a.shape
    values, where = [], []
    half = 1
    while half < C:
        blocks = C // (2 * half)
        ab, bb, gb = (x.reshape(n, H, blocks, 2, half, K) for x in (a, b, gam))
        ref = gb[:, :, :, 1, :1]
        a_ref = ab[:, :, :, 1] * (gb[:, :, :, 1] - ref).exp()
        b_ref = bb[:, :, :, 0] * (ref - gb[:, :, :, 0]).exp()
        values.append((a_ref @ b_ref.transpose(-1, -2)).reshape(n, H, -1))
        first = torch.arange(blocks, device=a.device)[:, None, None] * 2 * half
        offs = torch.arange(half, device=a.device)
        where.append(((first + half + offs[:, None]) * C + first + offs[None, :]).reshape(-1))
        half *= 2
    flat = a.new_zeros(n, H, C * C).index_copy(-1, torch.cat(where), torch.cat(values, -1))
    return flat.view(n, H, C, C)


@dataclass(frozen=True)
class ChunkPieces:
    """What the state pass and the outputs need of each chunk (module docstring).

    w [n,H,C,K], u [n,H,C,V]: δ = u − w S. k_end [n,H,C,K] = K ⊙ e^{γ−Γ} and
    g_end (γ: [n,H,1] or [n,H,K], None without decay): S_out = e^γ ⊙ S + k_endᵀ δ.
    """

    w: torch.Tensor
    u: torch.Tensor
    k_end: torch.Tensor
    g_end: torch.Tensor | None


def chunk_log_decay(decay):
    """Γ, the chunk-local inclusive cumulative log-decay, of per-token log-decays
    [n, H, C] (scalar, returned as [n, H, C, 1]) or [n, H, C, K]; None stays None."""
    if decay is None:
        return None
    return (decay[..., None] if decay.dim() == 3 else decay).cumsum(2)


def chunk_pieces(k, v, beta, gam) -> ChunkPieces:
    """The UT transform of every chunk: T = (I + diag(β) L)⁻¹ diag(β) by one unit
    lower-triangular solve against the identity (C right-hand sides: cheaper than solving
    for W and U directly when K + V > C), then W and U by products."""
    C = k.shape[2]
    eye = torch.eye(C, dtype=k.dtype, device=k.device)
    system = eye + beta[..., None] * decayed_scores(k, k, gam, strict=True)
    inverse = torch.linalg.solve_triangular(system, eye.expand_as(system), upper=False, unitriangular=True)
    k_dec = k if gam is None else k * gam.exp()
    w, u = inverse @ (beta[..., None] * k_dec), inverse @ (beta[..., None] * v)
    if gam is None:
        return ChunkPieces(w, u, k, None)
    g_end = gam[:, :, -1]
    return ChunkPieces(w, u, k * (g_end[:, :, None] - gam).exp(), g_end)


def chunk_transitions(pieces: ChunkPieces):
    """Each chunk's transition M = diag(e^γ) − k_endᵀ W, [n, H, K, K]."""
    m = -pieces.k_end.transpose(-1, -2) @ pieces.w
    K = m.shape[-1]
    decay = torch.ones(K, dtype=m.dtype, device=m.device) if pieces.g_end is None else pieces.g_end.exp()
    return m + torch.diag_embed(decay.expand(*m.shape[:-1]))


def chunk_outputs(q, k, gam, delta, states, scale):
    """scale [(Q ⊙ e^Γ) S_in + A δ] of every chunk, [n, H, C, V] (`states` [n, H, K, V]
    the chunks' incoming states, `delta` [n, H, C, V])."""
    q_dec = q if gam is None else q * gam.exp()
    scores = decayed_scores(q, k, gam, strict=False)
    return scale * (q_dec @ states + scores @ delta)


def carry(state, pieces: ChunkPieces, c):
    """Chunk c of one document: (δ [H, C, V], the state leaving it) from its incoming
    state [H, K, V] (torch; the Triton state pass does the same per V-tile)."""
    delta = pieces.u[c] - pieces.w[c] @ state
    if pieces.g_end is not None:
        state = pieces.g_end[c].exp()[..., None] * state
    return delta, state + pieces.k_end[c].transpose(-1, -2) @ delta
