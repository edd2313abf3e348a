"""The host side of the span-walk Triton families (`lasp.kernels.scalar.triton` for g /
g_gamma, `lasp.kernels.diagonal.triton` for gk): their launches grouped into the phases of
`lasp.kernels.linear_attention_phases`, the autograd function over those phases, and the
two entry points each family exposes.

A family hands over its launches as a `SpanLaunches`; everything else here is the same for
both. This module launches nothing itself and does not import Triton.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lasp.kernels import compiled
from lasp.kernels.common.launch import fuses_dkdv
from lasp.kernels.common.plan import SpanPlan, default_span_chunks, make_span_plan


@dataclass(frozen=True)
class SpanLaunches:
    """One family's launch functions (their contracts; `w` the row weight, `rows` the query
    gather, both None or as in `TritonPhases`):

    - forward_states(k, v, g, h0, plan) -> (every span's incoming state, the spans'
      log-decays or None, each document's final state): summary + scan.
    - forward_output(q, k, v, g, w, rows, states, scale, plan) -> o.
    - backward_dq(q, k, v, g, w, rows, do, states, scale, plan, decay_grad) -> (dq, the
      spans' local state gradients, the row weight's part or None, the decay gradient's
      parts or None).
    - backward_kvg(q, k, v, g, w, rows, do, d_final, d_states, g_span, decay_parts, scale,
      want_dh0, want_dg, plan, fuse_dkdv) -> (dk, dv, dg or None, d initial state or None).
    - default_chunk(K, V) -> tokens per chunk when the caller gives none.
    - family: the family's name ("scalar" or "diagonal"), by which the custom ops
      (`lasp.kernels.compiled`) find these launches again.
    """

    forward_states: Callable
    forward_output: Callable
    backward_dq: Callable
    backward_kvg: Callable
    default_chunk: Callable[[int, int], int]
    family: str


@dataclass(frozen=True)
class TritonPhases:
    """The launches of one call grouped at their data dependencies: summary + scan |
    output | dq | reverse scan + dk/dv (+ the decay's gradient). Holds the launch geometry
    only; tensors are passed in.

    `decay_grad`: the decay requires grad, so the backward computes its chunk-local terms
    (the dq walk then keeps one fp32 K×V state per chunk for the dk walk); a fixed decay
    (g_gamma as a buffer) skips that work. `fuse_dkdv`: one backward launch for dk and dv.

    `saved` = (every span's incoming state, the spans' log-decays): one K×V state per span
    and head; the backward recomputes every chunk state from those. `partial` = (do, the
    spans' local state gradients, the row weight's part, the decay gradient's parts).

    `row_weight` (fp32 [B·T] or None, the same for every phase of a call): the output is
    w_t · o_t. MoM passes its routing weights here, so that the backward applies them in
    fp32 rather than receiving w·do rounded to the dot dtype.

    `rows` (int64 [B·T] or None, the same for every phase of a call): position t's query
    and output gradient are row rows[t] of q and do, which may then have any number of
    rows (MoM: its routed copies read their token's row, no copies are materialised).
    The output and dq are per position and fp32, for the caller to sum and round once.
    """

    launches: SpanLaunches
    plan: SpanPlan
    scale: float
    decay_grad: bool
    fuse_dkdv: bool

    def summarize(self, k, v, g, initial_state):
        states, g_span, final = self.launches.forward_states(k, v, g, initial_state, self.plan)
        return final, (states, g_span)

    def output(self, q, k, v, g, saved, row_weight=None, rows=None):
        return self.launches.forward_output(q, k, v, g, row_weight, rows, saved[0], self.scale, self.plan)

    def grad_q(self, q, k, v, g, saved, do, row_weight=None, rows=None):
        do = do.contiguous()
        dq, d_states, row_part, decay_parts = self.launches.backward_dq(
            q, k, v, g, row_weight, rows, do, saved[0], self.scale, self.plan, self.decay_grad)
        return dq, (do, d_states, row_part, decay_parts)

    def grad_kvg(self, q, k, v, g, saved, partial, d_final, want_dg=True, want_dh0=True,
                 row_weight=None, rows=None):
        """(dk, dv, the decay's gradient or None, d initial_state or None)."""
        do, d_states, _, decay_parts = partial
        d_final = None if d_final is None else d_final.float().contiguous()
        return self.launches.backward_kvg(q, k, v, g, row_weight, rows, do, d_final, d_states, saved[1],
                                          decay_parts, self.scale, want_dh0, want_dg and g is not None, self.plan,
                                          self.fuse_dkdv)

    @staticmethod
    def grad_row_weight(partial, row_weight):
        """d row_weight [B·T]: Σ over heads of <do_t, o_t> (o unweighted), from the dq
        walk's row weight part: q_t·dq_t / w_t, or q_t·dq_t itself where w_t = 0 (walked
        with 1)."""
        q_dq = partial[2].sum((1, 2))
        return torch.where(row_weight != 0, q_dq / row_weight, q_dq)


class TritonLinearAttention(torch.autograd.Function):
    """Differentiable in q, k, v, the decay, the initial state and the row weight, and
    through the final state: the phases run back to back, as the custom ops
    `lasp::span_forward` and `lasp::span_backward` (`lasp.kernels.compiled`: torch.compile
    traces this Function and sees each op as one call). `knobs` = (family, scale, chunk,
    span_chunks, fuse_dkdv)."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, row_weight, cu_seqlens, knobs, output_final_state):
        family, scale, chunk, span_chunks, _ = knobs
        o, final, states, g_span = compiled.span_forward(q, k, v, g, initial_state, row_weight, cu_seqlens,
                                                         family, scale, chunk, span_chunks)
        ctx.save_for_backward(q, k, v, g, row_weight, cu_seqlens, states, g_span)
        ctx.knobs = knobs
        ctx.has_initial_state = initial_state is not None
        ctx.set_materialize_grads(False)
        return o, final if output_final_state else None

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, d_final):
        q, k, v, g, row_weight, cu_seqlens, states, g_span = ctx.saved_tensors
        if do is None:
            do = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
        want_dg, want_dh0, want_dw = (ctx.needs_input_grad[3], ctx.has_initial_state and ctx.needs_input_grad[4],
                                      ctx.needs_input_grad[5])
        dq, dk, dv, dg, dh0, dw = compiled.span_backward(
            q, k, v, g, row_weight, cu_seqlens, states, g_span, do.contiguous(), d_final, *ctx.knobs,
            want_dg and g is not None, want_dh0, want_dw)
        return (dq, dk, dv, dg if want_dg else None, dh0 if want_dh0 else None, dw if want_dw else None,
                None, None, None)


def call_knobs(launches: SpanLaunches, q, k, v, chunk_size=None, span_chunks=None, fuse_dkdv=None):
    """(chunk size, chunks per span, fuse_dkdv) of a call: the tuning knobs given, else the
    family's defaults for these shapes (arguments as in `triton_linear_attention`)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    if chunk_size is None:
        chunk_size = launches.default_chunk(K, V)
    if span_chunks is None:
        span_chunks = default_span_chunks(B * T, H, chunk_size)
    if fuse_dkdv is None:
        fuse_dkdv = fuses_dkdv(launches.family, K, V, q.element_size())
    return chunk_size, span_chunks, bool(fuse_dkdv)


def make_phases(launches: SpanLaunches, k, v, cu_seqlens, scale, chunk_size, span_chunks, decay_grad, fuse_dkdv):
    """The `TritonPhases` of one call: its span plan from the shapes and `cu_seqlens`."""
    return TritonPhases(launches, make_span_plan(k, v, cu_seqlens, chunk_size, span_chunks), float(scale),
                        decay_grad, fuse_dkdv)


def phase_inputs(q, k, v, g, initial_state):
    """The inputs as the phases take them: contiguous, the decay and the state in fp32
    (differentiable conversions)."""
    return (q.contiguous(), k.contiguous(), v.contiguous(), None if g is None else g.float().contiguous(),
            None if initial_state is None else initial_state.float().contiguous())


def triton_phases(launches: SpanLaunches, q, k, v, g, scale, initial_state, cu_seqlens, *, chunk_size=None,
                  span_chunks=None, fuse_dkdv=None):
    """`TritonPhases` of a family for these inputs (arguments as in `triton_linear_attention`),
    and the inputs in the form its phases take (`phase_inputs`)."""
    knobs = call_knobs(launches, q, k, v, chunk_size, span_chunks, fuse_dkdv)
    decay_grad = g is not None and g.requires_grad
    phases = make_phases(launches, k, v, cu_seqlens, scale, knobs[0], knobs[1], decay_grad, knobs[2])
    return phases, phase_inputs(q, k, v, g, initial_state)


def triton_linear_attention(launches: SpanLaunches, q, k, v, g, scale, initial_state, output_final_state,
                            cu_seqlens, *, row_weight=None, chunk_size=None, span_chunks=None, fuse_dkdv=None):
    """Causal chunkwise linear attention on a family's Triton kernels (inputs already
    validated).

    Args:
        q, k: [B,T,H,K]; v: [B,T,H,V]; one dtype (bf16/fp16/fp32); CUDA tensors (or CPU
            under TRITON_INTERPRET=1); K and V in 16..256.
        g: the family's decay (None or [B,T,H] for the scalar family, [B,T,H,K] for the
            per-key one), natural-log, ≤ 0.
        scale: python float multiplying q.
        initial_state: None or [N,H,K,V] (N = B, or len(cu_seqlens) - 1).
        output_final_state: also return the state after each document's last token.
        cu_seqlens: None or int32/int64 device tensor [N+1] of packed offsets (B == 1).
        row_weight: None or [B·T]: returns w_t·o_t, with w's gradient, and its backward
            applies w in fp32 (`TritonPhases`).
        chunk_size, span_chunks: tokens per chunk (power of two ≥ 16; None: the family's
            `default_chunk`) and chunks per span (default from the shapes,
            `default_span_chunks`). fuse_dkdv: one backward launch for dk and dv (default
            when the K×V state gradient fits one program and the inputs are 16-bit,
            `common.launch.fuses_dkdv`).
            Tuning and test knobs.

    Returns (o [B,T,H,V] in q.dtype, final_state [N,H,K,V] float32 or None), differentiable
    in q, k, v, g, initial_state and row_weight.
    """
    if row_weight is not None:
        row_weight = row_weight.float().contiguous()
    knobs = (launches.family, float(scale), *call_knobs(launches, q, k, v, chunk_size, span_chunks, fuse_dkdv))
    return TritonLinearAttention.apply(*phase_inputs(q, k, v, g, initial_state), row_weight, cu_seqlens, knobs,
                                       bool(output_final_state))
