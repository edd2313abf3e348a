"""LASP-2 (and its LASP-1 baseline): linear attention over a sequence sharded across ranks.

Each rank holds the tokens of its segments (`SequenceLayout`). Linear attention is
linear in its initial state (`lasp.kernels.state`), so each rank runs its segments as
independent sequences from a zero state and corrects them once the incoming states are
known (for the decay families: identity, scalar and diagonal transitions). The local
kernel comes split at its data dependencies
(`lasp.kernels.linear_attention_phases`) and `Overlapped` interleaves it with the
summary exchange (`lasp.parallel.scan`: for LASP-2 `AutoExchange`, one all-gather, or
at large world sizes a log-depth prefix scan; a point-to-point ring for LASP-1) so that
an all-gather is in flight while local work that does not need its result runs (the
prefix scan and the ring are synchronous and run where the wait is):

    forward:  summarize (each local document's final state)  -> issue the gather of the
              segment summaries -> output (the zero-state outputs o0, the bulk of the
              kernel) -> wait, scan -> each local segment's incoming state
    backward: issue the gather of the incoming-state gradients -> grad_q (the dq pass)
              -> wait, suffix scan -> the summaries' gradients -> grad_kvg (dk, dv, d decay)

Around it, in autograd: a segment's summary is `(A, U)`: `U` = the final state of the
local document holding its last token and `A` = the composition of its tokens'
transitions (`lasp.kernels.run_transition`), cut to the zero map when a packed document
starts inside the segment (the chain stops there); the correction
`apply_state_output(q, S_in, reach=...)` is added to o0 (the incoming state reaches
only the tokens before the segment's first document start), and its backward gives the
incoming-state gradients before `Overlapped`'s backward starts.

Bidirectional attention (`causal=False`, plain) is the same with two chains: every
token of a document reads the document's whole state, i.e. its own segment's part
(`o0`) plus the parts of the same document to its left (forward chain, entering the
segment's first document) and to its right (reverse chain over the state of each
segment's first document, entering the segment's last document from the end).

Packed documents (`cu_seqlens` of the WHOLE sequence, the same on every rank, B = 1) go
to the kernel as `layout.local_cu_seqlens`, whose size does not depend on the values;
every per-segment index (which local document holds a segment's first/last token, how
far the incoming state reaches) comes from `searchsorted` on the device: no host sync.
Without packing, B >= 1 rows are reshaped to B·nseg independent rows.

The delta rule (`beta`) has dense transitions (`_dense_transitions`): its run is affine in
the incoming state too, o = o0 + x S_in, with x (the queries through the dense
transitions) from the run itself: the delta family's affine phases run the values
widened by K identity columns, which give each segment's summary (M, U), o0 and x, and
`DenseOverlapped` interleaves them with the exchange in the same order as `Overlapped`;
`dense_state_output` adds x S_in.

All math is `lasp.kernels`; this module only reshapes, indexes, orders and exchanges.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lasp.kernels.checks import check_cu_seqlens, check_qkv
from lasp.kernels.linear_attention import Call, check_call, plan_affine_phases, plan_phases, run_linear_attention
from lasp.kernels.common.documents import accumulation_dtype
from lasp.kernels.state import apply_state_output, dense_state_output
from lasp.kernels.transition import Transition, run_transition
from lasp.parallel.layout import SequenceLayout
from lasp.parallel.scan import AllGatherScan, AutoExchange, RingScan


def lasp2_linear_attention(q, k, v, g=None, g_gamma=None, *, gk=None, beta=None, layout, group=None,
                           scale=None, causal=True, cu_seqlens=None):
    """Sequence-parallel `linear_attention` with LASP-2: one all-gather of fixed-size
    segment summaries per forward and one per backward (from 32 ranks, or 16 with large
    states, a log-depth prefix scan instead: `lasp.parallel.scan.default_exchange`).

    Args:
        q, k: [B, layout.local_len, H, K]; v: [B, layout.local_len, H, V]: this rank's
            tokens in local order (`layout.shard`).
        g: [B, local_len, H] per-token log-decays of the local tokens, or g_gamma: [H],
            or gk: [B, local_len, H, K] per-key log-decays; at most one.
        beta: [B, local_len, H]: the delta rule (with none, g or gk), causal only.
        layout: the `SequenceLayout` of this rank in `group` (default: the world group).
        scale, causal: as in `lasp.kernels.linear_attention` (causal=False: plain only).
        cu_seqlens: int [N+1] packed documents of the WHOLE sequence (B must be 1), the
            same tensor on every rank.
    Returns o: [B, local_len, H, V], this rank's outputs, differentiable in q, k, v and
    the decay (g_gamma's gradient is this rank's share: sum it over the group).

    Bad input raises on every rank before any collective.
    """
    return sequence_parallel_linear_attention(q, k, v, g, g_gamma, gk=gk, beta=beta, layout=layout,
                                              group=group, scale=scale, causal=causal, cu_seqlens=cu_seqlens,
                                              exchange=AutoExchange)


def lasp1_linear_attention(q, k, v, g=None, g_gamma=None, *, gk=None, beta=None, layout, group=None,
                           scale=None, causal=True, cu_seqlens=None):
    """`lasp2_linear_attention` with the LASP-1 ring exchange (the benchmarks' baseline):
    the running state goes point-to-point from each segment's owner to the next one's,
    and the state gradients go back the same way. Same arguments and results."""
    return sequence_parallel_linear_attention(q, k, v, g, g_gamma, gk=gk, beta=beta, layout=layout,
                                              group=group, scale=scale, causal=causal, cu_seqlens=cu_seqlens,
                                              exchange=RingScan)


def sequence_parallel_linear_attention(q, k, v, g=None, g_gamma=None, *, gk=None, beta=None, layout,
                                       group=None, scale=None, causal=True, cu_seqlens=None,
                                       exchange=AllGatherScan, backend=None):
    """The local work shared by LASP-2 and LASP-1 around `exchange`, an exchange class of
    `lasp.parallel.scan` built as `exchange(layout, group, reverse)`: `AutoExchange`
    (LASP-2's choice), `AllGatherScan`, `functools.partial(AllGatherScan, overlap=False)`
    (the gather forced synchronous, for benchmarks), `PrefixScan` or `RingScan` (LASP-1).
    `backend`: the local kernel's, as in `linear_attention` (the CPU tests run the Triton
    kernels under the interpreter)."""
    call = _check_inputs(q, k, v, g, g_gamma, gk, beta, layout, group, scale, causal, cu_seqlens, backend)
    if layout.world_size == 1:      # the local tokens are the whole sequence, in order
        return run_linear_attention(q, k, v, call, causal=causal, cu_seqlens=cu_seqlens)[0]
    if call.beta is not None:
        return _dense_transitions(q, k, v, call, layout, group, cu_seqlens, exchange)
    B, _, H, _ = q.shape
    nseg, L = len(layout.local_segments), layout.segment_len
    R = B * nseg                    # independent rows: (batch row, local segment)

    def rows(x):
        return None if x is None else x.reshape(R, L, *x.shape[2:])

    tokens = call.tokens if call.tokens.param is None else Transition(call.tokens.kind, rows(call.tokens.param))
    reverse = (False,) if causal else (False, True)
    if cu_seqlens is None:
        row_call = replace(call, tokens=tokens)
        phases, (q_, k_, v_, decay_, _) = plan_phases(rows(q), rows(k), rows(v), row_call, causal=causal)
        summaries = Summaries(B, nseg, (None,) * len(reverse))
        reach = tail = None
    else:
        phases, (q_, k_, v_, decay_, _) = plan_phases(q, k, v, call, causal=causal,
                                                      cu_seqlens=layout.local_cu_seqlens(cu_seqlens))
        first_doc, last_doc, reach, tail = document_edges(layout, cu_seqlens)
        summaries = Summaries(B, nseg, (last_doc, first_doc)[:len(reverse)])

    acc = accumulation_dtype(q.dtype)

    def passes(edge, transition):
        """The segment's transition, or the zero map where a document boundary stops the chain."""
        return transition if edge is None else transition.cut(edge != L, heads=H, dtype=acc)

    if causal:
        chains = [passes(reach, run_transition(tokens, dim=1, dtype=acc))]
    else:
        chains = [passes(reach, tokens), passes(tail, tokens)]
    transitions = summaries.transitions(chains)
    o0, incoming = Overlapped.apply(q_, k_, v_, decay_, transitions.param, transitions.kind, phases,
                                     exchange(layout, group, reverse), summaries)
    from_left, *from_right = summaries.from_exchange(incoming)

    q_rows, scale = rows(q), call.scale
    if causal:
        extra = apply_state_output(q_rows, from_left, tokens, scale=scale, reach=reach)
    elif reach is None:
        extra = apply_state_output(q_rows, from_left + from_right[0], tokens, scale=scale)
    else:                           # the state from the right enters the last document, from the end
        extra = (apply_state_output(q_rows, from_left, tokens, scale=scale, reach=reach)
                 + apply_state_output(q_rows.flip(1), from_right[0], tokens, scale=scale, reach=tail).flip(1))
    return (o0.reshape(extra.shape) + extra).reshape(B, nseg * L, *extra.shape[2:])


@dataclass(frozen=True)
class Summaries:
    """Where each chain's segment summaries come from and the exchange's order.

    `documents[c]`: per local row (batch row, local segment), the index of the local
    document whose final state is the row's summary in chain c, or None: the row's own
    document (unpacked input). The exchange orders rows as [nseg, C, B, ...].
    """

    B: int
    nseg: int
    documents: tuple

    def to_exchange(self, per_chain):
        """[R, ...] per chain -> [nseg, C, B, ...]."""
        return torch.stack([x.view(self.B, self.nseg, *x.shape[1:]).transpose(0, 1)
                            for x in per_chain], 1)

    def from_exchange(self, x):
        """[nseg, C, B, ...] -> [R, ...] per chain."""
        return [x[:, c].transpose(0, 1).reshape(self.B * self.nseg, *x.shape[3:])
                for c in range(x.shape[1])]

    def transitions(self, per_chain):
        """The segments' transitions of every chain ([R, H, ...] each) in exchange order."""
        kind = per_chain[0].kind
        if kind == "identity":
            return per_chain[0]
        return Transition(kind, self.to_exchange([t.param for t in per_chain]))

    def select(self, final):
        """The summaries [nseg, C, B, H, K, V] from the local final states."""
        return self.to_exchange([final if doc is None else final.index_select(0, doc)
                                 for doc in self.documents])

    def select_backward(self, d_summaries, n_final):
        """The final states' gradient [n_final, H, K, V] from the summaries'."""
        total = None
        for doc, d in zip(self.documents, self.from_exchange(d_summaries)):
            if doc is not None:
                d = d.new_zeros(n_final, *d.shape[1:]).index_add_(0, doc, d)
            total = d if total is None else total + d
        return total


class Overlapped(torch.autograd.Function):
    """The zero-state local kernel (`phases`) and the summary exchange, in the order of the
    module docstring: (q, k, v, decay, segment transitions, *extra) -> (o0, incoming
    states [nseg, C, B, H, K, V]).

    `extra`: further differentiable inputs of the phases (MoM's routing weights,
    `lasp.kernels.mom.mom_phases`), passed after `saved` / `do` / `d_final` to output, grad_q
    and grad_kvg; grad_kvg then returns their gradients after (dk, dv, d decay, dh0).
    """

    @staticmethod
    def forward(ctx, q, k, v, decay, param, kind, phases, exchange, summaries, *extra):
        final, saved = phases.summarize(k, v, decay, None)
        pending = exchange.start(summaries.select(final), Transition(kind, param))
        o0 = phases.output(q, k, v, decay, saved, *extra)
        incoming, ctx.exchange_saved = exchange.finish(pending)
        ctx.save_for_backward(q, k, v, decay, *extra, *saved)
        ctx.n_final, ctx.n_extra = final.shape[0], len(extra)
        ctx.phases, ctx.exchange, ctx.summaries = phases, exchange, summaries
        return o0, incoming

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, d_incoming):
        q, k, v, decay, *saved = ctx.saved_tensors
        extra, saved = saved[:ctx.n_extra], saved[ctx.n_extra:]
        pending = ctx.exchange.start_backward(d_incoming)
        dq, partial = ctx.phases.grad_q(q, k, v, decay, saved, do, *extra)
        d_summaries, d_param = ctx.exchange.finish_backward(pending, ctx.exchange_saved)
        d_final = ctx.summaries.select_backward(d_summaries, ctx.n_final)
        dk, dv, d_decay, _, *d_extra = ctx.phases.grad_kvg(q, k, v, decay, saved, partial, d_final, *extra,
                                                           want_dg=ctx.needs_input_grad[3], want_dh0=False)
        return dq, dk, dv, d_decay, d_param, None, None, None, None, *d_extra


