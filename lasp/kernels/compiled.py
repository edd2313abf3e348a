"""How `torch.compile` sees lasp's attention ops: single-device kernels as opaque custom ops,
sequence-parallel ops as calls it runs eagerly.

Single device. The Triton families' autograd Functions (`span_phases.TritonLinearAttention`:
plain, g_gamma, g, gk; `delta.triton.FusedDeltaRule`: the delta rule) run their forward and
their backward through the custom ops registered here (namespace ``lasp``): under
torch.compile as the ops, eagerly as the same functions called directly (`_custom_op`). The
host planning and the launches happen inside the ops, so Dynamo traces a Function through
and records each op as one call it does not look into: a block, attention included, compiles as one graph
(`fullgraph=True`). A forward op returns the output, the final states and what the backward
needs; the ops' fake forms give those shapes from the inputs' shapes alone (no host sync).
AOT autograd's partitioner then decides what the backward keeps: selective activation
checkpointing names the forward ops (`FORWARD_OPS`) to keep their outputs rather than launch
them again. A Tensor an op has no use for is returned empty (custom ops return no None).
Softmax attention needs no op here: its backends (sdpa, flex, flash-attn's own custom ops,
math) trace as they are.

Sequence parallel. LASP-2 and LASP-2H take a process group (no custom op argument) and
overlap their collectives with the kernels on a side stream; a compiled caller breaks its
graph at them (`eager_under_compile`) and runs them eagerly, exactly as without compile.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lasp.kernels.common.documents import document_count


def eager_under_compile(op):
    """`op`, run eagerly when torch.compile traces a call to it (a graph break there)."""
    @functools.wraps(op)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return torch.compiler.disable(op)(*args, **kwargs)
        return op(*args, **kwargs)
    return call


def _custom_op(name: str):
    """Decorator: registers `fn` as the custom op `lasp::<name>` (`.op`, for its fake form)
    and returns a call that is that op under torch.compile and `fn` itself eagerly. The
    dispatcher costs ~20 µs a call, which a host-bound step pays: eager plain linear
    attention's fwd+bwd at 1×32K, H=16, D=128 runs its host side (launches, planning) in
    about the time of its kernels on an H100."""
    def register(fn):
        op = torch.library.custom_op(f"lasp::{name}", fn, mutates_args=())

        @functools.wraps(fn)
        def call(*args):
            return (op if torch.compiler.is_compiling() else fn)(*args)
        call.op = op
        return call
    return register


def _empty(x: Tensor) -> Tensor:
    """The stand-in for a Tensor an op does not return."""
    return x.new_empty(0)


# ---- the span-walk families (scalar: plain, g_gamma, g; diagonal: gk) ----------------------


def _span_phases(family, k, v, cu_seqlens, scale, chunk, span_chunks, decay_grad, fuse_dkdv):
    """The `TritonPhases` of one call of `family`'s launches."""
    from lasp.kernels.common.span_phases import make_phases
    if family == "scalar":
        from lasp.kernels.scalar.triton import LAUNCHES
    else:
        from lasp.kernels.diagonal.triton import LAUNCHES
    return make_phases(LAUNCHES, k, v, cu_seqlens, scale, chunk, span_chunks, decay_grad, fuse_dkdv)


@_custom_op("span_forward")
def span_forward(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, h0: Tensor | None, row_weight: Tensor | None,
                 cu_seqlens: Tensor | None, family: str, scale: float, chunk: int,
                 span_chunks: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(o, final states, every span's incoming state, the spans' log-decays or empty)."""
    phases = _span_phases(family, k, v, cu_seqlens, scale, chunk, span_chunks, False, False)
    final, saved = phases.summarize(k, v, g, h0)
    o = phases.output(q, k, v, g, saved, row_weight)
    states, g_span = saved
    return o, final, states, _empty(k) if g_span is None else g_span


@span_forward.op.register_fake
def _(q, k, v, g, h0, row_weight, cu_seqlens, family, scale, chunk, span_chunks):
    from lasp.kernels.common.plan import make_span_plan
    plan = make_span_plan(k, v, cu_seqlens, chunk, span_chunks)
    H, K, V, NS = plan.H, plan.K, plan.V, plan.n_spans
    fp32 = dict(dtype=torch.float32)
    return (q.new_empty(plan.B, plan.T, H, V), k.new_empty(plan.n_docs, H, K, V, **fp32),
            k.new_empty(NS, H, K, V, **fp32), _empty(k) if g is None else k.new_empty(NS, H, **fp32))


@_custom_op("span_backward")
def span_backward(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, row_weight: Tensor | None,
                  cu_seqlens: Tensor | None, states: Tensor, g_span: Tensor, do: Tensor, d_final: Tensor | None,
                  family: str, scale: float, chunk: int, span_chunks: int, fuse_dkdv: bool, want_dg: bool,
                  want_dh0: bool, want_dw: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d decay, d initial state, d row weight), the last three empty unless wanted."""
    phases = _span_phases(family, k, v, cu_seqlens, scale, chunk, span_chunks, want_dg, fuse_dkdv)
    saved = (states, None if g is None else g_span)
    dq, partial = phases.grad_q(q, k, v, g, saved, do, row_weight)
    dk, dv, dg, dh0 = phases.grad_kvg(q, k, v, g, saved, partial, d_final, want_dg=want_dg, want_dh0=want_dh0,
                                      row_weight=row_weight)
    dw = phases.grad_row_weight(partial, row_weight) if want_dw else None
    return dq, dk, dv, *(_empty(k) if x is None else x for x in (dg, dh0, dw))


@span_backward.op.register_fake
def _(q, k, v, g, row_weight, cu_seqlens, states, g_span, do, d_final, family, scale, chunk, span_chunks,
      fuse_dkdv, want_dg, want_dh0, want_dw):
    B, T, H, K = k.shape
    n_docs = document_count(B, cu_seqlens)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(g, dtype=torch.float32) if want_dg else _empty(k),
            k.new_empty(n_docs, H, K, v.shape[-1], dtype=torch.float32) if want_dh0 else _empty(k),
            k.new_empty(B * T, dtype=torch.float32) if want_dw else _empty(k))


