"""`linear_attention`: the public single-device op (DESIGN.md §3), and
`linear_attention_phases`, the same computation split at its data dependencies.

Arguments are validated here, once, and turned into per-token `Transition`s; below this
boundary nothing sees `g`, `g_gamma` or `gk` again. The transition's kind picks the
family that computes it, and the backend picks that family's torch form (the oracle,
any device and dtype) or its Triton kernels:

    identity, scalar  ->  lasp.kernels.scalar     (plain, g_gamma, g)
    diagonal          ->  lasp.kernels.diagonal   (gk)
    beta given        ->  lasp.kernels.delta      (delta rule with none, g or gk: the
                          tokens' transitions are dense, (I − β k kᵀ) A_t)

`lasp.parallel` calls the unchecked `plan_*` / `run_*` functions after validating its own
(global) arguments once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lasp.kernels.checks import check_beta, check_cu_seqlens, check_decay, check_qkv, check_state
from lasp.kernels.common.launch import check_triton_head_dims
from lasp.kernels.transition import Transition

BACKENDS = ("triton", "torch")
FAMILIES = {"identity": "scalar", "scalar": "scalar", "diagonal": "diagonal"}


@dataclass(frozen=True)
class Call:
    """A validated call: the per-token decay transitions, the delta rule's `beta` (or
    None), the query scale, the backend."""

    tokens: Transition
    beta: torch.Tensor | None
    scale: float
    backend: str

    @property
    def family(self) -> str:
        return "delta" if self.beta is not None else FAMILIES[self.tokens.kind]

    @property
    def gates(self) -> tuple:
        """The family's per-token arguments after q, k, v: (decay,) or (decay, beta)."""
        return (self.tokens.param,) if self.beta is None else (self.tokens.param, self.beta)


def pick_backend(backend, q) -> str:
    """"triton" on CUDA, "torch" elsewhere, or the caller's choice, checked."""
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


def check_call(q, k, v, *, g=None, g_gamma=None, gk=None, beta=None, scale=None, initial_state=None,
               cu_seqlens=None, causal=True, backend=None) -> Call:
    """Validate the arguments of `linear_attention` (every error names its argument)."""
    check_qkv(q, k, v)
    tokens = check_decay(q, g=g, g_gamma=g_gamma, gk=gk, causal=causal)
    check_beta(beta, q, causal)
    B, T, H, K = q.shape
    N = B if cu_seqlens is None else check_cu_seqlens(cu_seqlens, q)
    check_state("initial_state", initial_state, (N, H, K, v.shape[-1]))
    backend = pick_backend(backend, q)
    if backend == "triton" and causal:
        check_triton_head_dims(q, v)
    return Call(tokens, beta, K ** -0.5 if scale is None else float(scale), backend)


def family_module(call: Call, causal: bool = True):
    """The module computing this call: the family's torch form or Triton kernels
    (non-causal attention is two matmuls per document: the torch form always). Each
    exposes `linear_attention(q, k, v, *call.gates, ...)` and `phases(...)`; the delta
    family also `run_transitions(k, *call.gates, cu_seqlens=...)` and `affine_phases(...)`."""
    # Import statements, not importlib: torch.compile traces them (a single-device call
    # compiles into its caller's graph); the Triton modules only when they run.
    if call.backend == "triton" and causal:
        from lasp.kernels.delta import triton as delta
        from lasp.kernels.diagonal import triton as diagonal
        from lasp.kernels.scalar import triton as scalar
    else:
        from lasp.kernels.delta import chunk as delta
        from lasp.kernels.diagonal import chunk as diagonal
        from lasp.kernels.scalar import chunk as scalar
    return {"scalar": scalar, "diagonal": diagonal, "delta": delta}[call.family]


def run_linear_attention(q, k, v, call: Call, *, initial_state=None, output_final_state=False,
                         cu_seqlens=None, causal=True):
    """`linear_attention` on a validated `call`."""
    return family_module(call, causal).linear_attention(
        q, k, v, *call.gates, scale=call.scale, initial_state=initial_state,
                                   output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                   causal=causal)


def plan_phases(q, k, v, call: Call, *, initial_state=None, cu_seqlens=None, causal=True):
    """`linear_attention_phases` on a validated `call`."""
    return family_module(call, causal).phases(q, k, v, *call.gates, scale=call.scale,
                                              initial_state=initial_state, cu_seqlens=cu_seqlens,
                                              causal=causal)


