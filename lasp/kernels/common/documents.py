"""The torch side shared by every family: accumulation dtype, the loop over documents, and
the torch backend in phases.

A family's torch forms (its naive and chunkwise forms) are written for ONE document as a
*step* `step(q, k, v, decay, scale, state) -> (o, state)` on [t, H, D] tensors in the
accumulation dtype; `run_documents` applies a step to every document and assembles the
outputs and final states. `TorchPhases` splits any family's chunkwise form into the
phases of `lasp.kernels.linear_attention_phases`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """States are fp32, except in a float64 computation (the oracle's precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """16-bit inputs multiply on the tensor cores with no fp32 copy; fp32/64 multiply in
    the accumulation dtype (exact)."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else accumulation_dtype(dtype)


def document_count(batch: int, cu_seqlens) -> int:
    """N, the states of a call: its batch rows, or the packed documents of `cu_seqlens`
    (from its shape: no sync)."""
    return batch if cu_seqlens is None else cu_seqlens.shape[0] - 1


def documents(batch: int, total: int, cu_seqlens):
    """Yield (row, start, end) for each document, in state order.

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


def _document_slice(x, b, start, end, dtype):
    """x[b, start:end] in `dtype`, for a tensor, None or a tuple of them."""
    if isinstance(x, tuple):
        return tuple(_document_slice(t, b, start, end, dtype) for t in x)
    return None if x is None else x[b, start:end].to(dtype)


def run_documents(step, q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens):
    """Apply `step(q, k, v, decay, scale, state) -> (o, state)` to each document and assemble.

    `decay` is None, a per-token tensor [B, T, H, ...] or a tuple of such tensors (or None),
    sliced per document like k; q None computes the states only (the steps then return
    o None). Returns
    (o [B,T,H,V] in q's dtype or None, final states [N,H,K,V] or None).
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    acc = accumulation_dtype(k.dtype)
    outs, finals = [], []
    for n, (b, start, end) in enumerate(documents(B, T, cu_seqlens)):
        state = (k.new_zeros(H, K, V, dtype=acc) if initial_state is None
                 else initial_state[n].to(acc))
        gate = _document_slice(decay, b, start, end, acc)
        o, state = step(None if q is None else q[b, start:end].to(acc), k[b, start:end].to(acc),
                        v[b, start:end].to(acc), gate, scale, state)
        outs.append(o)
        finals.append(state)
    final = torch.stack(finals) if output_final_state else None
    if q is None:
        return None, final
    o = torch.cat(outs, 0).view(1, T, H, V) if cu_seqlens is not None else torch.stack(outs)
    return o.to(q.dtype), final


@dataclass(frozen=True)
class TorchPhases:
    """The torch backend in the phases of `lasp.kernels.linear_attention_phases`, for any
    family.

    `chunk_form(q, k, v, *gates, scale, initial_state, output_final_state, cu_seqlens,
    causal) -> (o, final_state)` is the family's form; it accepts q None (states only).
    The phases' decay argument is the family's per-token tensor (or None), or a tuple of
    them for a family with several (the delta rule: (decay, beta)); its gradient comes back
    in the same shape. `summarize` runs the form without q and `output` with q. The
    backward is autograd's: `grad_q` reruns the form (outputs and final states) under
    autograd and differentiates the outputs for dq (q does not reach the final states);
    `grad_kvg` differentiates the same graph for the other inputs, now with the final
    states' gradient.
    """

    chunk_form: Callable
    scale: float
    causal: bool
    cu_seqlens: torch.Tensor | None

    def _run(self, q, k, v, gates, initial_state, output_final_state):
        return self.chunk_form(q, k, v, *gates, scale=self.scale, initial_state=initial_state,
                               output_final_state=output_final_state, cu_seqlens=self.cu_seqlens,
                               causal=self.causal)

    def summarize(self, k, v, g, initial_state):
        final = self._run(None, k, v, _gates(g), initial_state, True)[1]
        return final, (initial_state,)

    def output(self, q, k, v, g, saved):
        return self._run(q, k, v, _gates(g), saved[0], False)[0]

    def grad_q(self, q, k, v, g, saved, do):
        gates = _gates(g)
        with torch.enable_grad():
            leaves = [None if x is None else x.detach().requires_grad_() for x in (q, k, v, *gates, saved[0])]
            o, final = self._run(*leaves[:3], leaves[3:-1], leaves[-1], True)
            dq, = torch.autograd.grad(o, leaves[0], do, retain_graph=True)
        return dq, (leaves[1:], o, final, do)

    def grad_kvg(self, q, k, v, g, saved, partial, d_final, want_dg=True, want_dh0=True):
        """(dk, dv, d decay, dh0); d decay (or its entries) and dh0 None where the decay or the
        initial state is None. The oracle computes every gradient (`want_*` are the Triton
        backend's savings)."""
        leaves, o, final, do = partial
        outputs, cotangents = ([o], [do]) if d_final is None else ([o, final], [do, d_final])
        live = [x for x in leaves if x is not None]
        grads = iter(torch.autograd.grad(outputs, live, cotangents, allow_unused=True))
        dk, dv, *d_gates, dh0 = (None if x is None else _or_zeros(next(grads), x) for x in leaves)
        return dk, dv, tuple(d_gates) if isinstance(g, tuple) else d_gates[0], dh0


def _gates(g) -> tuple:
    """The phases' decay argument as the tuple of per-token tensors the form takes."""
    return g if isinstance(g, tuple) else (g,)


def _or_zeros(grad, x):
    """An unused input's gradient (None from autograd) as zeros."""
    return torch.zeros_like(x) if grad is None else grad
