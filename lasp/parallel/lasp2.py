"""LASP-2 (and its LASP-1 baseline): linear attention over a sequence sharded across ranks.

Each rank holds the tokens of its segments (`SequenceLayout`). Linear attention is
linear in its initial state (`lasp.kernels.state`), so each rank runs its segments as
independent sequences from a zero state and corrects them once the incoming states are
known. The local kernel comes split at its data dependencies
(`lasp.kernels.linear_attention_phases`) and `_Overlapped` interleaves it with the
summary exchange (`lasp.parallel.scan`: one all-gather for LASP-2, a point-to-point ring
for LASP-1) so that each collective is in flight while local work that does not need
its result runs:

    forward:  summarize (each local sequence's final state)  -> issue the gather of the
              segment summaries -> output (the zero-state outputs o0, the bulk of the
              kernel) -> wait, scan -> each local segment's incoming state
    backward: issue the gather of the incoming-state gradients -> grad_q (the dq pass)
              -> wait, suffix scan -> the summaries' gradients -> grad_kvg (dk, dv, dg)

Around it, in autograd: a segment's summary is `U` = the final state of the local
sequence holding its last token and `a` = its log-transition (`segment_log_decay`, or
-inf when a packed document starts inside the segment: the chain stops there); the
correction `state_output(q, S_in, reach=...)` is added to o0 (the incoming state reaches
only the tokens before the segment's first document start), and its backward gives the
incoming-state gradients before `_Overlapped`'s backward starts.

Bidirectional attention (`causal=False`, plain) is the same with two chains: every
token of a document reads the document's whole state, i.e. its own segment's part
(`o0`) plus the parts of the same document to its left (forward chain, entering the
segment's first document) and to its right (reverse chain over the state of each
segment's first document, entering the segment's last document from the end).

Packed documents (`cu_seqlens` of the WHOLE sequence, the same on every rank, B = 1) go
to the kernel as `layout.local_cu_seqlens`, whose size does not depend on the values;
every per-segment index (which local sequence holds a segment's first/last token, how
far the incoming state reaches) comes from `searchsorted` on the device: no host sync.
Without packing, B >= 1 rows are reshaped to B·nseg independent rows.

All math is `lasp.kernels`; this module only reshapes, indexes, orders and exchanges.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lasp.kernels import linear_attention, linear_attention_phases, segment_log_decay, state_output
from lasp.kernels.checks import check_cu_seqlens, check_decay, check_qkv
from lasp.parallel.layout import SequenceLayout
from lasp.parallel.scan import AllGatherScan, RingScan


def lasp2_linear_attention(q, k, v, g=None, g_gamma=None, *, layout, group=None, scale=None,
                           causal=True, cu_seqlens=None):
    """Sequence-parallel `linear_attention` with LASP-2: one all-gather of fixed-size
    segment summaries per forward and one per backward.

    Args:
        q, k: [B, layout.local_len, H, K]; v: [B, layout.local_len, H, V]: this rank's
            tokens in local order (`layout.shard`).
        g: [B, local_len, H] log-decays of the local tokens, or g_gamma: [H]; at most one.
        layout: the `SequenceLayout` of this rank in `group` (default: the world group).
        scale, causal: as in `lasp.kernels.linear_attention` (causal=False: plain only).
        cu_seqlens: int [N+1] packed documents of the WHOLE sequence (B must be 1), the
            same tensor on every rank.
    Returns o: [B, local_len, H, V], this rank's outputs, differentiable in q, k, v, g,
    g_gamma (whose gradient is this rank's share: sum it over the group).

    Bad input raises on every rank before any collective.
    """
    return sequence_parallel_linear_attention(q, k, v, g, g_gamma, layout=layout, group=group,
                                              scale=scale, causal=causal, cu_seqlens=cu_seqlens,
                                              exchange=AllGatherScan)


def lasp1_linear_attention(q, k, v, g=None, g_gamma=None, *, layout, group=None, scale=None,
                           causal=True, cu_seqlens=None):
    """`lasp2_linear_attention` with the LASP-1 ring exchange (the benchmarks' baseline):
    the running state goes point-to-point from each segment's owner to the next one's,
    and the state gradients go back the same way. Same arguments and results."""
    return sequence_parallel_linear_attention(q, k, v, g, g_gamma, layout=layout, group=group,
                                              scale=scale, causal=causal, cu_seqlens=cu_seqlens,
                                              exchange=RingScan)


def sequence_parallel_linear_attention(q, k, v, g=None, g_gamma=None, *, layout, group=None,
                                       scale=None, causal=True, cu_seqlens=None,
                                       exchange=AllGatherScan, backend=None):
    """The local work shared by LASP-2 and LASP-1 around `exchange`, an exchange class of
    `lasp.parallel.scan` built as `exchange(layout, group, reverse)`: `AllGatherScan`,
    `functools.partial(AllGatherScan, overlap=False)` (the gather forced synchronous, for
    benchmarks) or `RingScan`. `backend`: the local kernel's, as in `linear_attention`
    (the CPU tests run the Triton kernels under the interpreter)."""
    _check_inputs(q, k, v, g, g_gamma, layout, group, causal, cu_seqlens)
    if layout.world_size == 1:      # the local tokens are the whole sequence, in order
        return linear_attention(q, k, v, g, g_gamma, scale=scale, causal=causal,
                                cu_seqlens=cu_seqlens, backend=backend)[0]
    B, _, H, _ = q.shape
    nseg, L = len(layout.local_segments), layout.segment_len
    R = B * nseg                    # independent rows: (batch row, local segment)

    def rows(x):
        return None if x is None else x.reshape(R, L, *x.shape[2:])

    reverse = (False,) if causal else (False, True)
    if cu_seqlens is None:
        phases, (q_, k_, v_, g_, _) = linear_attention_phases(
            rows(q), rows(k), rows(v), rows(g), g_gamma, scale=scale, causal=causal, backend=backend)
        summaries = _Summaries(B, nseg, (None,) * len(reverse))
        reach = tail = None
    else:
        phases, (q_, k_, v_, g_, _) = linear_attention_phases(
            q, k, v, g, g_gamma, scale=scale, causal=causal, backend=backend,
            cu_seqlens=layout.local_cu_seqlens(cu_seqlens))
        first_seq, last_seq, reach, tail = _document_edges(layout, cu_seqlens)
        summaries = _Summaries(B, nseg, (last_seq, first_seq)[:len(reverse)])

    def passes(edge, log_decay):
        """The segment's log-transition, or -inf where a document boundary stops the chain."""
        return log_decay if edge is None else log_decay.masked_fill((edge != L)[:, None], float("-inf"))

    q_rows = rows(q)
    if causal:
        log_decays = [passes(reach, segment_log_decay(q_rows, rows(g), g_gamma))]
    else:
        zero = segment_log_decay(q_rows)
        log_decays = [passes(reach, zero), passes(tail, zero)]
    o0, incoming = _Overlapped.apply(q_, k_, v_, g_, summaries.to_exchange(log_decays), phases,
                                     exchange(layout, group, reverse), summaries)
    from_left, *from_right = summaries.from_exchange(incoming)

    if causal:
        extra = state_output(q_rows, from_left, rows(g), g_gamma, scale=scale, reach=reach)
    elif reach is None:
        extra = state_output(q_rows, from_left + from_right[0], scale=scale)
    else:                           # the state from the right enters the last document, from the end
        extra = (state_output(q_rows, from_left, scale=scale, reach=reach)
                 + state_output(q_rows.flip(1), from_right[0], scale=scale, reach=tail).flip(1))
    return (o0.reshape(extra.shape) + extra).reshape(B, nseg * L, *extra.shape[2:])


@dataclass(frozen=True)
class _Summaries:
    """Where each chain's segment summaries come from and the exchange's order.

    `sequences[c]`: per row (batch row, local segment), the index of the local sequence
    whose final state is the row's summary in chain c, or None: the row's own sequence
    (unpacked input). The exchange orders rows as [nseg, C, B, ...].
    """

    B: int
    nseg: int
    sequences: tuple

    def to_exchange(self, per_chain):
        """[R, ...] per chain -> [nseg, C, B, ...]."""
        return torch.stack([x.view(self.B, self.nseg, *x.shape[1:]).transpose(0, 1)
                            for x in per_chain], 1)

    def from_exchange(self, x):
        """[nseg, C, B, ...] -> [R, ...] per chain."""
        return [x[:, c].transpose(0, 1).reshape(self.B * self.nseg, *x.shape[3:])
                for c in range(x.shape[1])]

    def select(self, final):
        """The summaries [nseg, C, B, H, K, V] from the local final states."""
        return self.to_exchange([final if seq is None else final.index_select(0, seq)
                                 for seq in self.sequences])

    def select_backward(self, d_summaries, n_final):
        """The final states' gradient [n_final, H, K, V] from the summaries'."""
        total = None
        for seq, d in zip(self.sequences, self.from_exchange(d_summaries)):
            if seq is not None:
                d = d.new_zeros(n_final, *d.shape[1:]).index_add_(0, seq, d)
            total = d if total is None else total + d
        return total


class _Overlapped(torch.autograd.Function):
    """The zero-state local kernel (`phases`) and the summary exchange, in the order of the
    module docstring: (q, k, v, g, log_decays) -> (o0, incoming states [nseg, C, B, H, K, V]).
    """

    @staticmethod
    def forward(ctx, q, k, v, g, log_decays, phases, exchange, summaries):
        final, saved = phases.summarize(k, v, g, None)
        pending = exchange.start(summaries.select(final), log_decays)
        o0 = phases.output(q, k, v, g, saved)
        incoming, exchange_saved = exchange.finish(pending)
        ctx.save_for_backward(q, k, v, g, *saved, *exchange_saved)
        ctx.n_saved, ctx.n_final = len(saved), final.shape[0]
        ctx.phases, ctx.exchange, ctx.summaries = phases, exchange, summaries
        return o0, incoming

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, d_incoming):
        q, k, v, g, *rest = ctx.saved_tensors
        saved, exchange_saved = rest[:ctx.n_saved], rest[ctx.n_saved:]
        pending = ctx.exchange.start_backward(d_incoming)
        dq, partial = ctx.phases.grad_q(q, k, v, g, saved, do)
        d_summaries, d_log_decays = ctx.exchange.finish_backward(pending, exchange_saved)
        d_final = ctx.summaries.select_backward(d_summaries, ctx.n_final)
        dk, dv, dg, _ = ctx.phases.grad_kvg(q, k, v, g, saved, partial, d_final,
                                            want_dg=ctx.needs_input_grad[3], want_dh0=False)
        return dq, dk, dv, dg, d_log_decays, None, None, None


def _check_inputs(q, k, v, g, g_gamma, layout, group, causal, cu_seqlens) -> None:
    """Shape, dtype and group checks: every rank raises the same error before any collective."""
    if not isinstance(layout, SequenceLayout):
        raise TypeError(f"layout must be a SequenceLayout, got {type(layout).__name__}")
    layout.check_group(group)
    check_qkv(q, k, v)
    layout.check_input("q", q)
    check_decay(g, g_gamma, q, causal)
    if cu_seqlens is not None:
        # cu_seqlens spans the whole sequence: check it against the global shape [B, seq_len].
        check_cu_seqlens(cu_seqlens, q.new_empty(q.shape[0], layout.seq_len, 0))


def _document_edges(layout, cu_seqlens):
    """Per local segment, from the global document offsets (device ops, no sync):

    - first_seq / last_seq: index of the local sequence (of `layout.local_cu_seqlens`,
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
    first_seq = base + torch.searchsorted(cu, starts, right=True) - 1
    last_seq = base + torch.searchsorted(cu, ends - 1, right=True) - 1
    reach = cu[torch.searchsorted(cu, starts)].clamp(max=ends) - starts
    tail = ends - cu[torch.searchsorted(cu, ends, right=True) - 1].clamp(min=starts)
    return first_seq, last_seq, reach, tail
