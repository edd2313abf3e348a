"""Mixture-of-Memories under sequence parallelism: LASP-2 over every memory's chain at once.

Each memory's recurrence runs over the tokens routed to it, in sequence order, so each
memory is its own linear-attention chain through the global segments. A segment maps a
memory's incoming state affinely (DESIGN.md §1)::

    S_out = exp(a) · S_in + U       U: the memory's state after the segment's routed tokens
                                        from a zero state; a: Σ of its log-decays over them
                                        (per head, or per key with gk)

A memory that receives no token in a segment has U = 0, a = 0: it passes its state
through unchanged. Each rank runs the same overlapped path as `lasp2_linear_attention`
(`lasp.parallel.lasp2.Overlapped`), over its MoM streams:

1. routes and dispatches its tokens with every local segment as its own row
   (`local_plan`); `mom_phases` splits the ONE varlen call over every (memory, row)
   stream into the linear-attention phases;
2. summarises each (memory, segment, batch row) - with packed documents, U is the
   stream of the segment's last document and a = -inf where a document starts inside
   the segment (`lasp.parallel.lasp2.document_edges`) - and issues ONE all-gather of
   ALL memories' summaries (the memories folded into the exchange's batch dimension;
   `AutoExchange`: a prefix scan instead at large world sizes);
3. while it is in flight, computes the streams' zero-state outputs, combined with the
   routing weights (`MoMPhases.output`); then waits and scans: each memory's incoming
   state. The backward mirrors it: the gather of the state gradients is in flight
   during the dq phase;
4. adds `mom_state_output`: the incoming states enter the routed tokens of the
   segment's first document.

Delta-rule memories (`beta`) have dense K×K transitions (`_dense_memories`, as
`lasp.parallel.lasp2`'s `_dense_transitions`): every stream runs once as an affine map
of its incoming state (`mom_affine_phases`), which gives each (memory, segment) summary
(M, U), M cut to zero where a document starts inside the segment, and the copies'
outputs o0 + xᵀ S_in; `DenseOverlapped` interleaves it with the exchange in the same
order, and `mom_dense_state_output` adds the incoming states' part.

The load-balancing loss is over the whole sequence: `lasp2_load_balancing_loss`
all-reduces the routing counts (no gradient) and returns this rank's share; the shares
sum to the single-process loss. All math is `lasp.kernels`.
"""

from __future__ import annotations

import torch

from lasp.kernels.checks import check_cu_seqlens, check_tensor
from lasp.kernels.common.documents import accumulation_dtype
from lasp.kernels.mom import (MoMPlan, load_balancing_loss, mixture_of_memories, mom_affine_phases,
                              mom_dense_state_output, mom_dispatch, mom_phases, mom_state_output, routed_log_decay,
                              routing_counts)
from lasp.kernels.transition import Transition, run_transition
from lasp.parallel import comm
from lasp.parallel.lasp2 import DenseOverlapped, Overlapped, Summaries, document_edges
from lasp.parallel.layout import SequenceLayout
from lasp.parallel.scan import AutoExchange


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