# ---- the delta rule ------------------------------------------------------------------------


def _chunk_layout(k, cu_seqlens, chunk):
    from lasp.kernels.delta.triton import chunk_layout
    return chunk_layout(k.shape[0], k.shape[1], cu_seqlens, chunk, k.device)


@_custom_op("delta_forward")
def delta_forward(q: Tensor | None, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, h0: Tensor | None,
                  cu_seqlens: Tensor | None, chunk: int, scale: float,
                  operands: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(o or empty, final states, then the backward's a_inv, w, k_end, γ or empty, states, δ)."""
    from lasp.kernels.delta.triton import fused_forward
    o, final, (a_inv, w, k_end, g_end, states, delta) = fused_forward(
        q, k, v, beta, g, h0, _chunk_layout(k, cu_seqlens, chunk), scale, operands)
    return (_empty(k) if o is None else o), final, a_inv, w, k_end, (_empty(k) if g_end is None else g_end), \
        states, delta


@delta_forward.op.register_fake
def _(q, k, v, beta, g, h0, cu_seqlens, chunk, scale, operands):
    B, T, H, K = k.shape
    V, NS = v.shape[-1], _chunk_layout(k, cu_seqlens, chunk).n_slots
    n_docs = document_count(B, cu_seqlens)
    fp32 = dict(dtype=torch.float32)
    g_end = _empty(k) if g is None else k.new_empty(NS, H, K if g.dim() == 4 else 1, **fp32)
    return (_empty(k) if q is None else q.new_empty(B, T, H, V), k.new_empty(n_docs, H, K, V, **fp32),
            k.new_empty(NS, H, chunk, chunk, **fp32), k.new_empty(NS, H, chunk, K, dtype=operands),
            k.new_empty(NS, H, chunk, K, dtype=operands), g_end, k.new_empty(NS, H, K, V, dtype=operands),
            k.new_empty(NS, H, chunk, V, **fp32))


@_custom_op("delta_backward")
def delta_backward(q: Tensor | None, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None,
                   cu_seqlens: Tensor | None, a_inv: Tensor, w: Tensor, k_end: Tensor, g_end: Tensor, states: Tensor,
                   delta: Tensor, do: Tensor | None, d_final: Tensor | None, chunk: int,
                   scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq or empty, dk, dv, dβ, d decay or empty, d initial state)."""
    from lasp.kernels.delta.triton import fused_backward
    saved = (a_inv, w, k_end, None if g is None else g_end, states, delta)
    dq, dk, dv, dbeta, dg, dh0 = fused_backward(q, k, v, beta, g, saved, do, d_final,
                                                _chunk_layout(k, cu_seqlens, chunk), scale)
    return (_empty(k) if dq is None else dq), dk, dv, dbeta, (_empty(k) if dg is None else dg), dh0


@delta_backward.op.register_fake
def _(q, k, v, beta, g, cu_seqlens, a_inv, w, k_end, g_end, states, delta, do, d_final, chunk, scale):
    B, _, H, K = k.shape
    n_docs = document_count(B, cu_seqlens)
    fp32 = dict(dtype=torch.float32)
    return (_empty(k) if q is None else torch.empty_like(k), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(beta, **fp32), _empty(k) if g is None else torch.empty_like(g, **fp32),
            k.new_empty(n_docs, H, K, v.shape[-1], **fp32))


# The forward ops, whose outputs selective activation checkpointing keeps.
FORWARD_OPS = frozenset({torch.ops.lasp.span_forward.default, torch.ops.lasp.delta_forward.default})
