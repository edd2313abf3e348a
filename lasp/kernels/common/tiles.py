"""`@triton.jit` helpers shared by the families' span kernels (inlined where called).

Tensors are token-major: a [tokens, H, D] tensor (the flattened B·T axis) holds token t,
head h at row t·H + h. States are fp32 [*, H, K, V].
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def span_range(span_bounds, s, T, SPAN_TOKENS, SPANS_PER_ROW, VARLEN: tl.constexpr):
    """Token range [start, end) of span `s` on the flattened B·T token axis.

    Packed input reads it from `span_bounds` (int64 [NS, 2], `SpanPlan`; surplus spans
    are empty); otherwise span s is the (s % SPANS_PER_ROW)-th of row s // SPANS_PER_ROW.
    """
    if VARLEN:
        start = tl.load(span_bounds + 2 * s)
        end = tl.load(span_bounds + 2 * s + 1)
    else:
        row = (s // SPANS_PER_ROW).to(tl.int64)
        start = row * T + (s % SPANS_PER_ROW).to(tl.int64) * SPAN_TOKENS
        end = tl.minimum(start + SPAN_TOKENS, (row + 1) * T)
    return start, end


@triton.jit
def load_tile(ptr, offs_t, mask_t, h, offs_d, D: tl.constexpr, H: tl.constexpr):
    """[C, BD] tile of a [tokens, H, D] tensor, zero outside the chunk and beyond D."""
    ptrs = ptr + (offs_t[:, None] * H + h) * D + offs_d[None, :]
    return tl.load(ptrs, mask=mask_t[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def store_tile(ptr, value, offs_t, mask_t, h, offs_d, D: tl.constexpr, H: tl.constexpr):
    """Store a [C, BD] tile into a [tokens, H, D] tensor (cast to its dtype), masked as `load_tile`."""
    ptrs = ptr + (offs_t[:, None] * H + h) * D + offs_d[None, :]
    tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=mask_t[:, None] & (offs_d < D)[None, :])


@triton.jit
def query_rows(query_index, offs_t, mask_t, GATHER: tl.constexpr):
    """Rows of q and do that positions `offs_t` read: query_index[t] when GATHER, else t."""
    if GATHER:
        return tl.load(query_index + offs_t, mask=mask_t, other=0)
    return offs_t


@triton.jit
def state_ptrs(ptr, s, h, offs_k, offs_v, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """Pointers and mask of a [BK, BV] tile of state `s` in a [*, H, K, V] fp32 buffer."""
    base = (s.to(tl.int64) * H + h) * K
    ptrs = ptr + (base + offs_k[:, None]) * V + offs_v[None, :]
    return ptrs, (offs_k < K)[:, None] & (offs_v < V)[None, :]


@triton.jit
def load_tile_t(ptr, offs_t, mask_t, h, offs_d, D: tl.constexpr, H: tl.constexpr):
    """`load_tile`'s transpose, [BD, C], read in that layout: a tile that is scaled per
    token and then multiplied from the left (`decayed_outer_acc`) would otherwise be
    transposed in registers, which costs the decayed walks their spills (sm_90)."""
    ptrs = ptr + (offs_t[None, :] * H + h) * D + offs_d[:, None]
    return tl.load(ptrs, mask=mask_t[None, :] & (offs_d < D)[:, None], other=0.0)


# Per-key decays (gk, KDA) may take a chunk's pair products factored, (a ⊙ e^Γ)(b ⊙ e^{−Γ})ᵀ
# in one tensor-core product, where every key decays by less than e^-FACTORED_LOG_DECAY over
# the chunk: the factors e^{±Γ} then stay below e^60, finite in fp32, TF32 and bf16 (which
# reach 3e38); fp16 factors take a smaller bound (`lasp.kernels.diagonal.triton`).
FACTORED_LOG_DECAY = 60.0


@triton.jit
def factored(log_decay, BOUND: tl.constexpr):
    """Whether the chunk's log-decays `log_decay` ([n], ≤ 0: each key's total over the chunk,
    or each row's smallest Γ) all stay above −BOUND, so that the factored products are
    finite; chosen per program on the device."""
    return tl.min(log_decay, axis=0) > -BOUND


@triton.jit
def decayed_outer_acc(a_t, weight, b, acc, EXACT: tl.constexpr):
    """acc + (a_t ⊙ weight) b for a_t = aᵀ [BD, C] (`load_tile_t`) and one weight per token
    ([C], a_t's columns); `a_t ⊙ weight` is rounded to b's dtype for the dot. EXACT adds its
    rounding residual in a second dot, so that `weight` enters as if in fp32 (the scalar
    family's row weights)."""
    scaled = a_t.to(tl.float32) * weight[None, :]
    rounded = scaled.to(b.dtype)
    acc = tl.dot(rounded, b, acc)
    if EXACT:
        acc = tl.dot((scaled - rounded.to(tl.float32)).to(b.dtype), b, acc)
    return acc