class DenseOverlapped(torch.autograd.Function):
    """`Overlapped` for dense transitions (the delta rule): the local run as an affine map
    of its incoming state (the delta family's affine phases) and the exchange of its
    summaries (M, U): (q, k, v, decay, beta) -> (o0, x, incoming [nseg, 1, B, H, K, V]).

        forward:  summarize ((U, M) of each local document) -> issue the gather of the
                  segments' (M, U) -> output (o0 and x, the bulk of the kernel) -> wait, scan
        backward: issue the gather of the incoming-state gradients -> the outputs' dδ
                  -> wait, suffix scan -> dU, dM -> the rest of the backward

    `cut` (bool [nseg, 1, B], or None): where a document starts inside the segment, whose
    transition is then the zero map (`Transition.cut`).
    """

    @staticmethod
    def forward(ctx, q, k, v, decay, beta, phases, exchange, summaries, cut):
        (states, matrices), saved = phases.summarize(k, v, decay, beta)
        transitions = Transition.dense(summaries.select(matrices))
        pending = exchange.start(summaries.select(states), transitions if cut is None else transitions.cut(cut))
        o0, x = phases.output(q, k, v, decay, beta, saved)
        incoming, ctx.exchange_saved = exchange.finish(pending)
        ctx.save_for_backward(q, k, v, decay, beta, cut, *saved)
        ctx.n_final, ctx.phases, ctx.exchange, ctx.summaries = states.shape[0], phases, exchange, summaries
        return o0, x, incoming

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dx, d_incoming):
        q, k, v, decay, beta, cut, *saved = ctx.saved_tensors
        inputs = (q, k, v, decay, beta)
        pending = ctx.exchange.start_backward(d_incoming)
        partial = ctx.phases.output_grad(*inputs, saved, do, dx)
        d_states, d_matrices = ctx.exchange.finish_backward(pending, ctx.exchange_saved)
        if cut is not None:
            d_matrices = d_matrices.masked_fill(cut[..., None, None, None], 0.0)
        dq, dk, dv, d_decay, d_beta = ctx.phases.grad(
            *inputs, saved, partial, ctx.summaries.select_backward(d_states, ctx.n_final),
            ctx.summaries.select_backward(d_matrices, ctx.n_final))
        return dq, dk, dv, d_decay, d_beta, None, None, None, None


