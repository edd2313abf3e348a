"""Triton kernel of the MoM combine: each token's k routed outputs, weighted and summed.

    out_t = Σ_j w_tj · o[dest_tj]              (o: the sorted copies' outputs [P, F])

Forward: one program per (block of tokens, block of features) gathers the k rows, scales
them by the routing weights in fp32 and writes the sum: one read of o, one write of out,
no [P, F] temporaries. Backward: do_sorted[dest_tj] = w_tj · do_t (dest is a permutation:
every sorted row is written exactly once) and dw_tj = <do_t, o[dest_tj]>, summed over
feature blocks from per-block partials (no atomics). The torch formula in
`MoMPlan.combine` is the reference. Launch grids depend on shapes only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lasp.kernels.triton_linear_attention import _new

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
    def forward(ctx, o, weights, dest, out_dtype):
        N, k = weights.shape[0] * weights.shape[1], weights.shape[2]
        F = o.shape[1]
        out = _new((N, F), out_dtype, o.device)
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
        d_o = _new(o.shape, o.dtype, o.device)
        want_dw = ctx.needs_input_grad[1]
        dw_part = _new((grid[1], N * k), torch.float32, o.device) if want_dw else w
        _combine_bwd_kernel[grid](o, w, dest, d_out.contiguous(), d_o, dw_part, N, F, TOPK=k,
                                  BT=BLOCK_TOKENS, BF=BLOCK_FEATURES, WANT_DW=want_dw)
        dw = dw_part.sum(0).view(w.shape).to(ctx.weights_dtype) if want_dw else None
        return d_o, dw, None, None


def triton_mom_combine(o: torch.Tensor, weights: torch.Tensor, dest: torch.Tensor,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """o: [P, F] sorted copies' outputs (bf16/fp16/fp32); weights: [B, T, k]; dest: [B·T·k]
    int64 sorted position of each copy. Returns [B·T, F] in `out_dtype` (default o's)."""
    if o.dtype == torch.float64:
        raise TypeError("the Triton combine takes bf16, fp16 or fp32; use backend='torch' for float64")
    return _TritonCombine.apply(o.contiguous(), weights, dest.contiguous(), out_dtype or o.dtype)
