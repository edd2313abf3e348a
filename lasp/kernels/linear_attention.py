"""`linear_attention`: the public single-device op (DESIGN.md §3) and its backend choice,
and `linear_attention_phases`, the same computation split at its data dependencies."""

from __future__ import annotations

import os

import torch

from lasp.kernels import reference
from lasp.kernels.checks import check_cu_seqlens, check_decay, check_qkv, check_state

BACKENDS = ("triton", "torch")
TRITON_HEAD_DIMS = (16, 256)


def _pick_backend(backend, q) -> str:
    if backend is None:
        return "triton" if q.is_cuda else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton":
        if not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
        if q.dtype == torch.float64:
            raise TypeError("backend='triton' takes bf16, fp16 or fp32; use backend='torch' for float64")
    return backend


def _check_triton_head_dims(q, v) -> None:
    lo, hi = TRITON_HEAD_DIMS
    for name, dim in (("q/k head dim K", q.shape[-1]), ("v head dim V", v.shape[-1])):
        if not lo <= dim <= hi:
            raise ValueError(f"backend='triton' supports head dims {lo}..{hi}; {name} is {dim}")


def _checked(q, k, v, g, g_gamma, scale, initial_state, cu_seqlens, causal, backend):
    """Validate the arguments of `linear_attention`; returns (per-token g or None, scale, backend)."""
    check_qkv(q, k, v)
    check_decay(g, g_gamma, q, causal)
    B, T, H, K = q.shape
    N = B if cu_seqlens is None else check_cu_seqlens(cu_seqlens, q)
    check_state("initial_state", initial_state, (N, H, K, v.shape[-1]))
    if g_gamma is not None:
        g = g_gamma[None, None, :].expand(B, T, H)
    return g, K ** -0.5 if scale is None else scale, _pick_backend(backend, q)


def linear_attention(q, k, v, g=None, g_gamma=None, *, scale=None, initial_state=None,
                     output_final_state=False, cu_seqlens=None, causal=True, backend=None,
                     cu_seqlens_host=None):
    """Chunkwise linear attention with optional decay; returns `(o, final_state)`.

    Args:
        q, k: [B,T,H,K]; v: [B,T,H,V]; bf16, fp16, fp32 (fp64 on the torch backend).
        g: [B,T,H] data-dependent log-decay (natural log, ≤ 0), or
        g_gamma: [H] fixed per-head log-decay (≤ 0). At most one; neither for plain
            attention. Decays need `causal=True`.
        scale: query scale, default K**-0.5.
        initial_state: [N,H,K,V] (N = B, or the number of packed sequences), fp32.
        output_final_state: also return the [N,H,K,V] state after each sequence.
        cu_seqlens: int [N+1] offsets of packed sequences (B must be 1).
        causal: False gives bidirectional plain linear attention (each token reads its
            whole sequence's state).
        backend: "triton" (CUDA), "torch" (any device and dtype, the oracle), or None
            (triton on CUDA, torch elsewhere).
        cu_seqlens_host: optional host copy of `cu_seqlens` (list or CPU tensor) that
            lets the Triton backend size its launch exactly instead of by an upper bound.

    Returns o: [B,T,H,V] in q's dtype; final_state: [N,H,K,V] fp32 (fp64 for fp64
    inputs), or None.
    """
    g, scale, backend = _checked(q, k, v, g, g_gamma, scale, initial_state, cu_seqlens, causal, backend)

    if backend == "torch" or not causal:
        # Non-causal attention is two matmuls per sequence: no kernel of its own.
        return reference.chunk_linear_attention(
            q, k, v, g, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens, causal=causal)

    _check_triton_head_dims(q, v)
    from lasp.kernels.triton_linear_attention import triton_linear_attention
    return triton_linear_attention(
        q, k, v, None if g is None else g.float().contiguous(), float(scale),
        None if initial_state is None else initial_state.float(), output_final_state,
        cu_seqlens, cu_seqlens_host)


def linear_attention_phases(q, k, v, g=None, g_gamma=None, *, scale=None, initial_state=None,
                            cu_seqlens=None, causal=True, backend=None):
    """`linear_attention` with its final states, split into phases for a caller that runs
    other work in between (LASP-2 runs its collectives there). Arguments as in
    `linear_attention`. Returns `(phases, inputs)`: the backend's phase object and the
    inputs in the form its phases take, `inputs = (q, k, v, g, initial_state)` (converted
    differentiably: g_gamma expanded to g, contiguous, fp32 decay on Triton). Then::

        final, saved = phases.summarize(k, v, g, initial_state)    # reads k, v, g only
        o = phases.output(q, k, v, g, saved)
        dq, partial = phases.grad_q(q, k, v, g, saved, do)         # needs no d final
        dk, dv, dg, dh0 = phases.grad_kvg(q, k, v, g, saved, partial, d_final,
                                          want_dg=..., want_dh0=...)

    `final` ([N,H,K,V], fp32 or fp64) and `o` are those of `linear_attention(...,
    output_final_state=True)`; dq..dh0 are the gradients of <o, do> + <final, d_final>
    (dg and dh0 None where g or the initial state is None). The phases themselves are not
    differentiable: the caller's autograd.Function calls the backward ones, keeping the
    tensors of `saved` (save_for_backward) and `partial` between them.
    """
    g, scale, backend = _checked(q, k, v, g, g_gamma, scale, initial_state, cu_seqlens, causal, backend)
    if backend == "torch" or not causal:
        return reference.TorchPhases(scale, causal, cu_seqlens), (q, k, v, g, initial_state)
    _check_triton_head_dims(q, v)
    from lasp.kernels.triton_linear_attention import triton_phases
    return triton_phases(q, k, v, g, scale, initial_state, cu_seqlens)
