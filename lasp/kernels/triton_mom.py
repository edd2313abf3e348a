"""Triton side of MoM: the combine kernel, and every stream's linear attention with the
combine as one autograd node.

The combine sums each token's k routed outputs with their weights:

    out_t = Σ_j w_tj · o[dest_tj]              (o: the sorted copies' outputs [P, F])

Forward: one program per (block of tokens, block of features) gathers the k rows, scales
them by the routing weights in fp32 and writes the sum: one read of o, one write of out,
no [P, F] temporaries. Backward: do_sorted[dest_tj] = w_tj · do_t (dest is a permutation:
every sorted row is written exactly once) and dw_tj = <do_t, o[dest_tj]>, summed over
feature blocks from per-block partials (no atomics). The torch formula in
`MoMPlan.combine` is the reference. Launch grids depend on shapes only.

`triton_mom_streams` runs the streams on the linear-attention kernels (the scalar family's
for plain, g and g_gamma; the diagonal family's for gk) with the queries and output
gradients read by token index (no copies of them), the routing weights applied in fp32
inside the kernels, and each copy's output and dq kept in fp32 until the combine kernel
sums a token's copies: bf16 rounds once per output and per gradient. Both families run
through the same `lasp.kernels.common.span_phases.TritonPhases`, with `row_weight` / `rows`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lasp.kernels.common import launch
from lasp.kernels.diagonal import triton as diagonal_triton
from lasp.kernels.scalar import triton as scalar_triton

BLOCK_TOKENS = 16
BLOCK_FEATURES = 256


@triton.jit
def _combine_fwd_kernel(o, w, dest, out, N, F, TOPK: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr):
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    offs_f = tl.program_id(1) * BF + tl.arange(0, BF)
    mask_t, mask_f = offs_t < N, offs_f < F
    mask = mask_t[:, None] & mask_f[None, :]
    acc = tl.zeros([BT, BF], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        row = tl.load(dest + offs_t.to(tl.int64) * TOPK + j, mask=mask_t, other=0)
        weight = tl.load(w + offs_t.to(tl.int64) * TOPK + j, mask=mask_t, other=0.0).to(tl.float32)
        x = tl.load(o + row[:, None] * F + offs_f[None, :], mask=mask, other=0.0)
        acc += weight[:, None] * x.to(tl.float32)
    tl.store(out + offs_t.to(tl.int64)[:, None] * F + offs_f[None, :], acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _combine_bwd_kernel(o, w, dest, do, d_o, dw_part, N, F, TOPK: tl.constexpr, BT: tl.constexpr,
                        BF: tl.constexpr, WANT_DW: tl.constexpr):
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    offs_f = tl.program_id(1) * BF + tl.arange(0, BF)
    mask_t, mask_f = offs_t < N, offs_f < F
    mask = mask_t[:, None] & mask_f[None, :]
    b_do = tl.load(do + offs_t.to(tl.int64)[:, None] * F + offs_f[None, :], mask=mask, other=0.0).to(tl.float32)
    for j in tl.static_range(TOPK):
        copy = offs_t.to(tl.int64) * TOPK + j
        row = tl.load(dest + copy, mask=mask_t, other=0)
        weight = tl.load(w + copy, mask=mask_t, other=0.0).to(tl.float32)
        ptrs = row[:, None] * F + offs_f[None, :]
        tl.store(d_o + ptrs, (weight[:, None] * b_do).to(d_o.dtype.element_ty), mask=mask)
        if WANT_DW:
            x = tl.load(o + ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(dw_part + tl.program_id(1).to(tl.int64) * N * TOPK + copy, tl.sum(b_do * x, axis=1),
                     mask=mask_t)


def _grid(N, F):
    return triton.cdiv(N, BLOCK_TOKENS), triton.cdiv(F, BLOCK_FEATURES)


class _TritonCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o, weights, dest):
        N, k = weights.shape[0] * weights.shape[1], weights.shape[2]
        F = o.shape[1]
        out = launch.new_tensor((N, F), o.dtype, o.device)
        w = weights.float().contiguous()
        _combine_fwd_kernel[_grid(N, F)](o, w, dest, out, N, F, TOPK=k, BT=BLOCK_TOKENS, BF=BLOCK_FEATURES)
        ctx.save_for_backward(o, w, dest)
        ctx.weights_dtype = weights.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        o, w, dest = ctx.saved_tensors
        N, k = w.shape[0] * w.shape[1], w.shape[2]
        F = o.shape[1]
        grid = _grid(N, F)
        d_o = launch.new_tensor(o.shape, o.dtype, o.device)
        want_dw = ctx.needs_input_grad[1]
        dw_part = launch.new_tensor((grid[1], N * k), torch.float32, o.device) if want_dw else w
        _combine_bwd_kernel[grid](o, w, dest, d_out.contiguous(), d_o, dw_part, N, F, TOPK=k,
                                  BT=BLOCK_TOKENS, BF=BLOCK_FEATURES, WANT_DW=want_dw)
        dw = dw_part.sum(0).view(w.shape).to(ctx.weights_dtype) if want_dw else None
        return d_o, dw, None


def triton_mom_combine(o: torch.Tensor, weights: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """o: [P, F] sorted copies' outputs (bf16/fp16/fp32); weights: [B, T, k]; dest: [B·T·k]
    int64 sorted position of each copy. Returns [B·T, F] in o's dtype."""
    if o.dtype == torch.float64:
        raise TypeError("the Triton combine takes bf16, fp16 or fp32; use backend='torch' for float64")
    return _TritonCombine.apply(o.contiguous(), weights, dest.contiguous())


