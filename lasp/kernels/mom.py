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
a Python loop over memories and documents on the naive recurrence, any dtype.
`mom_state_output` is how incoming per-memory states enter the routed tokens (used by
sequence parallelism; it saves only its inputs), `mom_phases` splits the op into the
phases of `lasp.kernels.linear_attention_phases` (the routing weights an extra input) so
that LASP-2 overlaps MoM's exchange like linear attention's, and `load_balancing_loss` is
the Switch-style auxiliary loss. Decays: per-memory `g`, fixed `g_gamma`, or per-key `gk`
(both backends; on Triton the diagonal family's kernels with the same query gather and
row weights).

The delta rule (`beta` [B, T, M, H], the write strength of each memory per token): each
memory is a (gated) delta-rule state updated only by the tokens routed to it, as the
MoM paper's Gated DeltaNet memories, `S ← A_t(S) + β k (v − kᵀ A_t(S))ᵀ` with the
memory's own k, v, β and decay (none, g, g_gamma or gk). Its streams run on the delta
family (`lasp.kernels.delta`, torch or Triton) with the query copies materialised, and
its transitions are dense: for sequence parallelism `mom_affine_phases` runs every
stream as an affine map of its unknown incoming state (the delta family's affine run:
each stream's summary (U, M) and its copies' o0 and x) and `mom_dense_state_output` adds
the incoming states' part once they are known (`lasp.parallel.mom`), as LASP-2 does for
the delta rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from lasp.kernels.checks import FLOAT_DTYPES, check_cu_seqlens, check_finite, check_log_decays, check_tensor, check_value
from lasp.kernels.common.documents import accumulation_dtype, documents, matmul_dtype
from lasp.kernels.linear_attention import (check_call, linear_attention, pick_backend, plan_affine_phases,
                                           plan_phases)
