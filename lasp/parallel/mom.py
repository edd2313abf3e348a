"""Mixture-of-Memories under sequence parallelism: LASP-2 over every memory's chain at once.

Each memory's recurrence runs over the tokens routed to it, in sequence order, so each
memory is its own linear-attention chain through the global segments. A segment maps a
memory's incoming state affinely (DESIGN.md §1)::

    S_out = exp(a) · S_in + U       U: the memory's state after the segment's routed tokens
                                        from a zero state; a: Σ of its log-decays over them

A memory that receives no token in a segment has U = 0, a = 0: it passes its state
through unchanged. Each rank

1. routes and dispatches its tokens with every local segment as its own row
   (`local_plan`) and runs ONE local `mixture_of_memories` call from zero states:
   the zero-state output and every (memory, row) stream's final state;
2. summarises each (memory, segment, batch row) - with packed documents, U is the
   stream of the segment's last document and a = -inf where a document starts inside
   the segment (`lasp.parallel.lasp2._document_edges`);
3. exchanges ALL memories' summaries in ONE all-gather (`all_gather_scan`, the
   memories folded into its batch dimension) and gets each memory's incoming state;
4. adds `mom_state_output`: the incoming states enter the routed tokens of the
   segment's first document.

The load-balancing loss is over the whole sequence: `lasp2_load_balancing_loss`
all-reduces the routing counts (no gradient) and returns this rank's share; the shares
sum to the single-process loss. All math is `lasp.kernels`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lasp.kernels.checks import check_cu_seqlens, check_tensor
from lasp.kernels.mom import (MoMPlan, load_balancing_loss, mixture_of_memories, mom_dispatch,
                              mom_state_output, routed_log_decay, routing_counts)
from lasp.kernels.reference import accumulation_dtype
from lasp.parallel.lasp2 import _document_edges
from lasp.parallel.layout import SequenceLayout
from lasp.parallel.scan import all_gather_scan


def local_plan(indices, num_memories: int, *, layout: SequenceLayout | None, cu_seqlens=None) -> MoMPlan:
    """`mom_dispatch` of this rank's tokens with each local segment as its own rows.

    indices: [B, local_len, k]; cu_seqlens: packed documents of the WHOLE sequence.
    Without a layout (or W = 1) the whole sequence is local: the plain dispatch.
    """
    if layout is None or layout.world_size == 1:
        return mom_dispatch(indices, num_memories, cu_seqlens)
    layout.check_input("indices", indices)
    if cu_seqlens is None:
        return mom_dispatch(indices, num_memories, segment_len=layout.segment_len)
    check_cu_seqlens(cu_seqlens, indices.new_empty(indices.shape[0], layout.seq_len, 0))
    return mom_dispatch(indices, num_memories, layout.local_cu_seqlens(cu_seqlens))


def lasp2_mixture_of_memories(q, k, v, weights, plan: MoMPlan, g=None, g_gamma=None, *, layout, group=None,
                              scale=None, cu_seqlens=None):
    """Sequence-parallel `mixture_of_memories` with LASP-2: one all-gather of every
    memory's segment summaries per forward and one per backward.

    Args:
        q, k, v, weights, g, g_gamma, scale: this rank's tokens, as in
            `lasp.kernels.mixture_of_memories` (k, v: every memory [B, local_len, M, H, D]
            or sorted routed copies).
        plan: `local_plan(indices, M, layout=layout, cu_seqlens=cu_seqlens)`.
        layout: this rank's `SequenceLayout` in `group` (default: the world group).
        cu_seqlens: int [N+1] packed documents of the WHOLE sequence (B = 1), the same
            tensor on every rank.
    Returns o: [B, local_len, H, V], differentiable in every input (g_gamma's gradient
    is this rank's share: sum it over the group).

    Bad input raises on every rank before any collective.
    """
    _check_inputs(q, plan, layout, group, cu_seqlens)
    if layout.world_size == 1:
        return mixture_of_memories(q, k, v, weights, plan, g, g_gamma, scale=scale)[0]
    o0, final = mixture_of_memories(q, k, v, weights, plan, g, g_gamma, scale=scale, output_final_state=True)
    B, _, H, _ = q.shape
    M, nseg, L = plan.num_memories, len(layout.local_segments), layout.segment_len
    R = B * nseg                    # rows of the exchange: (batch row, local segment)
    reach = None
    last = final                    # [M, R, H, K, V]
    if cu_seqlens is not None:
        _, last_seq, reach, _ = _document_edges(layout, cu_seqlens)
        last = final.index_select(1, last_seq)

    def rows(x):
        return None if x is None else x.reshape(R, L, *x.shape[2:])

    decay = routed_log_decay(plan.indices, M, g, g_gamma, accumulation_dtype(q.dtype))
    log_a = final.new_zeros(R, M, H) if decay is None else rows(decay).sum(1)
    if reach is not None:           # a document starts inside the segment: the chain stops there
        log_a = log_a.masked_fill((reach != L)[:, None, None], float("-inf"))
    # One chain whose batch dimension holds (memory, batch row): [nseg, 1, M·B, ...].
    states = last.unflatten(1, (B, nseg)).movedim(2, 0).flatten(1, 2)[:, None]
    log_a = log_a.unflatten(0, (B, nseg)).permute(1, 2, 0, 3).flatten(1, 2)[:, None]
    incoming = all_gather_scan(states, log_a, layout, group)
    incoming = incoming[:, 0].unflatten(1, (M, B)).permute(2, 0, 1, 3, 4, 5).flatten(0, 1)   # [R, M, ...]
    extra = mom_state_output(rows(q), incoming, rows(weights), rows(plan.indices), rows(g), g_gamma,
                             scale=scale, reach=reach)
    return o0 + extra.reshape(o0.shape)


def lasp2_load_balancing_loss(probs, indices, *, layout=None, group=None):
    """This rank's share of the load-balancing loss of the WHOLE sequence.

    The routing fractions f_m and the token count come from an all-reduce of the
    counts over `group` (no gradient); the mean router probability is this rank's sum
    divided by the whole sequence's token count. The shares of all ranks sum to the
    single-process loss, and so do their gradients (the loss contract of `lasp.loss`).
    """
    check_tensor("probs", probs, 3)
    if layout is None or layout.world_size == 1:
        return load_balancing_loss(probs, indices)
    layout.check_group(group)
    M = probs.shape[-1]
    tokens = torch.full((1,), probs.shape[0] * probs.shape[1], dtype=torch.float64, device=probs.device)
    totals = torch.cat([routing_counts(indices, M), tokens])
    dist.all_reduce(totals, group=group)
    return load_balancing_loss(probs, indices, counts=totals[:M], num_tokens=totals[M])


def _check_inputs(q, plan, layout, group, cu_seqlens) -> None:
    """Shape and group checks: every rank raises the same error before any collective."""
    if not isinstance(layout, SequenceLayout):
        raise TypeError(f"layout must be a SequenceLayout, got {type(layout).__name__}")
    layout.check_group(group)
    check_tensor("q", q, 4)
    layout.check_input("q", q)
    if not isinstance(plan, MoMPlan):
        raise TypeError(f"plan must be a MoMPlan (from local_plan), got {type(plan).__name__}")
    nseg = len(layout.local_segments)
    if cu_seqlens is None:
        rows = q.shape[0] * (nseg if layout.world_size > 1 else 1)
    else:
        check_cu_seqlens(cu_seqlens, q.new_empty(q.shape[0], layout.seq_len, 0))
        rows = (cu_seqlens.numel() * nseg - 1) if layout.world_size > 1 else cu_seqlens.numel() - 1
    if plan.num_rows != rows:
        raise ValueError(f"plan has {plan.num_rows} rows, but {layout} with "
                         f"{'packed documents' if cu_seqlens is not None else 'B=' + str(q.shape[0])} needs "
                         f"{rows}: make it with local_plan(indices, M, layout=layout, cu_seqlens=cu_seqlens)")