def sum_copies(x, dest, top_k, out_dtype):
    """[P, F] per sorted copy -> [P / k, F]: each token's k copies summed in fp32, then
    rounded once to `out_dtype` (the combine kernel with unit weights)."""
    N, F = x.shape[0] // top_k, x.shape[1]
    out = launch.new_tensor((N, F), out_dtype, x.device)
    ones = torch.ones(N * top_k, device=x.device)
    _combine_fwd_kernel[_grid(N, F)](x, ones, dest, out, N, F, TOPK=top_k, BT=BLOCK_TOKENS, BF=BLOCK_FEATURES)
    return out


class _TritonMoMStreams(torch.autograd.Function):
    """Every stream's linear attention and the sum of each token's copies, one node."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, copy_weights, rows, dest, phases, output_final_state, top_k):
        final, saved = phases.summarize(k, v, g, initial_state)
        o = phases.output(q, k, v, g, saved, copy_weights, rows)            # [1, P, H, V] fp32
        out = sum_copies(o.view(o.shape[1], -1), dest, top_k, q.dtype).view(*q.shape[:3], v.shape[-1])
        ctx.save_for_backward(q, k, v, g, initial_state, copy_weights, rows, dest, *saved)
        ctx.phases, ctx.top_k = phases, top_k
        ctx.set_materialize_grads(False)
        return out, final if output_final_state else None

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_final):
        q, k, v, g, initial_state, w, rows, dest, *saved = ctx.saved_tensors
        phases = ctx.phases
        if d_out is None:
            d_out = q.new_zeros(*q.shape[:3], v.shape[-1])
        dq, partial = phases.grad_q(q, k, v, g, saved, d_out, w, rows)     # per copy, fp32
        dk, dv, dg, dh0 = phases.grad_kvg(
            q, k, v, g, saved, partial, d_final, want_dg=ctx.needs_input_grad[3],
            want_dh0=initial_state is not None and ctx.needs_input_grad[4], row_weight=w, rows=rows)
        dw = phases.grad_row_weight(partial, w) if ctx.needs_input_grad[5] else None
        dq = sum_copies(dq.view(dq.shape[1], -1), dest, ctx.top_k, q.dtype).view(q.shape)
        return dq, dk, dv, dg, dh0, dw, None, None, None, None, None


def stream_phases(q, k, v, g, scale, initial_state, cu_seqlens):
    """The Triton phases of MoM's streams and their inputs: the scalar family's
    `triton_phases` for g [1, P, H] (or None), the diagonal family's for a per-key g
    [1, P, H, K] (arguments as theirs)."""
    family = diagonal_triton if g is not None and g.dim() == 4 else scalar_triton
    return family.triton_phases(q, k, v, g, scale, initial_state, cu_seqlens)


def triton_mom_streams(q, k, v, g, scale, initial_state, output_final_state, copy_weights, plan):
    """MoM's streams on the Triton kernels, combined: returns (out [B, T, H, V] in q's
    dtype, final states [M·R, H, K, V] or None).

    q: [B, T, H, K] per token; k, v: [B·T·k, H, K|V] the routed copies in the plan's sorted
    order (one dtype with q); g: None, [1, B·T·k, H] (scalar) or [1, B·T·k, H, K] (per
    key) fp32 log-decay per copy; copy_weights: [B·T·k] the routing weight of each sorted
    copy; plan: the `MoMPlan`. Differentiable in q, k, v, g, initial_state and copy_weights.
    """
    q_tokens = q.reshape(1, plan.num_tokens, *q.shape[2:])
    phases, (q_tokens, k, v, g, h0) = stream_phases(q_tokens, k[None], v[None], g, scale, initial_state,
                                                    plan.cu_seqlens)
    rows = plan.src // plan.top_k
    out, final = _TritonMoMStreams.apply(q_tokens, k, v, g, h0, copy_weights.float().contiguous(), rows,
                                         plan.dest, phases, output_final_state, plan.top_k)
    return out.view(*q.shape[:3], -1), final
