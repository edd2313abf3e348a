"""LASP-2H: sequence-parallel softmax attention for the softmax layers of hybrid models.

Each rank keeps its queries. The keys and values (only the H_kv heads under GQA) are
all-gathered across the group into global order, and each local query segment attends
to the key prefix its global positions may see: segment [s, e) against keys [0, e) with
a lower-right-aligned causal mask (keys [0, T) without `causal`). Under the zigzag
layout each rank's two segments then cost the same in total on every rank. Packed
documents (`cu_seqlens` of the whole sequence) become per-segment document offsets,
computed on the device. Values may have their own head dim (Dv ≠ D, as in MLA). The
backward sums the key/value gradients of the local query segments and reduce-scatters
them to their owners, both in fp32 (`KV_GRAD_ACCUMULATION`), and rounds once to the
input dtype: a bf16 sum rounds at every addition, and its error grows with W
(benchmarks/lasp2h_grad_precision.py measures both).

The gather goes one group of `heads_per_gather` key/value heads at a time: the next
group's all-gather is in flight (async collective: on NCCL it runs on the communicator's
stream and `wait()` only makes the compute stream wait, no host sync) while the current
group's attention runs. Grouping bounds the transient buffers of one step (the gathered
and reordered keys/values, and in the backward the full-length gradients before their
reduce-scatter, which GQA backends also expand to H_q heads); the gathered keys/values
that autograd saves for the backward are the whole sequence's, as with any all-gather
context parallelism.

`ring_attention` is the ring baseline that the benchmarks compare against.
"""

from __future__ import annotations

import torch

from lasp.kernels.checks import check_cu_seqlens
from lasp.kernels.softmax_attention import check_attention_inputs, pick_backend, softmax_attention
from lasp.parallel import comm
from lasp.parallel.layout import SequenceLayout

# Default head grouping: gather as many key/value heads at once as fit this many bytes.
GATHER_BUDGET_BYTES = 1 << 30
# The dtype in which key/value gradients are summed (over the local query segments, then over
# the ranks; the ring baseline's over its steps, dq too) before their one rounding to the
# input dtype (never below it: fp64 stays fp64).
KV_GRAD_ACCUMULATION = torch.float32


def lasp2h_attention(q, k, v, *, layout, group=None, scale=None, causal=True, cu_seqlens=None,
                     heads_per_gather=None, backend=None):
    """Softmax attention of this rank's queries against the whole sequence's keys.

    Args:
        q: [B, local_len, H_q, D]; k: [B, local_len, H_kv, D]; v: [B, local_len, H_kv, Dv]
            (this rank's tokens, in `layout`'s local order); H_q a multiple of H_kv.
        layout: the `SequenceLayout` of this rank in `group`.
        scale: score scale, default D^-0.5.
        causal: mask by global position (`layout.positions()`).
        cu_seqlens: int [N+1] offsets of the packed documents of the WHOLE sequence (the
            same tensor on every rank; B = 1): attention stays inside each document.
        heads_per_gather: key/value heads gathered at once (default: all of them while
            their keys and values fit `GATHER_BUDGET_BYTES`, else as many as fit).
        backend: the local backend of `lasp.kernels.softmax_attention` (None: chosen there).

    Returns o [B, local_len, H_q, Dv], this rank's tokens.
    """
    _check_inputs(q, k, v, layout, group, cu_seqlens, backend)
    step = _heads_per_gather(heads_per_gather, k, v, layout)
    k_groups, v_groups = k.split(step, 2), v.split(step, 2)
    q_groups = q.split(step * (q.shape[2] // k.shape[2]), 2)  # query heads follow their key head
    key_ends = _key_ends(layout, causal)
    gathers = [_KVGather(k_groups[0], v_groups[0], layout, group)]
    outputs = []
    for i in range(len(k_groups)):
        if i + 1 < len(k_groups):  # prefetch: in flight while group i attends
            gathers.append(_KVGather(k_groups[i + 1], v_groups[i + 1], layout, group))
        prefixes = _GatheredKV.apply(k_groups[i], v_groups[i], gathers[i], key_ends)
        outputs.append(_attend_segments(q_groups[i], prefixes[:len(key_ends)], prefixes[len(key_ends):],
                                        layout=layout, scale=scale, causal=causal, cu_seqlens=cu_seqlens,
                                        backend=backend))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, 2)


def local_attention(q, k_full, v_full, *, layout, scale=None, causal=True, cu_seqlens=None,
                    backend=None):
    """The local step of LASP-2H: this rank's query segments against the gathered keys.

    q: [B, local_len, H_q, D]; k_full, v_full: [B, seq_len, H_kv, D or Dv] in global order.
    Each causal segment [s, e) sees only the key prefix [0, e): no work on blocks that
    are masked out entirely. Public so that benchmarks can time each rank's compute alone.
    """
    key_ends = _key_ends(layout, causal)
    return _attend_segments(q, [k_full.narrow(1, 0, e) for e in key_ends],
                            [v_full.narrow(1, 0, e) for e in key_ends], layout=layout, scale=scale,
                            causal=causal, cu_seqlens=cu_seqlens, backend=backend)


def _key_ends(layout, causal) -> list[int]:
    """For each local query segment, the end of the key prefix it may see (global positions)."""
    return [end if causal else layout.seq_len for _, end in layout.segment_bounds()]


def _attend_segments(q, keys, values, *, layout, scale, causal, cu_seqlens, backend):
    """Local query segment i against key/value prefix i ([B, key_ends[i], H_kv, D or Dv])."""
    L = layout.segment_len
    outputs = []
    for i, ((start, end), k, v) in enumerate(zip(layout.segment_bounds(), keys, values)):
        documents = {}
        if cu_seqlens is not None:
            documents = dict(cu_seqlens_q=cu_seqlens.clamp(start, end) - start,
                             cu_seqlens_k=cu_seqlens.clamp(0, k.shape[1]))
        outputs.append(softmax_attention(q.narrow(1, i * L, L), k, v, scale=scale, causal=causal,
                                         backend=backend, **documents))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, 1)