from lasp.kernels.naive import naive_linear_attention
from lasp.kernels.state import cumsum_over_time, dense_state_output


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
    num_rows: int               # R: batch rows, or packed documents
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

    def _memory_rows(self) -> torch.Tensor:
        """[B·T·k]: each sorted copy's row (token · M + memory) of a [B·T·M, ...] tensor."""
        return (self.src // self.top_k) * self.num_memories + self.indices.reshape(-1).index_select(0, self.src)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, M, ...] per token and memory -> [B·T·k, ...]: each copy's own memory's row, sorted."""
        self._token_shape("x", x, 1)
        M, N = self.num_memories, self.num_tokens
        if x.shape[2] != M:
            raise ValueError(f"x must hold all {M} memories on dim 2, got shape {tuple(x.shape)}")
        rows = self._memory_rows()
        return _Rows.apply(x.reshape(N * M, *x.shape[3:]), rows, lambda grad: self._spread_rows(grad, rows))

    def _spread_rows(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[B·T·k, ...] sorted copies -> [B·T·M, ...] at `rows` (`_memory_rows`), zero where a
        memory got no copy."""
        return x.new_zeros(self.num_tokens * self.num_memories, *x.shape[1:]).index_copy(0, rows, x)

    def spread(self, x: torch.Tensor) -> torch.Tensor:
        """[B·T·k, ...] sorted copies -> [B, T, M, ...]: each copy at its token and memory,
        zero where a memory got no copy of the token (the adjoint of `select`)."""
        if x.shape[0] != self.num_copies:
            raise ValueError(f"x must hold the {self.num_copies} sorted copies on dim 0, got {tuple(x.shape)}")
        B, T, _ = self.indices.shape
        return self._spread_rows(x, self._memory_rows()).view(B, T, self.num_memories, *x.shape[1:])

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
        if pick_backend(backend, o) == "triton":
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
    documents (B = 1; empty documents are allowed), or with `segment_len` the pieces of
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


def _check_memory_decay(g, g_gamma, plan: MoMPlan, H: int, device, gk=None, K=None) -> None:
    B, T, _ = plan.indices.shape
    if sum(x is not None for x in (g, g_gamma, gk)) > 1:
        raise ValueError("pass at most one of g (data-dependent decay), g_gamma (fixed decay) and gk "
                         "(per-key decay)")
    for name, x, shape in (("g", g, (B, T, plan.num_memories, H)), ("g_gamma", g_gamma, (H,)),
                           ("gk", gk, (B, T, plan.num_memories, H, K))):
        if x is None:
            continue
        check_tensor(name, x, len(shape))
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
        if not x.is_floating_point() or x.device != device:
            raise TypeError(f"{name} must be a floating tensor of natural-log decays on {device}")
        check_log_decays(name, x)


def _check_memory_beta(beta, plan: MoMPlan, H: int, device) -> None:
    """beta: [B, T, M, H] each memory's delta-rule write strength per token; finite."""
    if beta is None:
        return
    shape = (*plan.indices.shape[:2], plan.num_memories, H)
    check_tensor("beta", beta, 4)
    if tuple(beta.shape) != shape:
        raise ValueError(f"beta must have shape {shape} [B, T, M, H], got {tuple(beta.shape)}")
    if not beta.is_floating_point() or beta.device != device:
        raise TypeError(f"beta must be a floating tensor on {device}, got {beta.dtype} on {beta.device}")
    check_finite("beta", beta)


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


def mixture_of_memories(q, k, v, weights, plan: MoMPlan, g=None, g_gamma=None, *, gk=None, beta=None, scale=None,
                        initial_state=None, output_final_state=False, backend=None):
    """MoM linear attention of the routed memories; returns `(o, final_state)`.

    Args:
        q: [B, T, H, K] queries, shared by the memories.
        k, v: each memory's keys/values for every token, [B, T, M, H, K|V], or only the
            routed copies in the plan's sorted order, [B·T·k, H, K|V] (`mom_projection`).
        weights: [B, T, k] routing weights of the plan's choices (`mom_route`).
        plan: `mom_dispatch` of the routing indices (its rows: batch rows or documents).
        g: [B, T, M, H] per-memory data-dependent log-decay (≤ 0), applied on the tokens
            routed to that memory; or g_gamma: [H] fixed log-decay per routed token; or
            gk: [B, T, M, H, K] per-key log-decay (GLA) per memory.
        beta: [B, T, M, H] the delta rule (module docstring): each memory's write
            strength per token, with none, g, g_gamma or gk as the memories' decay.
        initial_state: [M, R, H, K, V] state of each memory entering each row (fp32).
        output_final_state: also return each memory's state after each row,
            [M, R, H, K, V]; a memory that gets no token passes its state through.
        backend: "triton" | "torch" | None, as in `linear_attention` (also picks the combine).
    Returns o: [B, T, H, V] in q's dtype, final_state or None.
    """
    ks, vs, backend = _check_streams(q, k, v, weights, plan, g, g_gamma, gk, backend, beta)
    B, T, H, K = q.shape
    M, R = plan.num_memories, plan.num_rows
    V = vs.shape[-1]
    if initial_state is not None:
        check_tensor("initial_state", initial_state, 5)
        if tuple(initial_state.shape) != (M, R, H, K, V):
            raise ValueError(f"initial_state must be [M, R, H, K, V]={(M, R, H, K, V)}, "
                             f"got {tuple(initial_state.shape)}")
        initial_state = initial_state.reshape(M * R, H, K, V)
    gs, gks, betas = (None if x is None else plan.select(x)[None] for x in (g, gk, beta))
    if backend == "triton" and beta is None:
        out, final = _triton_streams(q, ks, vs, gs if gk is None else gks, g_gamma, weights, scale, initial_state,
                                     output_final_state, plan)
    else:
        o, final = linear_attention(plan.copies(q)[None], ks[None], vs[None], gs, g_gamma, gk=gks, beta=betas,
                                    scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                                    cu_seqlens=plan.cu_seqlens, backend=backend)
        out = plan.combine(o[0], weights, backend)
    return out, None if final is None else final.view(M, R, *final.shape[1:])


def _triton_streams(q, ks, vs, gs, g_gamma, weights, scale, initial_state, output_final_state,
                    plan: MoMPlan):
    """Every stream's linear attention in one Triton varlen call, combined
    (`triton_mom_streams`: bf16 rounds once, in the sum of a token's copies). `gs`: the
    copies' decay, [1, P, H] (g) or [1, P, H, K] (gk), or None."""
    from lasp.kernels.common.launch import check_triton_head_dims
    from lasp.kernels.triton_mom import triton_mom_streams

    check_triton_head_dims(ks, vs)
    P, H, K = ks.shape
    if g_gamma is not None:
        gs = g_gamma.float()[None, None, :].expand(1, P, H)
    copy_weights = weights.reshape(-1).index_select(0, plan.src)
    return triton_mom_streams(
        q, ks, vs, None if gs is None else gs.float().contiguous(), float(K ** -0.5 if scale is None else scale),
        None if initial_state is None else initial_state.float(), output_final_state, copy_weights, plan)


def routed_log_decay(indices, num_memories: int, g=None, g_gamma=None, dtype=torch.float32, *, gk=None):
    """Per-token, per-memory log-decay [B, T, M, H] (g, g_gamma) or [B, T, M, H, K] (gk):
    the memory's decay where the token is routed to it, 0 (no decay) elsewhere; None for
    plain attention.

    Its cumulative sum over a row is the decay a memory's state accumulates along the
    row: only routed tokens advance a memory's recurrence.
    """
    if g is None and g_gamma is None and gk is None:
        return None
    B, T, _ = indices.shape
    routed = torch.zeros(B, T, num_memories, dtype=dtype, device=indices.device).scatter_(-1, indices, 1.0)
    if gk is not None:
        return gk.to(dtype) * routed[..., None, None]
    decay = g.to(dtype) if g is not None else g_gamma.to(dtype)[None, None, None, :]
    return decay * routed[..., None]


def _routed_coefficients(weights, indices, num_memories, decay, reach, scale, dtype):
    """The two factors of each token's coefficient on each memory's state, in `dtype`:
    the routing weight w_tm [B, T, M, 1, 1] (0 where t is not routed to m) and
    f_tm = scale · exp(Γ_tm) · [t < reach], [B, T, M, H|1, K|1] (per head with g / g_gamma,
    per key with gk, neither without decay). `decay`: `routed_log_decay` in float64, or
    None; its cumulative sum runs in float64 (over long rows a float32 running sum loses
    the small differences)."""
    B, T, _ = indices.shape
    routed_weight = torch.zeros(B, T, num_memories, dtype=dtype, device=indices.device).scatter(
        -1, indices, weights.to(dtype))
    if decay is None:
        factor = torch.full((B, T, num_memories, 1, 1), scale, dtype=torch.float64, device=indices.device)
    else:
        factor = scale * cumsum_over_time(decay).exp()
        factor = factor[..., None] if decay.dim() == 4 else factor
    if reach is not None:
        inside = torch.arange(T, device=indices.device)[None, :] < reach.to(indices.device)[:, None]
        factor = factor * inside[:, :, None, None, None]
    return routed_weight[..., None, None], factor.to(dtype)


class _MoMStateOutput(torch.autograd.Function):
    """o_t = Σ_m (c_tm ⊙ q_t)ᵀ S_m with c_tm = w_tm · f_tm (`_routed_coefficients`): one
    matmul over (memory, key). Saves only its inputs and recomputes the coefficients in
    the backward, so the correction keeps no activation of its own (issue 22)."""

    @staticmethod
    def forward(ctx, q, state, weights, indices, g, g_gamma, gk, reach, scale):
        acc, mm = accumulation_dtype(q.dtype), matmul_dtype(q.dtype)
        M = state.shape[1]
        decay = routed_log_decay(indices, M, g, g_gamma, torch.float64, gk=gk)
        routed_weight, factor = _routed_coefficients(weights, indices, M, decay, reach, scale, acc)
        scaled_q = q.to(acc)[:, :, None] * (routed_weight * factor)                    # [B,T,M,H,K]
        out = torch.einsum("btmhk,bmhkv->bthv", scaled_q.to(mm), state.to(mm))
        ctx.save_for_backward(q, state, weights, indices, g, g_gamma, gk, reach)
        ctx.scale = scale
        return out.to(q.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, state, weights, indices, g, g_gamma, gk, reach = ctx.saved_tensors
        acc, mm = accumulation_dtype(q.dtype), matmul_dtype(q.dtype)
        M = state.shape[1]
        decay = routed_log_decay(indices, M, g, g_gamma, torch.float64, gk=gk)
        routed_weight, factor = _routed_coefficients(weights, indices, M, decay, reach, ctx.scale, acc)
        coef = routed_weight * factor                                                   # [B,T,M,H|1,K|1]
        d_scaled_q = torch.einsum("bthv,bmhkv->btmhk", do.to(mm), state.to(mm)).to(acc)
        dq = (d_scaled_q * coef).sum(2).to(q.dtype) if ctx.needs_input_grad[0] else None
        d_state = None
        if ctx.needs_input_grad[1]:
            scaled_q = q.to(acc)[:, :, None] * coef
            d_state = torch.einsum("btmhk,bthv->bmhkv", scaled_q.to(mm), do.to(mm)).to(state.dtype)
        d_coef = q.to(acc)[:, :, None] * d_scaled_q                                     # [B,T,M,H,K]
        d_weights = dg = dg_gamma = dgk = None
        if ctx.needs_input_grad[2]:
            d_weights = (d_coef * factor).sum((-1, -2)).gather(-1, indices).to(weights.dtype)
        if decay is not None and any(ctx.needs_input_grad[4:7]):
            # Γ_tm = Σ_{u ≤ t} a_um over routed u: d a_um = Σ_{t ≥ u} dΓ_tm, dΓ_tm = c_tm ⊙ d c_tm.
            d_cum = d_coef.double() * coef.double()
            if decay.dim() == 4:
                d_cum = d_cum.sum(-1)
            routed = torch.zeros(*indices.shape[:2], M, dtype=torch.float64, device=q.device).scatter_(
                -1, indices, 1.0)
            d_decay = cumsum_over_time(d_cum, reverse=True) * routed.view(*routed.shape, *[1] * (decay.dim() - 3))
            if g is not None:
                dg = d_decay.to(g.dtype)
            elif gk is not None:
                dgk = d_decay.to(gk.dtype)
            else:
                dg_gamma = d_decay.sum((0, 1, 2)).to(g_gamma.dtype)
        return dq, d_state, d_weights, None, dg, dg_gamma, dgk, None, None


def mom_state_output(q, state, weights, indices, g=None, g_gamma=None, *, gk=None, scale=None, reach=None):
    """What incoming memory states add to each token's MoM output (the inter-segment part).

    o_t += Σ_j w_tj · scale · (exp(Γ_{t, m_tj}) ⊙ q_t)ᵀ S_{m_tj}, where Γ_{t,m} is memory m's
    cumulative log-decay over the row's tokens routed to it, through t.

    Args:
        q: [B, T, H, K]; state: [B, M, H, K, V] each memory's state entering each row;
        weights, indices: [B, T, k] routing; g: [B, T, M, H], g_gamma: [H] or gk:
        [B, T, M, H, K] (as in `mixture_of_memories`); reach: optional int [B]: the states
        reach only tokens t < reach[b] (the row's first packed document). Device tensors,
        no sync.
    Returns [B, T, H, V] in q's dtype; differentiable in q, state, weights and the decay.
    Saves only its inputs for the backward (`_MoMStateOutput`).
    """
    check_tensor("q", q, 4)
    check_tensor("state", state, 5)
    check_tensor("indices", indices, 3)
    B, T, H, K = q.shape
    if tuple(state.shape[:4]) != (B, state.shape[1], H, K):
        raise ValueError(f"state must be [B, M, H, K, V] with B, H, K = {(B, H, K)}, got {tuple(state.shape)}")
    if tuple(indices.shape[:2]) != (B, T) or tuple(weights.shape) != tuple(indices.shape):
        raise ValueError(f"weights and indices must be [B, T, k] with B, T = {(B, T)}, got "
                         f"{tuple(weights.shape)} and {tuple(indices.shape)}")
    return _MoMStateOutput.apply(q, state, weights, indices, g, g_gamma, gk, reach,
                                 float(K ** -0.5 if scale is None else scale))


@dataclass(frozen=True)
class MoMPhases:
    """`mixture_of_memories` from zero states in the phases of
    `lasp.kernels.linear_attention_phases`, with the routing weights as one more input
    after the phase's own arguments (`mom_phases`)::

        final, saved = phases.summarize(k, v, decay, None)         # every stream's final state
        o = phases.output(q, k, v, decay, saved, weights)          # [B, T, H, V], combined
        dq, partial = phases.grad_q(q, k, v, decay, saved, do, weights)
        dk, dv, d_decay, dh0, d_weights = phases.grad_kvg(q, k, v, decay, saved, partial, d_final,
                                                          weights, want_dg=..., want_dh0=...)

    q: [B, T, H, K] per token; k, v: [1, B·T·k, H, K|V] the sorted copies; decay: the
    streams' per-copy decay (or None); `streams`: the phases of the ONE varlen call over
    every (memory, row) stream. `fused` (Triton): the kernels read each copy's query and
    output gradient from its token's row and apply the weights in fp32
    (`lasp.kernels.triton_mom`); otherwise (torch) the query copies are gathered and the
    copies' outputs combined by `MoMPlan.combine`'s formula.
    """

    streams: object
    plan: MoMPlan
    fused: bool

    @property
    def _query_rows(self):
        return self.plan.src // self.plan.top_k          # sorted copy -> its token's row

    def _copy_weights(self, weights):
        """Each sorted copy's routing weight [B·T·k] (fp32 for the kernels)."""
        w = weights.reshape(-1).index_select(0, self.plan.src)
        return w.float().contiguous() if self.fused else w

    def _sum_copies(self, x, dtype, shape):
        """[1, P, H, D] per sorted copy -> [B, T, H, D]: each token's k copies summed in fp32."""
        if self.fused:
            from lasp.kernels.triton_mom import sum_copies
            return sum_copies(x.view(x.shape[1], -1), self.plan.dest, self.plan.top_k, dtype).view(shape)
        per_token = x[0].index_select(0, self.plan.dest).view(*shape[:2], self.plan.top_k, *shape[2:])
        return per_token.sum(2, dtype=accumulation_dtype(x.dtype)).to(dtype)

    def summarize(self, k, v, decay, initial_state):
        return self.streams.summarize(k, v, decay, initial_state)

    def output(self, q, k, v, decay, saved, weights):
        B, T, H, _ = q.shape
        shape = (B, T, H, v.shape[-1])
        if self.fused:
            o = self.streams.output(q.reshape(1, B * T, *q.shape[2:]), k, v, decay, saved,
                                    self._copy_weights(weights), self._query_rows)      # weighted, fp32
            return self._sum_copies(o, q.dtype, shape)
        o = self.streams.output(self._query_copies(q), k, v, decay, saved)
        acc = accumulation_dtype(q.dtype)
        weighted = o.to(acc) * self._copy_weights(weights).to(acc)[None, :, None, None]
        return self._sum_copies(weighted, q.dtype, shape)

    def _query_copies(self, x):
        return x.reshape(-1, *x.shape[2:]).index_select(0, self._query_rows)[None]

    def grad_q(self, q, k, v, decay, saved, do, weights):
        w = self._copy_weights(weights)
        if self.fused:
            dq, partial = self.streams.grad_q(q.reshape(1, -1, *q.shape[2:]), k, v, decay, saved,
                                              do.reshape(1, -1, *do.shape[2:]), w, self._query_rows)
            return self._sum_copies(dq, q.dtype, q.shape), (partial, do)
        acc = accumulation_dtype(do.dtype)
        do_copies = (self._query_copies(do).to(acc) * w.to(acc)[None, :, None, None]).to(do.dtype)
        dq, partial = self.streams.grad_q(self._query_copies(q), k, v, decay, saved, do_copies)
        return self._sum_copies(dq, q.dtype, q.shape), (partial, do)

    def grad_kvg(self, q, k, v, decay, saved, partial, d_final, weights, want_dg=True, want_dh0=True):
        """(dk, dv, d decay or None, d initial state or None, d weights [B, T, k])."""
        partial, do = partial
        w = self._copy_weights(weights)
        if self.fused:
            grads = self.streams.grad_kvg(q.reshape(1, -1, *q.shape[2:]), k, v, decay, saved, partial, d_final,
                                          want_dg, want_dh0, w, self._query_rows)
            d_copy_weights = self.streams.grad_row_weight(partial, w)
        else:
            q_copies = self._query_copies(q)
            grads = self.streams.grad_kvg(q_copies, k, v, decay, saved, partial, d_final, want_dg, want_dh0)
            # <do_t, o_copy>: the copies' zero-state outputs, recomputed (the torch path saves none).
            o = self.streams.output(q_copies, k, v, decay, saved)
            acc = accumulation_dtype(do.dtype)
            d_copy_weights = (o[0].to(acc) * self._query_copies(do)[0].to(acc)).sum((1, 2))
        d_weights = d_copy_weights.index_select(0, self.plan.dest).view(weights.shape).to(weights.dtype)
        return (*grads, d_weights)


def mom_phases(q, k, v, weights, plan: MoMPlan, g=None, g_gamma=None, *, gk=None, scale=None, backend=None):
    """`mixture_of_memories` from zero states, split into the phases of
    `lasp.kernels.linear_attention_phases` with the combine inside (`MoMPhases`), for a
    caller that runs other work in between (sequence parallelism overlaps its summary
    exchange with them). Arguments as in `mixture_of_memories` (no initial state, no
    delta rule: its transitions are dense, `mom_affine_phases`).

    Returns `(phases, (q, k, v, decay, weights))`: the inputs in the form the phases take
    them (k, v as sorted copies [1, B·T·k, H, K|V], decay per copy, fp32 on Triton, or
    None), converted differentiably. `phases.summarize` gives every stream's final state
    [M·R, H, K, V] (stream m·R + r: memory m on row r).
    """
    ks, vs, backend = _check_streams(q, k, v, weights, plan, g, g_gamma, gk, backend)
    gs, gks = (None if x is None else plan.select(x)[None] for x in (g, gk))
    fused = backend == "triton"
    if fused:
        from lasp.kernels.common.launch import check_triton_head_dims
        from lasp.kernels.triton_mom import stream_phases
        check_triton_head_dims(ks, vs)
        decay = gs if gks is None else gks
        if g_gamma is not None:
            decay = g_gamma.float()[None, None, :].expand(1, ks.shape[0], ks.shape[1])
        K = q.shape[-1]
        streams, (_, ks, vs, decay, _) = stream_phases(
            q.reshape(1, -1, *q.shape[2:]), ks[None], vs[None], None if decay is None else decay.float().contiguous(),
            float(K ** -0.5 if scale is None else scale), None, plan.cu_seqlens)
    else:
        q_copies = q.detach()[:1, :1].expand(1, plan.num_copies, *q.shape[2:])     # shapes only: no copy
        call = check_call(q_copies, ks[None], vs[None], g=gs, g_gamma=g_gamma, gk=gks, scale=scale,
                          cu_seqlens=plan.cu_seqlens, backend=backend)
        streams, (_, ks, vs, decay, _) = plan_phases(q_copies, ks[None], vs[None], call,
                                                     cu_seqlens=plan.cu_seqlens)
    return MoMPhases(streams, plan, fused), (q, ks, vs, decay, weights)


def _check_streams(q, k, v, weights, plan: MoMPlan, g, g_gamma, gk, backend, beta=None):
    """The checks of `mixture_of_memories` but the initial state's; returns k and v as
    sorted copies [B·T·k, H, K|V] and the backend."""
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
    _check_memory_decay(g, g_gamma, plan, H, q.device, gk, K)
    _check_memory_beta(beta, plan, H, q.device)
    return ks, vs, pick_backend(backend, q)


def mom_affine_phases(q, k, v, weights, plan: MoMPlan, g=None, g_gamma=None, *, gk=None, beta, scale=None,
                      backend=None):
    """Delta-rule memories from unknown incoming states: every (memory, row) stream's run
    as an affine map of its incoming state, in phases (`plan_affine_phases`: the affine
    run of `lasp.kernels.delta.chunk`, ONE varlen call over the streams, query copies
    materialised). Arguments as in `mixture_of_memories` (`beta` required; the weights
    are only checked). Returns `(phases, (q, k, v, decay, beta))`, the inputs per sorted
    copy ([1, B·T·k, ...]), converted differentiably::

        (U, M), saved = phases.summarize(k, v, decay, beta)   # per stream [M·R, H, K, V|K]
        o0, x = phases.output(q, k, v, decay, beta, saved)    # per copy, accumulation dtype

    A stream entered with S ends in U + M S, and its copies' outputs are o0 + xᵀ S: the
    MoM output is `plan.combine(o0[0], weights)` plus `mom_dense_state_output`.
    """
    if beta is None:
        raise ValueError("mom_affine_phases needs beta (the delta rule's transitions are dense)")
    ks, vs, backend = _check_streams(q, k, v, weights, plan, g, g_gamma, gk, backend, beta)
    gs, gks, betas = (None if x is None else plan.select(x)[None] for x in (g, gk, beta))
    q_copies = plan.copies(q)[None]
    call = check_call(q_copies, ks[None], vs[None], g=gs, g_gamma=g_gamma, gk=gks, beta=betas, scale=scale,
                      cu_seqlens=plan.cu_seqlens, backend=backend)
    return plan_affine_phases(q_copies, ks[None], vs[None], call, cu_seqlens=plan.cu_seqlens)


def mom_dense_state_output(x, state, weights, plan: MoMPlan, reach=None):
    """What incoming states add to delta-rule memories' outputs: o_t += Σ_j w_tj x_cᵀ S,
    c the copy of token t's j-th choice m, S memory m's state entering t's row (as
    `lasp.kernels.state.dense_state_output` for one stream).

    Args:
        x: [1, B·T·k, H, K] per sorted copy (`mom_affine_phases`' output);
        state: [R, M, H, K, V]: each memory's state entering each of R rows, the B·T
            tokens cut into R rows of equal length (sequence parallelism's local segments);
        weights: [B, T, k] routing weights; reach: optional int [R]: the states reach only
            a row's first tokens t < reach[r] (its first packed document). No sync.
    Returns [B, T, H, V] in x's dtype: one matmul over (memory, key) per row and head,
    on the weighted copies spread to [B, T, M, H, K] (zero where a memory got no copy),
    M/k times x's size: the backward recomputes the spread rather than keeping it
    (`torch.utils.checkpoint`), so the op saves only its inputs.
    """
    check_tensor("x", x, 4)
    check_tensor("state", state, 5)
    check_weights(weights, plan)
    R, M, H, K, _ = state.shape
    if tuple(x.shape) != (1, plan.num_copies, H, K) or M != plan.num_memories or plan.num_tokens % R:
        raise ValueError(f"x must be [1, B·T·k, H, K] = {(1, plan.num_copies, H, K)} and state [R, M, H, K, V] "
                         f"with M = {plan.num_memories} and R dividing B·T = {plan.num_tokens}, got "
                         f"{tuple(x.shape)} and {tuple(state.shape)}")
    return torch.utils.checkpoint.checkpoint(_dense_state_output, x, state, weights, plan, reach,
                                             use_reentrant=False)


def _dense_state_output(x, state, weights, plan: MoMPlan, reach):
    """`mom_dense_state_output` on checked arguments (its checkpointed part)."""
    B, T, _ = plan.indices.shape
    R, M, H, K, V = state.shape
    w = weights.reshape(-1).index_select(0, plan.src).to(x.dtype)
    spread = plan.spread(x[0] * w[:, None, None]).reshape(R, B * T // R, M, H, K)
    rows = spread.permute(0, 1, 3, 2, 4).reshape(R, B * T // R, H, M * K)
    return dense_state_output(rows, state.transpose(1, 2).reshape(R, H, M * K, V), reach).reshape(B, T, H, V)


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


def mom_reference(q, k, v, weights, indices, g=None, g_gamma=None, *, gk=None, beta=None, scale=None,
                  initial_state=None, output_final_state=False, cu_seqlens=None):
    """The oracle: a loop over memories and documents on `naive_linear_attention`.

    Same arguments as `mixture_of_memories`, with k, v: [B, T, M, H, K|V] (every memory)
    and the routing as (weights, indices, cu_seqlens) instead of a plan. Any dtype.
    """
    B, T, H, K = q.shape
    M, V = k.shape[2], v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    acc = accumulation_dtype(q.dtype)
    out = torch.zeros(B, T, H, V, dtype=acc, device=q.device)
    rows = list(documents(B, T, cu_seqlens))
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
            key_gate = None if gk is None else gk[b, pos, m][None]
            write = None if beta is None else beta[b, pos, m][None]
            o, state = naive_linear_attention(q[b, pos][None], k[b, pos, m][None], v[b, pos, m][None], gate,
                                              gk=key_gate, beta=write, scale=scale, initial_state=h0,
                                              output_final_state=True)
            out = out.index_put((torch.full_like(pos, b), pos), weight[b, pos, None, None] * o[0].to(acc),
                                accumulate=True)
            finals.append(state[0])
    final = torch.stack(finals).view(M, len(rows), H, K, V) if output_final_state else None
    return out.to(q.dtype), final
