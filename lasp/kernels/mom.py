"""Mixture-of-Memories (MoM): routed linear-attention memories, single device.

A router scores each token against M memories (softmax in fp32), keeps the top k and
renormalises their weights. Memory m has its own keys, values (and decay) and its own
linear-attention state; its recurrence runs only over the tokens routed to it, in
sequence order. Each token's output is the routing-weighted sum of its k memories'
outputs (the queries are shared)::

    o_t = Σ_j w_tj · LinearAttention_{m_tj}(q, k_m, v_m; tokens routed to m_tj up to t)_t

How it runs, with no host synchronisation and no loop over memories:

1. `mom_dispatch` sorts the B·T·k routed copies by (memory, row, position) with a
   counting sort (cumulative sums of the routing mask: stable, fixed shapes) and gives
   device-side offsets of the M·R *streams* (R rows: batch rows, or packed documents).
   Streams are memory-major: stream m·R + r is memory m on row r.
2. The copies' keys, values and decays are gathered into that order (`MoMPlan.select`,
   or `mom_projection`, which projects only the routed copies with a grouped matmul
   where torch has a sync-free one).
3. ONE varlen linear-attention call runs every stream (B = 1, `cu_seqlens` = the stream
   offsets); a fixed `g_gamma` decays once per routed token of the memory.
4. Each token's k outputs are gathered back and summed with the routing weights.

On the Triton backend steps 3 and 4 are one autograd node (`triton_mom_streams`): the
kernels read each copy's query and output gradient from its token's row, weight the
outputs in fp32 and keep them fp32 until the sum. The torch backend materialises the
query copies (`MoMPlan.copies`) and combines with `MoMPlan.combine`.

Every step is differentiable (router weights included). `mom_reference` is the oracle:
a Python loop over memories and sequences on the naive recurrence, any dtype.
`mom_state_output` is how incoming per-memory states enter the routed tokens (used by
sequence parallelism), and `load_balancing_loss` is the Switch-style auxiliary loss.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lasp.kernels.checks import FLOAT_DTYPES, check_cu_seqlens, check_tensor, check_value
from lasp.kernels.linear_attention import linear_attention
from lasp.kernels.reference import accumulation_dtype, naive_linear_attention


# --------------------------------------------------------------------------------------
# Routing and dispatch
# --------------------------------------------------------------------------------------


def mom_route(router_logits: torch.Tensor, top_k: int):
    """Softmax router with renormalised top-k: returns (weights, indices, probs).

    router_logits: [B, T, M]. The softmax runs in fp32 (fp64 for fp64 logits).
    Returns weights [B, T, k] (renormalised over the chosen memories, fp32/fp64),
    indices [B, T, k] int64 (distinct memories per token), probs [B, T, M] (the full
    softmax, for the auxiliary loss). Differentiable in the logits.
    """
    check_tensor("router_logits", router_logits, 3)
    if not router_logits.is_floating_point():
        raise TypeError(f"router_logits must be floating, got {router_logits.dtype}")
    M = router_logits.shape[-1]
    if not isinstance(top_k, int) or not 1 <= top_k <= M:
        raise ValueError(f"top_k must be an int in [1, {M}] (the number of memories), got {top_k!r}")
    probs = router_logits.to(torch.promote_types(router_logits.dtype, torch.float32)).softmax(-1)
    top, indices = probs.topk(top_k, dim=-1)
    return top / top.sum(-1, keepdim=True), indices, probs


class _Rows(torch.autograd.Function):
    """y = x[index] along dim 0, with the adjoint given as a function of the gradient.

    The dispatch gathers are permutations (adjoint: the inverse gather) or k-fold copies
    (adjoint: gather and sum the k copies): gathers both ways, no atomics, deterministic.
    """

    @staticmethod
    def forward(ctx, x, index, adjoint):
        ctx.adjoint = adjoint
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        return ctx.adjoint(grad.contiguous()), None, None


@dataclass(frozen=True)
class MoMPlan:
    """Where each routed copy goes: the counting sort of one routing decision.

    Copy c = (b·T + t)·k + j is token (b, t)'s j-th choice. `dest[c]` is its position in
    the sorted order, `src` the inverse permutation. `cu_seqlens` [M·R + 1] (int64,
    device) are the offsets of the M·R streams in the sorted order, memory-major.
    """

    indices: torch.Tensor       # [B, T, k] int64
    num_memories: int
    num_rows: int               # R: batch rows, or packed sequences
    dest: torch.Tensor          # [B·T·k] int64: copy -> sorted position
    src: torch.Tensor           # [B·T·k] int64: sorted position -> copy
    cu_seqlens: torch.Tensor    # [M·R + 1] int64

    @property
    def top_k(self) -> int:
        return self.indices.shape[-1]

    @property
    def num_tokens(self) -> int:
        return self.indices.shape[0] * self.indices.shape[1]

    @property
    def num_copies(self) -> int:
        return self.dest.numel()

    @property
    def memory_ends(self) -> torch.Tensor:
        """int32 [M]: end of each memory's block of copies in the sorted order."""
        return self.cu_seqlens[self.num_rows::self.num_rows].to(torch.int32)

    def _token_shape(self, name, x, extra_dims):
        B, T, _ = self.indices.shape
        if not isinstance(x, torch.Tensor) or x.dim() < 2 + extra_dims or tuple(x.shape[:2]) != (B, T):
            shape = None if not isinstance(x, torch.Tensor) else tuple(x.shape)
            raise ValueError(f"{name} must be [B, T, ...] with B, T = {(B, T)}, got shape {shape}")

    def copies(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] per token -> [B·T·k, ...]: each token's row once per routed copy, sorted."""
        self._token_shape("x", x, 0)
        k, N = self.top_k, self.num_tokens
        dest = self.dest

        def adjoint(grad):
            acc = accumulation_dtype(grad.dtype)
            return grad.index_select(0, dest).view(N, k, *grad.shape[1:]).sum(1, dtype=acc).to(grad.dtype)
        return _Rows.apply(x.reshape(N, *x.shape[2:]), self.src // k, adjoint)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, M, ...] per token and memory -> [B·T·k, ...]: each copy's own memory's row, sorted."""
        self._token_shape("x", x, 1)
        M, N = self.num_memories, self.num_tokens
        if x.shape[2] != M:
            raise ValueError(f"x must hold all {M} memories on dim 2, got shape {tuple(x.shape)}")
        rows = (self.src // self.top_k) * M + self.indices.reshape(-1).index_select(0, self.src)
        rest = x.shape[3:]

        def adjoint(grad):
            out = grad.new_zeros(N * M, *rest)
            return out.index_copy_(0, rows, grad)
        return _Rows.apply(x.reshape(N * M, *rest), rows, adjoint)

    def combine(self, o: torch.Tensor, weights: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """Sorted copies' outputs [B·T·k, H, V] -> [B, T, H, V]: Σ_j w_tj · o_{copy (t, j)}.

        fp32 accumulation, the result in o's dtype. backend "triton" fuses the gather, the
        weighting and the sum (and their backward) in one kernel each.
        """
        B, T, k = self.indices.shape
        if o.dim() < 2 or o.shape[0] != self.num_copies:
            raise ValueError(f"o must hold the {self.num_copies} sorted copies on dim 0, got {tuple(o.shape)}")
        if tuple(weights.shape) != (B, T, k):
            raise ValueError(f"weights must be [B, T, k] = {(B, T, k)}, got {tuple(weights.shape)}")
        if _pick_backend(backend, o) == "triton":
            from lasp.kernels.triton_mom import triton_mom_combine
            out = triton_mom_combine(o.reshape(o.shape[0], -1), weights, self.dest)
            return out.view(B, T, *o.shape[1:])
        src = self.src
        per_copy = _Rows.apply(o, self.dest, lambda grad: grad.index_select(0, src))
        acc = accumulation_dtype(o.dtype)
        per_copy = per_copy.view(B, T, k, *o.shape[1:]).to(acc)
        w = weights.to(acc).reshape(B, T, k, *([1] * (o.dim() - 1)))
        return (per_copy * w).sum(2).to(o.dtype)


def mom_dispatch(indices: torch.Tensor, num_memories: int, cu_seqlens: torch.Tensor | None = None, *,
                 segment_len: int | None = None) -> MoMPlan:
    """The counting sort of routed copies by (memory, row, position); no host sync.

    indices: [B, T, k] int64 memory of each token's j-th choice (distinct per token, e.g.
    from `mom_route`). The rows are the batch rows, or with `cu_seqlens` the packed
    sequences (B = 1; empty sequences are allowed), or with `segment_len` the pieces of
    that many tokens of each batch row (the local segments of sequence parallelism).
    Each (memory, row) pair is one stream.
    """
    check_tensor("indices", indices, 3)
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64 memory indices, got {indices.dtype}")
    if not isinstance(num_memories, int) or num_memories < 1:
        raise ValueError(f"num_memories must be a positive int, got {num_memories!r}")
    B, T, k = indices.shape
    if k > num_memories:
        raise ValueError(f"indices choose k={k} memories per token, more than num_memories={num_memories}")
    check_value((indices >= 0) & (indices < num_memories), f"indices must lie in [0, {num_memories})")
    M, N, dev = num_memories, B * T, indices.device
    if segment_len is not None and (cu_seqlens is not None or segment_len < 1 or T % segment_len):
        raise ValueError(f"segment_len must be a positive divisor of T={T} and excludes cu_seqlens, "
                         f"got {segment_len}")
    if cu_seqlens is None:
        step = T if segment_len is None else segment_len
        bounds = torch.arange(N // step + 1 if step else B + 1, device=dev) * step
    else:
        check_cu_seqlens(cu_seqlens, indices[..., None])
        bounds = cu_seqlens.to(torch.int64)
    R = bounds.numel() - 1
    flat = indices.reshape(N, k)
    routed = torch.zeros(M, N, dtype=torch.int64, device=dev).scatter_(0, flat.T, 1)
    seen = F.pad(routed.cumsum(1), (1, 0))                      # [M, N+1]: copies before token t
    counts = seen[:, bounds[1:]] - seen[:, bounds[:-1]]          # [M, R]
    cu = F.pad(counts.flatten().cumsum(0), (1, 0))               # [M·R + 1]
    tokens = torch.arange(N, device=dev)
    row = torch.searchsorted(bounds[1:], tokens, right=True).clamp_(max=R - 1)
    # Within its stream a copy comes after the copies of earlier tokens of its row.
    rank = seen[:, :-1] - seen[:, bounds[row]]                   # [M, N]
    stream = flat * R + row[:, None]                             # [N, k]
    dest = (cu[stream] + rank[flat, tokens[:, None]]).flatten()
    src = torch.empty_like(dest).scatter_(0, dest, torch.arange(dest.numel(), device=dev))
    return MoMPlan(indices, M, R, dest, src, cu)


# --------------------------------------------------------------------------------------
# Projections of the routed copies
# --------------------------------------------------------------------------------------


def _grouped_mm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch's grouped matmul is sync-free only in its native CUDA kernels (bf16 on
    sm90/sm100, rows 16-byte aligned); elsewhere it falls back to a loop that reads the
    offsets on the host."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x.device)[0] in (9, 10)
            and x.shape[-1] % 8 == 0 and weight.shape[1] % 8 == 0)


class _GroupedProjection(torch.autograd.Function):
    """y_p = x_p @ W_{m(p)}ᵀ for sorted copies grouped by memory (`torch._grouped_mm`)."""

    @staticmethod
    def forward(ctx, x, weight, ends):
        ctx.save_for_backward(x, weight, ends)
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=ends)

    @staticmethod
    def backward(ctx, dy):
        x, weight, ends = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch._grouped_mm(dy, weight, offs=ends)
        dw = torch._grouped_mm(dy.t(), x, offs=ends)
        # A memory with no copies contracts over nothing: make its gradient exactly zero.
        sizes = torch.diff(ends, prepend=ends.new_zeros(1))
        return dx, torch.where(sizes[:, None, None] > 0, dw, torch.zeros_like(dw)), None


def mom_projection(x: torch.Tensor, weight, plan: MoMPlan, *, grouped: bool | None = None):
    """Each routed copy's projection by its memory's weight, in the plan's sorted order.

    x: [B, T, in]; weight: [M, out, in] (one nn.Linear weight per memory), or a tuple of
    such weights (e.g. keys and values: the copies of x are gathered once for all).
    Returns [B·T·k, out] (a tuple for a tuple). `grouped` (default: where it is
    sync-free, see `_grouped_mm_ok`) projects only the k routed copies of each token with
    one grouped matmul per weight; otherwise every memory's projection of every token is
    computed (M/k times the FLOPs) and each copy's row selected.
    """
    plan._token_shape("x", x, 1)
    weights = tuple(weight) if isinstance(weight, (tuple, list)) else (weight,)
    for w in weights:
        check_tensor("weight", w, 3)
        if w.shape[0] != plan.num_memories or w.shape[2] != x.shape[-1]:
            raise ValueError(f"weight must be [M, out, in] with M={plan.num_memories}, in={x.shape[-1]}, "
                             f"got {tuple(w.shape)}")
    if grouped is None:
        grouped = all(_grouped_mm_ok(x, w) for w in weights)
    if grouped:
        copies = plan.copies(x).contiguous()
        out = tuple(_GroupedProjection.apply(copies, w.to(x.dtype), plan.memory_ends) for w in weights)
    else:
        out = tuple(plan.select(torch.einsum("bti,moi->btmo", x, w.to(x.dtype))) for w in weights)
    return out if isinstance(weight, (tuple, list)) else out[0]


# --------------------------------------------------------------------------------------
# The MoM op
# --------------------------------------------------------------------------------------


def _pick_backend(backend, x) -> str:
    if backend is None:
        return "triton" if x.is_cuda else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton', 'torch' or None, got {backend!r}")
    if backend == "triton" and not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    return backend


def _check_memory_decay(g, g_gamma, plan: MoMPlan, H: int, device) -> None:
    B, T, _ = plan.indices.shape
    if g is not None and g_gamma is not None:
        raise ValueError("pass at most one of g (data-dependent decay) and g_gamma (fixed decay)")
    for name, x, shape in (("g", g, (B, T, plan.num_memories, H)), ("g_gamma", g_gamma, (H,))):
        if x is None:
            continue
        check_tensor(name, x, len(shape))
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
        if not x.is_floating_point() or x.device != device:
            raise TypeError(f"{name} must be a floating tensor of natural-log decays on {device}")
        check_value(x <= 0, f"{name} holds log-decays and must be <= 0 everywhere")


def check_weights(weights, plan: MoMPlan) -> None:
    """Routing weights: floating [B, T, k] matching the plan's choices."""
    check_tensor("weights", weights, 3)
    if tuple(weights.shape) != tuple(plan.indices.shape):
        raise ValueError(f"weights must be [B, T, k] = {tuple(plan.indices.shape)}, got {tuple(weights.shape)}")
    if not weights.is_floating_point():
        raise TypeError(f"weights must be floating routing weights, got {weights.dtype}")


def _sorted(name, x, plan: MoMPlan, H: int):
    """k or v as sorted copies [B·T·k, H, D]: given all memories [B, T, M, H, D], or already sorted."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 5:
        return plan.select(x)
    if x.dim() == 3 and x.shape[0] == plan.num_copies and x.shape[1] == H:
        return x
    raise ValueError(f"{name} must be [B, T, M, H, D] (every memory) or [B·T·k, H, D] = "
                     f"[{plan.num_copies}, {H}, D] (routed copies in the plan's order), got {tuple(x.shape)}")


def mixture_of_memories(q, k, v, weights, plan: MoMPlan, g=None, g_gamma=None, *, scale=None,
                        initial_state=None, output_final_state=False, backend=None):
    """MoM linear attention of the routed memories; returns `(o, final_state)`.

    Args:
        q: [B, T, H, K] queries, shared by the memories.
        k, v: each memory's keys/values for every token, [B, T, M, H, K|V], or only the
            routed copies in the plan's sorted order, [B·T·k, H, K|V] (`mom_projection`).
        weights: [B, T, k] routing weights of the plan's choices (`mom_route`).
        plan: `mom_dispatch` of the routing indices (its rows are the sequences).
        g: [B, T, M, H] per-memory data-dependent log-decay (≤ 0), applied on the tokens
            routed to that memory; or g_gamma: [H] fixed log-decay per routed token.
        initial_state: [M, R, H, K, V] state of each memory entering each sequence (fp32).
        output_final_state: also return each memory's state after each sequence,
            [M, R, H, K, V]; a memory that gets no token passes its state through.
        backend: "triton" | "torch" | None, as in `linear_attention` (also picks the combine).
    Returns o: [B, T, H, V] in q's dtype, final_state or None.
    """
    check_tensor("q", q, 4)
    B, T, H, K = q.shape
    if not isinstance(plan, MoMPlan):
        raise TypeError(f"plan must be a MoMPlan (from mom_dispatch), got {type(plan).__name__}")
    if tuple(plan.indices.shape[:2]) != (B, T):
        raise ValueError(f"plan routes {tuple(plan.indices.shape[:2])} tokens, but q is [B, T]={(B, T)}")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be bf16, fp16, fp32 or fp64, got {q.dtype}")
    ks, vs = _sorted("k", k, plan, H), _sorted("v", v, plan, H)
    if ks.shape[-1] != K:
        raise ValueError(f"k must have q's head dim K={K}, got {ks.shape[-1]}")
    if not (ks.dtype == vs.dtype == q.dtype) or not (ks.device == vs.device == q.device):
        raise TypeError(f"q, k, v must share one dtype and device, got {q.dtype}, {ks.dtype}, {vs.dtype}")
    check_weights(weights, plan)
    _check_memory_decay(g, g_gamma, plan, H, q.device)
    M, R = plan.num_memories, plan.num_rows
    V = vs.shape[-1]
    if initial_state is not None:
        check_tensor("initial_state", initial_state, 5)
        if tuple(initial_state.shape) != (M, R, H, K, V):
            raise ValueError(f"initial_state must be [M, R, H, K, V]={(M, R, H, K, V)}, "
                             f"got {tuple(initial_state.shape)}")
        initial_state = initial_state.reshape(M * R, H, K, V)
    gs = None if g is None else plan.select(g)[None]
    backend = _pick_backend(backend, q)
    if backend == "triton":
        out, final = _triton_streams(q, ks, vs, gs, g_gamma, weights, scale, initial_state,
                                     output_final_state, plan)
    else:
        o, final = linear_attention(plan.copies(q)[None], ks[None], vs[None], gs, g_gamma, scale=scale,
                                    initial_state=initial_state, output_final_state=output_final_state,
                                    cu_seqlens=plan.cu_seqlens, backend=backend)
        out = plan.combine(o[0], weights, backend)
    return out, None if final is None else final.view(M, R, *final.shape[1:])


def _triton_streams(q, ks, vs, gs, g_gamma, weights, scale, initial_state, output_final_state,
                    plan: MoMPlan):
    """Every stream's linear attention in one Triton varlen call, combined
    (`triton_mom_streams`: bf16 rounds once, in the sum of a token's copies)."""
    from lasp.kernels.linear_attention import _check_triton_head_dims
    from lasp.kernels.triton_mom import triton_mom_streams

    _check_triton_head_dims(ks, vs)
    P, H, K = ks.shape
    if g_gamma is not None:
        gs = g_gamma.float()[None, None, :].expand(1, P, H)
    copy_weights = weights.reshape(-1).index_select(0, plan.src)
    return triton_mom_streams(
        q, ks, vs, None if gs is None else gs.float().contiguous(), float(K ** -0.5 if scale is None else scale),
        None if initial_state is None else initial_state.float(), output_final_state, copy_weights, plan)


def routed_log_decay(indices, num_memories: int, g=None, g_gamma=None, dtype=torch.float32):
    """Per-token, per-memory log-decay [B, T, M, H]: the memory's decay where the token is
    routed to it, 0 (no decay) elsewhere; None for plain attention.

    Its cumulative sum over a row is the decay a memory's state accumulates along the
    row: only routed tokens advance a memory's recurrence.
    """
    if g is None and g_gamma is None:
        return None
    B, T, _ = indices.shape
    routed = torch.zeros(B, T, num_memories, dtype=dtype, device=indices.device).scatter_(-1, indices, 1.0)
    decay = g.to(dtype) if g is not None else g_gamma.to(dtype)[None, None, None, :]
    return decay * routed[..., None]


def mom_state_output(q, state, weights, indices, g=None, g_gamma=None, *, scale=None, reach=None):
    """What incoming memory states add to each token's MoM output (the inter-segment part).

    o_t += Σ_j w_tj · scale · exp(Γ_{t, m_tj}) · q_tᵀ S_{m_tj}, where Γ_{t,m} is memory m's
    cumulative log-decay over the row's tokens routed to it, through t.

    Args:
        q: [B, T, H, K]; state: [B, M, H, K, V] each memory's state entering each row;
        weights, indices: [B, T, k] routing; g: [B, T, M, H] or g_gamma: [H] (as in
        `mixture_of_memories`); reach: optional int [B]: the states reach only tokens
        t < reach[b] (the row's first packed document). Device tensors, no sync.
    Returns [B, T, H, V] in q's dtype; differentiable in q, state, weights and g.
    """
    B, T, H, K = q.shape
    M = state.shape[1]
    if scale is None:
        scale = K ** -0.5
    acc = accumulation_dtype(q.dtype)
    mm = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else acc
    # coefficient of memory m at token t: scale · w_tm · exp(Γ_tm) (0 where not routed)
    coef = torch.zeros(B, T, M, dtype=acc, device=q.device).scatter(-1, indices, weights.to(acc)) * scale
    coef = coef[..., None].expand(B, T, M, H)
    decay = routed_log_decay(indices, M, g, g_gamma, torch.float64)
    if decay is not None:
        # float64 cumsum: over long rows a float32 running sum loses the small differences.
        coef = coef * decay.cumsum(1).exp().to(acc)
    if reach is not None:
        inside = torch.arange(T, device=q.device)[None, :] < reach.to(q.device)[:, None]
        coef = coef * inside[:, :, None, None]
    per_memory = torch.einsum("bthk,bmhkv->btmhv", q.to(mm), state.to(mm))
    return torch.einsum("btmhv,btmh->bthv", per_memory.to(acc), coef).to(q.dtype)


# --------------------------------------------------------------------------------------
# Auxiliary loss and the oracle
# --------------------------------------------------------------------------------------


def routing_counts(indices: torch.Tensor, num_memories: int) -> torch.Tensor:
    """Routed copies per memory, float64 [M]: a scatter of ones (torch's bin count sizes
    its output by the largest value, a host sync on CUDA)."""
    flat = indices.reshape(-1)
    return torch.zeros(num_memories, dtype=torch.float64, device=indices.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.float64))


def load_balancing_loss(probs, indices, *, counts=None, num_tokens=None):
    """Switch-style load-balancing loss M · Σ_m f_m · P_m.

    f_m = fraction of routed copies sent to memory m (no gradient), P_m = mean router
    probability of m. probs: [B, T, M] (`mom_route`), indices: [B, T, k].
    counts ([M]) and num_tokens default to this call's tokens. Pass the totals of a
    whole sequence split across ranks to get this shard's share of the whole sequence's
    loss (the shares sum to it: `lasp.parallel.mom.lasp2_load_balancing_loss`).
    """
    M, k = probs.shape[-1], indices.shape[-1]
    if counts is None:
        counts = routing_counts(indices, M)
    if num_tokens is None:
        num_tokens = probs.shape[0] * probs.shape[1]
    fraction = (counts / (num_tokens * k)).to(probs.dtype).detach()
    return M * (fraction * probs.sum((0, 1)) / num_tokens).sum()


def _rows(B, T, cu_seqlens):
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    bounds = cu_seqlens.tolist()
    return [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:])]


