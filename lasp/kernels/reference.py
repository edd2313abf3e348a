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

`final_state` carries the chunkwise state alone (no outputs), and `TorchPhases` splits
the chunkwise form into the phases of `lasp.kernels.linear_attention_phases`.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """Apply `step(q, k, v, g, scale, state) -> (o, state)` to each sequence and assemble.

    q None computes the states only (the steps then return o None).
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    acc = accumulation_dtype(k.dtype)
    outs, finals = [], []
    for n, (b, start, end) in enumerate(_sequences(B, T, cu_seqlens)):
        state = (k.new_zeros(H, K, V, dtype=acc) if initial_state is None
                 else initial_state[n].to(acc))
        gate = None if g is None else g[b, start:end].to(acc)
        o, state = step(None if q is None else q[b, start:end].to(acc), k[b, start:end].to(acc),
                        v[b, start:end].to(acc), gate, scale, state)
        outs.append(o)
        finals.append(state)
    final = torch.stack(finals) if output_final_state else None
    if q is None:
        return None, final
    o = torch.cat(outs, 0).view(1, T, H, V) if cu_seqlens is not None else torch.stack(outs)
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


def _carry(state, k, v, cum):
    """The state after a run of tokens: the decayed incoming state plus their decayed kᵀv
    (`cum`: inclusive cumulative log-decay [t, H] over the run, None for plain)."""
    if cum is None:
        return state + torch.einsum("thk,thv->hkv", k, v)
    last = cum[-1]
    return (state * last.exp()[:, None, None]
            + torch.einsum("thk,thv->hkv", k * (last - cum).exp()[..., None], v))


def _noncausal_step(q, k, v, g, scale, state):
    state = _carry(state, k, v, None)
    return None if q is None else scale * torch.einsum("thk,hkv->thv", q, state), state


def naive_linear_attention(q, k, v, g=None, *, scale, initial_state=None,
                           output_final_state=False, cu_seqlens=None, causal=True):
    """Token-by-token recurrence. Non-causal: every token reads the sequence's full state
    (`initial_state` plus all keys and values), which is also its final state."""
    step = _naive_step if causal else _noncausal_step
    return _run(step, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def _chunk_step(q, k, v, g, scale, state, chunk_size=CHUNK_SIZE):
    outs = []
    for s in range(0, k.shape[0], chunk_size):
        kc, vc = k[s:s + chunk_size], v[s:s + chunk_size]
        cum = None if g is None else g[s:s + chunk_size].cumsum(0)     # Γ_t: [C, H]
        if q is not None:
            outs.append(scale * _chunk_output(q[s:s + chunk_size], kc, vc, cum, state))
        state = _carry(state, kc, vc, cum)
    if q is None:
        return None, state
    o = torch.cat(outs) if outs else q.new_zeros(0, *v.shape[1:])
    return o, state


def _chunk_output(qc, kc, vc, cum, state):
    """Unscaled outputs of one chunk: intra-chunk masked product plus the incoming state."""
    C = qc.shape[0]
    causal = torch.ones(C, C, dtype=torch.bool, device=qc.device).tril()
    scores = torch.einsum("thk,shk->hts", qc, kc)
    if cum is None:
        scores = scores.masked_fill(~causal, 0)
        return torch.einsum("hts,shv->thv", scores, vc) + torch.einsum("thk,hkv->thv", qc, state)
    diff = cum.T[:, :, None] - cum.T[:, None, :]              # Γ_t − Γ_s: [H, C, C]
    decay = diff.masked_fill(~causal, float("-inf")).exp()    # mask before exp
    o = torch.einsum("hts,shv->thv", scores * decay, vc)
    return o + torch.einsum("thk,hkv->thv", qc * cum.exp()[..., None], state)


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


def final_state(k, v, g=None, *, initial_state=None, cu_seqlens=None, causal=True,
                chunk_size=CHUNK_SIZE):
    """Each sequence's final state [N,H,K,V] as `chunk_linear_attention` carries it, without
    computing any output (q is not needed: the state is the keys' and values' summary)."""
    step = _noncausal_step if not causal else (
        lambda q, k, v, g, scale, state: _chunk_step(q, k, v, g, scale, state, chunk_size))
    return _run(step, None, k, v, g, None, initial_state, True, cu_seqlens)[1]


@dataclass(frozen=True)
class TorchPhases:
    """The torch backend in the phases of `lasp.kernels.linear_attention_phases`.

    `summarize` is `final_state` and `output` is `chunk_linear_attention`. The backward is
    the oracle's: `grad_q` recomputes `chunk_linear_attention` (outputs and final states)
    under autograd and differentiates the outputs for dq (q does not reach the final
    states); `grad_kvg` differentiates the same graph for the other inputs, now with the
    final states' gradient.
    """

    scale: float
    causal: bool
    cu_seqlens: torch.Tensor | None

    def summarize(self, k, v, g, initial_state):
        final = final_state(k, v, g, initial_state=initial_state, cu_seqlens=self.cu_seqlens,
                            causal=self.causal)
        return final, (initial_state,)

    def output(self, q, k, v, g, saved):
        return chunk_linear_attention(q, k, v, g, scale=self.scale, initial_state=saved[0],
                                      cu_seqlens=self.cu_seqlens, causal=self.causal)[0]

    def grad_q(self, q, k, v, g, saved, do):
        with torch.enable_grad():
            leaves = [None if x is None else x.detach().requires_grad_() for x in (q, k, v, g, saved[0])]
            o, final = chunk_linear_attention(*leaves[:4], scale=self.scale, initial_state=leaves[4],
                                              output_final_state=True, cu_seqlens=self.cu_seqlens,
                                              causal=self.causal)
            dq, = torch.autograd.grad(o, leaves[0], do, retain_graph=True)
        return dq, (leaves[1:], o, final, do)

    def grad_kvg(self, q, k, v, g, saved, partial, d_final, want_dg=True, want_dh0=True):
        """(dk, dv, dg, dh0); dg and dh0 None where g or the initial state is None. The
        oracle computes every gradient (`want_*` are the Triton backend's savings)."""
        leaves, o, final, do = partial
        outputs, cotangents = ([o], [do]) if d_final is None else ([o, final], [do, d_final])
        live = [x for x in leaves if x is not None]
        grads = iter(torch.autograd.grad(outputs, live, cotangents, allow_unused=True))
        return tuple(None if x is None else _or_zeros(next(grads), x) for x in leaves)


def _or_zeros(grad, x):
    """An unused input's gradient (None from autograd) as zeros."""
    return torch.zeros_like(x) if grad is None else grad