def lasp2_mixture_of_memories(q, k, v, weights, plan: MoMPlan, g=None, g_gamma=None, *, gk=None, beta=None,
                              layout, group=None, scale=None, cu_seqlens=None, backend=None):
    """Sequence-parallel `mixture_of_memories` with LASP-2: one all-gather of every
    memory's segment summaries per forward and one per backward, each in flight while
    the local streams' zero-state work that does not need it runs (`Overlapped`; at
    large world sizes a prefix scan instead, as `lasp2_linear_attention`:
    `lasp.parallel.scan.default_exchange`).

    Args:
        q, k, v, weights, g, g_gamma, gk, beta, scale: this rank's tokens, as in
            `lasp.kernels.mixture_of_memories` (k, v: every memory [B, local_len, M, H, D]
            or sorted routed copies).
        plan: `local_plan(indices, M, layout=layout, cu_seqlens=cu_seqlens)`.
        layout: this rank's `SequenceLayout` in `group` (default: the world group).
        cu_seqlens: int [N+1] packed documents of the WHOLE sequence (B = 1), the same
            tensor on every rank.
        backend: the local kernels', as in `mixture_of_memories` (the CPU tests run the
            Triton kernels under the interpreter).
    Returns o: [B, local_len, H, V], differentiable in every input (g_gamma's gradient
    is this rank's share: sum it over the group).

    Bad input raises on every rank before any collective.
    """
    _check_inputs(q, plan, layout, group, cu_seqlens)
    if layout.world_size == 1:
        return mixture_of_memories(q, k, v, weights, plan, g, g_gamma, gk=gk, beta=beta, scale=scale,
                                   backend=backend)[0]
    if beta is not None:
        return _dense_memories(q, k, v, weights, plan, g, g_gamma, gk, beta, layout, group, scale, cu_seqlens,
                               backend)
    phases, (q_, k_, v_, decay_, weights_) = mom_phases(q, k, v, weights, plan, g, g_gamma, gk=gk, scale=scale,
                                                        backend=backend)
    B, _, H, _ = q.shape
    M, nseg, L = plan.num_memories, len(layout.local_segments), layout.segment_len
    R = B * nseg                    # rows: (batch row, local segment)
    acc = accumulation_dtype(q.dtype)

    def rows(x):
        return None if x is None else x.reshape(R, L, *x.shape[2:])

    summaries, reach = _memory_summaries(layout, plan, cu_seqlens)
    decay = routed_log_decay(plan.indices, M, g, g_gamma, acc, gk=gk)                    # [B, T, M, H(, K)]
    tokens = Transition.identity() if decay is None else Transition("scalar" if gk is None else "diagonal",
                                                                     rows(decay))          # [R, L, M, H(, K)]
    run = run_transition(tokens, dim=1)                                                    # [R, M, H(, K)]
    transition = run if run.param is None else Transition(run.kind, run.param.movedim(1, 0).flatten(0, 1))
    if reach is not None:           # a document starts inside the segment: the chain stops there
        transition = transition.cut((reach != L).repeat(M), heads=H, dtype=acc)
    transitions = summaries.transitions([transition])
    o0, incoming = Overlapped.apply(q_, k_, v_, decay_, transitions.param, transitions.kind, phases,
                                     AutoExchange(layout, group), summaries, weights_)
    extra = mom_state_output(rows(q), _per_row(summaries, incoming, M), rows(weights), rows(plan.indices), rows(g),
                             g_gamma, gk=rows(gk), scale=scale, reach=reach)
    return o0 + extra.reshape(o0.shape)


def _dense_memories(q, k, v, weights, plan: MoMPlan, g, g_gamma, gk, beta, layout, group, scale, cu_seqlens,
                    backend):
    """`lasp2_mixture_of_memories` with delta-rule memories: the affine run of every
    (memory, row) stream overlapped with the exchange of the (memory, segment) summaries
    (M, U) of the stream of the segment's last document (`DenseOverlapped`); each
    memory's incoming state then enters the tokens of the segment's first document, if
    that document started before the segment (`reach`)."""
    M = plan.num_memories
    phases, local = mom_affine_phases(q, k, v, weights, plan, g, g_gamma, gk=gk, beta=beta, scale=scale,
                                      backend=backend)
    summaries, reach = _memory_summaries(layout, plan, cu_seqlens)
    cut = None if reach is None else summaries.to_exchange([(reach != layout.segment_len).repeat(M)])
    o0, x, incoming = DenseOverlapped.apply(*local, phases, AutoExchange(layout, group, (False,)), summaries, cut)
    o = plan.combine(o0[0], weights, backend) + mom_dense_state_output(x, _per_row(summaries, incoming, M), weights,
                                                                       plan, reach)
    return o.to(q.dtype)


def _memory_summaries(layout, plan: MoMPlan, cu_seqlens):
    """Where each (memory, segment) summary comes from, `(Summaries, reach)`: the
    exchange's batch dim holds (memory, batch row), every memory its own chain. Unpacked:
    stream m·R + b·nseg + s (memory m on batch row b, segment s), reach None; packed: per
    memory the stream of the segment's last document (`document_edges`)."""
    M, nseg = plan.num_memories, len(layout.local_segments)
    if cu_seqlens is None:
        return Summaries(M * plan.indices.shape[0], nseg, (None,)), None
    _, last_doc, reach, _ = document_edges(layout, cu_seqlens)
    streams = torch.arange(M, device=last_doc.device)[:, None] * plan.num_rows + last_doc
    return Summaries(M, nseg, (streams.flatten(),)), reach


def _per_row(summaries, incoming, M: int):
    """The exchanged incoming states as [rows (batch row, segment), M, H, K, V]."""
    return summaries.from_exchange(incoming)[0].unflatten(0, (M, -1)).transpose(0, 1)


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
    comm.all_reduce(totals, group=group)
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