def mom_reference(q, k, v, weights, indices, g=None, g_gamma=None, *, scale=None, initial_state=None,
                  output_final_state=False, cu_seqlens=None):
    """The oracle: a loop over memories and sequences on `naive_linear_attention`.

    Same arguments as `mixture_of_memories`, with k, v: [B, T, M, H, K|V] (every memory)
    and the routing as (weights, indices, cu_seqlens) instead of a plan. Any dtype.
    """
    B, T, H, K = q.shape
    M, V = k.shape[2], v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    acc = accumulation_dtype(q.dtype)
    out = torch.zeros(B, T, H, V, dtype=acc, device=q.device)
    rows = _rows(B, T, cu_seqlens)
    finals = []
    for m in range(M):
        chosen = indices == m                                      # [B, T, k]
        weight = (weights * chosen).sum(-1).to(acc)                # [B, T]
        for n, (b, start, end) in enumerate(rows):
            pos = start + chosen[b, start:end].any(-1).nonzero()[:, 0]
            gate = None
            if g is not None:
                gate = g[b, pos, m][None]
            elif g_gamma is not None:
                gate = g_gamma[None, None, :].expand(1, pos.numel(), H)
            h0 = None if initial_state is None else initial_state[m, n][None]
            o, state = naive_linear_attention(q[b, pos][None], k[b, pos, m][None], v[b, pos, m][None], gate,
                                              scale=scale, initial_state=h0, output_final_state=True)
            out = out.index_put((torch.full_like(pos, b), pos), weight[b, pos, None, None] * o[0].to(acc),
                                accumulate=True)
            finals.append(state[0])
    final = torch.stack(finals).view(M, len(rows), H, K, V) if output_final_state else None
    return out.to(q.dtype), final