def ring_attention(q, k, v, *, layout, group=None, scale=None, causal=True, backend=None):
    """Ring-attention baseline (no `cu_seqlens`): same arguments and result as `lasp2h_attention`.

    The local keys/values travel around the ring (isend/irecv to the next rank, overlapped
    with the current block); each query segment attends to each key segment it may see
    (all of an earlier segment, causally its own) and the partial outputs are merged
    through their log-sum-exps, so the local backend must return one (flex or math). The
    backward differentiates each block's saved graph and passes the key/value gradient
    accumulators around the ring back to their owners.
    """
    _check_inputs(q, k, v, layout, group, None, backend, return_lse=True)
    if v.shape != k.shape:  # the ring passes keys and values around as one stacked tensor
        raise ValueError(f"ring_attention needs values as wide as the keys, got k {tuple(k.shape)} and v "
                         f"{tuple(v.shape)}: use lasp2h_attention")
    return _Ring.apply(q, k, v, layout, group, scale, causal, backend)


def _check_inputs(q, k, v, layout, group, cu_seqlens, backend, return_lse=False) -> None:
    """Every input check, on every rank, before any collective."""
    if not isinstance(layout, SequenceLayout):
        raise TypeError(f"layout must be a SequenceLayout, got {type(layout).__name__}")
    check_attention_inputs(q, k, v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        layout.check_input(name, x)
    if cu_seqlens is not None:
        # Checked against the WHOLE sequence: an empty [B, seq_len, 0] stand-in for q.
        check_cu_seqlens(cu_seqlens, q.new_empty(q.shape[0], layout.seq_len, 0))
    pick_backend(backend, q, documents=cu_seqlens is not None, return_lse=return_lse, v=v)
    layout.check_group(group)


def _heads_per_gather(heads_per_gather, k, v, layout) -> int:
    H_kv = k.shape[2]
    if heads_per_gather is None:
        per_head = k.shape[0] * layout.seq_len * (k.shape[3] + v.shape[3]) * k.element_size()
        return max(1, min(H_kv, GATHER_BUDGET_BYTES // per_head))
    if not isinstance(heads_per_gather, int) or isinstance(heads_per_gather, bool) or heads_per_gather < 1:
        raise ValueError(f"heads_per_gather must be a positive int, got {heads_per_gather!r}")
    return min(heads_per_gather, H_kv)


def _rank_order(layout) -> list[int]:
    """Global segment indices in the order an all-gather stacks the ranks' local tokens."""
    return [s for rank in range(layout.world_size) for s in layout.segments_of(rank)]


def _rank_to_global(x, layout):
    """[W·local_len, ...] in rank order -> [seq_len, ...] in global order (a copy if they differ)."""
    order, L = _rank_order(layout), layout.segment_len
    if order == sorted(order):
        return x
    return torch.cat([x.narrow(0, order.index(s) * L, L) for s in range(len(order))])


def _add_in_rank_order(total, grad, layout):
    """total [W·local_len, ...] (rank order) += grad [B, end, ...] (global positions 0..end)."""
    order, L = _rank_order(layout), layout.segment_len
    grad = grad.transpose(0, 1)
    if order == sorted(order):
        total.narrow(0, 0, grad.shape[0]).add_(grad)
        return
    for segment in range(grad.shape[0] // L):
        total.narrow(0, order.index(segment) * L, L).add_(grad.narrow(0, segment * L, L))


class _KVGather:
    """The all-gather of one head group's local keys and values, started on construction.

    Buffers are time-major ([tokens, B, H, D]) so each rank's block is contiguous in the
    gather; for B = 1 that is the [B, T, H, D] memory itself, and no copy is made.
    """

    def __init__(self, k, v, layout, group):
        self.layout, self.group = layout, group
        self.shapes, self.dtype, self.device = (k.shape, v.shape), k.dtype, k.device
        self.inputs = [x.detach().transpose(0, 1).contiguous() for x in (k, v)]
        if layout.world_size == 1:
            self.outputs, self.works = self.inputs, []
            return
        self.outputs = [x.new_empty(layout.world_size * x.shape[0], *x.shape[1:]) for x in self.inputs]
        self.works = [comm.all_gather_into_tensor(out, x, group, async_op=True)
                      for out, x in zip(self.outputs, self.inputs)]

    def wait(self):
        """(k_full, v_full) [B, seq_len, H, D or Dv] in global order, once the gather is done."""
        for work in self.works:
            work.wait()
        result = tuple(_rank_to_global(x, self.layout).transpose(0, 1) for x in self.outputs)
        self.inputs = self.outputs = self.works = None  # the consumers hold what they need
        return result

    def reduce_scatter(self, dk_prefixes, dv_prefixes):
        """Sum the key (value) prefix gradients over the local query segments and over the
        group in `KV_GRAD_ACCUMULATION`; this rank's part of each, [B, local_len, H, D or Dv],
        in the dtype of the keys.

        dk_prefixes, dv_prefixes: per local segment [B, key_end, H, D or Dv], or None where unused.
        """
        layout = self.layout
        accumulation = torch.promote_types(self.dtype, KV_GRAD_ACCUMULATION)
        totals = []
        for prefixes, (B, _, H, D) in zip((dk_prefixes, dv_prefixes), self.shapes):
            total = torch.zeros(layout.seq_len, B, H, D, dtype=accumulation, device=self.device)
            for grad in prefixes:
                if grad is not None:
                    _add_in_rank_order(total, grad, layout)
            totals.append(total)
        if layout.world_size > 1:
            parts = [t.new_empty(layout.local_len, *t.shape[1:]) for t in totals]
            works = [comm.reduce_scatter_tensor(part, t, self.group, async_op=True) for part, t in zip(parts, totals)]
            for work in works:
                work.wait()
            totals = parts
        return tuple(t.transpose(0, 1).to(self.dtype) for t in totals)


class _GatheredKV(torch.autograd.Function):
    """Autograd edge of a `_KVGather` started ahead: the forward waits for it and returns each
    local query segment's key prefixes, then its value prefixes ([B, key_end, H, D] views of the
    gathered keys/values); the backward sums their gradients and reduce-scatters them."""

    @staticmethod
    def forward(ctx, k, v, gather, key_ends):
        ctx.set_materialize_grads(False)
        ctx.gather = gather
        k_full, v_full = gather.wait()
        return (*(k_full.narrow(1, 0, e) for e in key_ends), *(v_full.narrow(1, 0, e) for e in key_ends))

    @staticmethod
    def backward(ctx, *grads):
        n = len(grads) // 2
        return (*ctx.gather.reduce_scatter(grads[:n], grads[n:]), None, None)


def _finish(pending):
    received, works = pending
    for work in works:
        work.wait()
    return received


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, group, scale, causal, backend):
        W, r, L = layout.world_size, layout.rank, layout.segment_len
        acc = torch.promote_types(q.dtype, torch.float32)
        q_leaves = [q.detach().narrow(1, i * L, L).requires_grad_() for i in range(len(layout.local_segments))]
        o = [None] * len(q_leaves)
        lse = [None] * len(q_leaves)
        steps = []  # per step: (kv leaf, [(query index, o_blk, lse_blk)])
        kv = torch.stack([k, v]).detach()
        for t in range(W):
            src = (r - t) % W
            pending = comm.shift(kv, group) if t + 1 < W else None
            kv_leaf = kv.requires_grad_()
            blocks = []
            with torch.enable_grad():
                for a, qs in enumerate(layout.local_segments):
                    for b, ks in enumerate(layout.segments_of(src)):
                        if causal and ks > qs:
                            continue
                        o_blk, lse_blk = softmax_attention(
                            q_leaves[a], kv_leaf[0].narrow(1, b * L, L), kv_leaf[1].narrow(1, b * L, L),
                            scale=scale, causal=causal and ks == qs, return_lse=True, backend=backend)
                        blocks.append((a, o_blk, lse_blk))
            for a, o_blk, lse_blk in blocks:
                o[a], lse[a] = _merge(o[a], lse[a], o_blk.detach().to(acc), lse_blk.detach().to(acc))
            steps.append((kv_leaf, blocks))
            if pending is not None:
                kv = _finish(pending)
        ctx.layout, ctx.group, ctx.steps, ctx.q_leaves, ctx.o, ctx.lse = layout, group, steps, q_leaves, o, lse
        ctx.input_dtype = q.dtype
        return torch.cat(o, 1).to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        layout, steps, o, lse = ctx.layout, ctx.steps, ctx.o, ctx.lse
        W, L = layout.world_size, layout.segment_len
        acc = torch.promote_types(ctx.input_dtype, KV_GRAD_ACCUMULATION)
        do_segments = [do.narrow(1, i * L, L).to(o[0].dtype) for i in range(len(o))]
        # Gradients are summed over the ring's steps in `KV_GRAD_ACCUMULATION` and rounded once,
        # as LASP-2H's are: bf16 sums grow with the steps (W = 4, tests/parallel/test_lasp2h.py:
        # dk 3.55e-3 with bf16 sums, 3.13e-3 with fp32). Each block's own bf16 rounding stays:
        # at W = 2 on an H100 rank 1 reached dq / dk 3.5e-3 / 3.65e-3 with either sum, against
        # 2.4e-3 / 2.9e-3 for one GPU on the same rows (2026-12-06). The accumulator of
        # source rank (r - 1 - j) travels r-1-j+1 -> ... -> r-1-j: at step j this rank adds its
        # part for that source, whose forward step was (1 + j) % W.
        dq = [torch.zeros_like(x, dtype=acc) for x in ctx.q_leaves]
        dkv, pending = None, None
        for j in range(W):
            kv_leaf, blocks = steps[(1 + j) % W]
            part = torch.zeros_like(kv_leaf, dtype=acc)
            if blocks:
                outputs, cotangents = [], []
                for a, o_blk, lse_blk in blocks:
                    w = (lse_blk.to(lse[a].dtype) - lse[a]).exp()                 # [B, H, L]
                    dot = (do_segments[a] * (o_blk.to(o[a].dtype) - o[a])).sum(-1)  # [B, L, H]
                    outputs += [o_blk, lse_blk]
                    cotangents += [(do_segments[a] * w.transpose(1, 2)[..., None]).to(o_blk.dtype),
                                   (w * dot.transpose(1, 2)).to(lse_blk.dtype)]
                grads = torch.autograd.grad(outputs, [*ctx.q_leaves, kv_leaf], cotangents, allow_unused=True)
                for i, g in enumerate(grads[:-1]):
                    if g is not None:
                        dq[i] += g
                part = grads[-1].to(acc)
            dkv = part if pending is None else _finish(pending) + part
            if j + 1 < W:
                pending = comm.shift(dkv, ctx.group)
        ctx.steps = ctx.q_leaves = None
        dtype = ctx.input_dtype
        return torch.cat(dq, 1).to(dtype), dkv[0].to(dtype), dkv[1].to(dtype), None, None, None, None, None


def _merge(o, lse, o_blk, lse_blk):
    """Combine two softmax-normalised partial outputs through their log-sum-exps."""
    if o is None:
        return o_blk, lse_blk
    new = torch.logaddexp(lse, lse_blk)
    weight = lambda x: (x - new).exp().transpose(1, 2)[..., None]  # noqa: E731
    return o * weight(lse) + o_blk * weight(lse_blk), new