def _dense_transitions(q, k, v, call, layout, group, cu_seqlens, exchange):
    """LASP-2 for the delta rule, whose transitions are dense K×K matrices: the local run
    as an affine map of its incoming state, o = o0 + x S_in (the delta family's affine
    phases, one run over the values widened by K identity columns), overlapped with the
    exchange as the other families (`DenseOverlapped`).

    A segment's summary is (M, U): M its dense transition, U its zero-start final state
    (of its last local document); M is cut to zero where a document starts inside the
    segment, and the incoming state reaches only the tokens of a document that started
    before the segment (`reach`).
    """
    B, _, H, _ = q.shape
    nseg, L = len(layout.local_segments), layout.segment_len
    R = B * nseg

    def rows(x):
        return None if x is None else x.reshape(R, L, *x.shape[2:])

    if cu_seqlens is None:
        tokens = call.tokens if call.tokens.param is None else Transition(call.tokens.kind, rows(call.tokens.param))
        row_call = replace(call, tokens=tokens, beta=rows(call.beta))
        phases, local = plan_affine_phases(rows(q), rows(k), rows(v), row_call)
        summaries, cut, reach = Summaries(B, nseg, (None,)), None, None
    else:
        phases, local = plan_affine_phases(q, k, v, call, cu_seqlens=layout.local_cu_seqlens(cu_seqlens))
        _, last_doc, reach, _ = document_edges(layout, cu_seqlens)
        summaries = Summaries(B, nseg, (last_doc,))
        cut = summaries.to_exchange([reach != L])
    o0, x, incoming = DenseOverlapped.apply(*local, phases, exchange(layout, group, (False,)), summaries, cut)
    incoming, = summaries.from_exchange(incoming)
    o = o0.reshape(R, L, H, -1) + dense_state_output(x.reshape(R, L, H, -1), incoming, reach)
    return o.to(q.dtype).reshape(B, nseg * L, H, -1)


