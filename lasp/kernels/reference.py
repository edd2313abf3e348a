"""Pure-torch linear attention: the oracle every other implementation is checked against.

Two forms of one recurrence (per head, see DESIGN.md §1)::

    S_t = exp(g_t) · S_{t-1} + k_t v_tᵀ        o_t = scale · q_tᵀ S_t

- `naive_linear_attention` steps token by token. It is slow and obviously right.
- `chunk_linear_attention` is the chunkwise form (intra-chunk masked product plus the
  carried state), checked against the naive form in float64. It runs on any device and
  dtype and is the `torch` backend of `lasp.kernels.linear_attention`.

Both take already-validated arguments (`g` is per token; a fixed per-head decay arrives
expanded), run every packed sequence independently, and return `(o, final_state)` with
`final_state` None unless asked for. States and accumulation use
`accumulation_dtype(q.dtype)`: float32, or float64 for float64 inputs.
"""

from __future__ import annotations

import torch

CHUNK_SIZE = 64


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """States are fp32, except in a float64 computation (the oracle's precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sequences(batch: int, total: int, cu_seqlens):
    """Yield (row, start, end) for each independent sequence, in state order.

    Packed input reads `cu_seqlens` on the host: the torch backend is the reference,
    the Triton backend is the sync-free hot path.
    """
    if cu_seqlens is None:
        for b in range(batch):
            yield b, 0, total
    else:
        bounds = cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            yield 0, start, end


def _run(step, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
    """Apply `step(q, k, v, g, scale, state) -> (o, state)` to each sequence and assemble."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = accumulation_dtype(q.dtype)
    outs, finals = [], []
    for n, (b, start, end) in enumerate(_sequences(B, T, cu_seqlens)):
        state = (q.new_zeros(H, K, V, dtype=acc) if initial_state is None
                 else initial_state[n].to(acc))
        gate = None if g is None else g[b, start:end].to(acc)
        o, state = step(q[b, start:end].to(acc), k[b, start:end].to(acc),
                        v[b, start:end].to(acc), gate, scale, state)
        outs.append(o)
        finals.append(state)
    o = torch.cat(outs, 0).view(1, T, H, V) if cu_seqlens is not None else torch.stack(outs)
    final = torch.stack(finals) if output_final_state else None
    return o.to(q.dtype), final


def _naive_step(q, k, v, g, scale, state):
    outs = []
    for t in range(q.shape[0]):
        if g is not None:
            state = state * g[t].exp()[:, None, None]
        state = state + k[t, :, :, None] * v[t, :, None, :]
        outs.append(scale * torch.einsum("hk,hkv->hv", q[t], state))
    o = torch.stack(outs) if outs else q.new_zeros(0, *v.shape[1:])
    return o, state


def _noncausal_step(q, k, v, g, scale, state):
    state = state + torch.einsum("thk,thv->hkv", k, v)
    return scale * torch.einsum("thk,hkv->thv", q, state), state


def naive_linear_attention(q, k, v, g=None, *, scale, initial_state=None,
                           output_final_state=False, cu_seqlens=None, causal=True):
    """Token-by-token recurrence. Non-causal: every token reads the sequence's full state
    (`initial_state` plus all keys and values), which is also its final state."""
    step = _naive_step if causal else _noncausal_step
    return _run(step, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def _chunk_step(q, k, v, g, scale, state, chunk_size=CHUNK_SIZE):
    outs = []
    for s in range(0, q.shape[0], chunk_size):
        qc, kc, vc = q[s:s + chunk_size], k[s:s + chunk_size], v[s:s + chunk_size]
        C = qc.shape[0]
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        scores = torch.einsum("thk,shk->hts", qc, kc)
        if g is None:
            scores = scores.masked_fill(~causal, 0)
            o = torch.einsum("hts,shv->thv", scores, vc)
            o = o + torch.einsum("thk,hkv->thv", qc, state)
            state = state + torch.einsum("thk,thv->hkv", kc, vc)
        else:
            cum = g[s:s + chunk_size].cumsum(0)                      # Γ_t: [C, H]
            diff = cum.T[:, :, None] - cum.T[:, None, :]              # Γ_t − Γ_s: [H, C, C]
            decay = diff.masked_fill(~causal, float("-inf")).exp()    # mask before exp
            o = torch.einsum("hts,shv->thv", scores * decay, vc)
            o = o + torch.einsum("thk,hkv->thv", qc * cum.exp()[..., None], state)
            last = cum[-1]
            state = (state * last.exp()[:, None, None]
                     + torch.einsum("thk,thv->hkv", kc * (last - cum).exp()[..., None], vc))
        outs.append(scale * o)
    o = torch.cat(outs) if outs else q.new_zeros(0, *v.shape[1:])
    return o, state


def chunk_linear_attention(q, k, v, g=None, *, scale, initial_state=None,
                           output_final_state=False, cu_seqlens=None, causal=True,
                           chunk_size=CHUNK_SIZE):
    """Chunkwise form: per chunk, `((Q Kᵀ) ⊙ decay) V` plus `Q · S_in`, then carry S."""
    if not causal:
        step = _noncausal_step
    else:
        def step(q, k, v, g, scale, state):
            return _chunk_step(q, k, v, g, scale, state, chunk_size)
    return _run(step, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