def plan_affine_phases(q, k, v, call: Call, *, cu_seqlens=None):
    """The delta rule's run as an affine map of its initial state, in phases
    (`lasp.kernels.delta.chunk`, the affine run), on a validated `call` with `beta`:
    `(phases, (q, k, v, decay, beta))`, the inputs in the form the phases take (converted
    differentiably)."""
    return family_module(call).affine_phases(q, k, v, *call.gates, scale=call.scale, cu_seqlens=cu_seqlens)


def linear_attention(q, k, v, g=None, g_gamma=None, *, gk=None, beta=None, scale=None, initial_state=None,
                     output_final_state=False, cu_seqlens=None, causal=True, backend=None):
    """Chunkwise linear attention with optional decay; returns `(o, final_state)`.

    Args:
        q, k: [B,T,H,K]; v: [B,T,H,V]; bf16, fp16, fp32 (fp64 on the torch backend).
        g: [B,T,H] per-token log-decay (natural log, ≤ 0: Mamba-2, simple GLA), or
        g_gamma: [H] fixed per-head log-decay (Lightning Attention, RetNet), or
        gk: [B,T,H,K] per-key log-decay (GLA): `S_t = diag(exp(gk_t)) S_{t-1} + k_t v_tᵀ`.
            At most one; none for plain attention; finite; decays need `causal=True`.
        beta: [B,T,H] selects the delta rule (DeltaNet; Gated DeltaNet with g; KDA with
            gk), fla's semantics: decay the state, then `S += β k (v − kᵀ S)ᵀ`. Keys are
            not normalised here (the layers do it). Causal only.
        scale: query scale, default K**-0.5.
        initial_state: [N,H,K,V] (N = B, or the number of packed documents), fp32.
        output_final_state: also return the [N,H,K,V] state after each document.
        cu_seqlens: int [N+1] offsets of packed documents (B must be 1).
        causal: False gives bidirectional plain linear attention (each token reads its
            whole document's state).
        backend: "triton" (CUDA), "torch" (any device and dtype, the oracle), or None
            (triton on CUDA, torch elsewhere).

    Returns o: [B,T,H,V] in q's dtype; final_state: [N,H,K,V] fp32 (fp64 for fp64
    inputs), or None. Differentiable in q, k, v, the decay and the initial state.
    """
    call = check_call(q, k, v, g=g, g_gamma=g_gamma, gk=gk, beta=beta, scale=scale,
                      initial_state=initial_state, cu_seqlens=cu_seqlens, causal=causal, backend=backend)
    return run_linear_attention(q, k, v, call, initial_state=initial_state,
                                output_final_state=output_final_state, cu_seqlens=cu_seqlens, causal=causal)


def linear_attention_phases(q, k, v, g=None, g_gamma=None, *, gk=None, beta=None, scale=None,
                            initial_state=None, cu_seqlens=None, causal=True, backend=None):
    """`linear_attention` with its final states, split into phases for a caller that runs
    other work in between (LASP-2 runs its collectives there). Arguments as in
    `linear_attention`. Returns `(phases, inputs)`: the family's phase object and the
    inputs in the form its phases take, `inputs = (q, k, v, decay, initial_state)`
    (converted differentiably: `decay` is the per-token log-decay of the family — g,
    g_gamma expanded to g, or gk — contiguous, fp32 on Triton; None for plain; with
    `beta` the pair (decay, beta), whose gradient is then the pair too). Then::

        final, saved = phases.summarize(k, v, decay, initial_state)    # reads k, v, decay only
        o = phases.output(q, k, v, decay, saved)
        dq, partial = phases.grad_q(q, k, v, decay, saved, do)         # needs no d final
        dk, dv, d_decay, dh0 = phases.grad_kvg(q, k, v, decay, saved, partial, d_final,
                                               want_dg=..., want_dh0=...)

    `final` ([N,H,K,V], fp32 or fp64) and `o` are those of `linear_attention(...,
    output_final_state=True)`; dq..dh0 are the gradients of <o, do> + <final, d_final>
    (d_decay and dh0 None where the decay or the initial state is None). The phases
    themselves are not differentiable: the caller's autograd.Function calls the backward
    ones, keeping the tensors of `saved` (save_for_backward) and `partial` between them.
    """
    call = check_call(q, k, v, g=g, g_gamma=g_gamma, gk=gk, beta=beta, scale=scale,
                      initial_state=initial_state, cu_seqlens=cu_seqlens, causal=causal, backend=backend)
    return plan_phases(q, k, v, call, initial_state=initial_state, cu_seqlens=cu_seqlens, causal=causal)