def _check_inputs(q, k, v, g, g_gamma, gk, beta, layout, group, scale, causal, cu_seqlens, backend) -> Call:
    """All checks, once: every rank raises the same error before any collective."""
    if not isinstance(layout, SequenceLayout):
        raise TypeError(f"layout must be a SequenceLayout, got {type(layout).__name__}")
    layout.check_group(group)
    check_qkv(q, k, v)
    layout.check_input("q", q)
    if cu_seqlens is not None:
        # cu_seqlens spans the whole sequence: check it against the global shape [B, seq_len].
        check_cu_seqlens(cu_seqlens, q.new_empty(q.shape[0], layout.seq_len, 0))
    return check_call(q, k, v, g=g, g_gamma=g_gamma, gk=gk, beta=beta, scale=scale, causal=causal,
                      backend=backend)


def document_edges(layout, cu_seqlens):
    """Per local segment, from the global document offsets (device ops, no sync):

    - first_doc / last_doc: index of the local document (of `layout.local_cu_seqlens`,
      N+1 entries per segment) holding the segment's first / last token;
    - reach: how many leading tokens belong to a document that started before the
      segment (0 when a document starts at its first token; L when none starts in it);
    - tail: how many trailing tokens belong to a document that goes on after the
      segment (0 when a document starts right after it; L when none starts in it after
      its first token).
    """
    L = layout.segment_len
    cu = cu_seqlens.long()
    starts = torch.cat([torch.arange(s * L, s * L + 1, device=cu.device) for s in layout.local_segments])
    ends = starts + L
    base = torch.arange(len(layout.local_segments), device=cu.device) * cu.numel()
    first_doc = base + torch.searchsorted(cu, starts, right=True) - 1
    last_doc = base + torch.searchsorted(cu, ends - 1, right=True) - 1
    reach = cu[torch.searchsorted(cu, starts)].clamp(max=ends) - starts
    tail = ends - cu[torch.searchsorted(cu, ends, right=True) - 1].clamp(min=starts)
    return first_doc, last_doc, reach, tail
