"""LASP-2 (and its LASP-1 baseline): linear attention over a sequence sharded across ranks.

Each rank holds the tokens of its segments (`SequenceLayout`). Linear attention is
linear in its initial state (`lasp.kernels.state`), so each rank

1. runs ONE local `linear_attention` call on its segments as independent sequences
   (zero initial state) -> the zero-state output `o0` and every local sequence's final
   state;
2. summarises each segment: `U` = the final state of the local sequence holding the
   segment's last token, `a` = the segment's log-transition (`segment_log_decay`, or
   -inf when a packed document starts inside the segment: the chain stops there);
3. exchanges the summaries (`lasp.parallel.scan`: one all-gather for LASP-2, a
   point-to-point ring for LASP-1) and gets each local segment's incoming state;
4. adds `state_output(q, S_in, reach=...)`: the incoming state reaches only the tokens
   before the segment's first document start.

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

All math is `lasp.kernels`; this module only reshapes, indexes and exchanges.
"""

from __future__ import annotations

import torch

from lasp.kernels import linear_attention, segment_log_decay, state_output
from lasp.kernels.checks import check_cu_seqlens, check_decay, check_qkv
from lasp.parallel.layout import SequenceLayout
from lasp.parallel.scan import all_gather_scan, ring_scan


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
                                              exchange=all_gather_scan)


def lasp1_linear_attention(q, k, v, g=None, g_gamma=None, *, layout, group=None, scale=None,
                           causal=True, cu_seqlens=None):
    """`lasp2_linear_attention` with the LASP-1 ring exchange (the benchmarks' baseline):
    the running state goes point-to-point from each segment's owner to the next one's,
    and the state gradients go back the same way. Same arguments and results."""
    return sequence_parallel_linear_attention(q, k, v, g, g_gamma, layout=layout, group=group,
                                              scale=scale, causal=causal, cu_seqlens=cu_seqlens,
                                              exchange=ring_scan)


def sequence_parallel_linear_attention(q, k, v, g=None, g_gamma=None, *, layout, group=None,
                                       scale=None, causal=True, cu_seqlens=None,
                                       exchange=all_gather_scan):
    """The local work shared by LASP-2 and LASP-1 around `exchange`, a function of
    `lasp.parallel.scan` (e.g. `functools.partial(all_gather_scan, overlap=False)`)."""
    _check_inputs(q, k, v, g, g_gamma, layout, group, causal, cu_seqlens)
    if layout.world_size == 1:      # the local tokens are the whole sequence, in order
        return linear_attention(q, k, v, g, g_gamma, scale=scale, causal=causal,
                                cu_seqlens=cu_seqlens)[0]
    B, _, H, _ = q.shape
    nseg, L = len(layout.local_segments), layout.segment_len
    R = B * nseg                    # independent rows: (batch row, local segment)

    def rows(x):
        return None if x is None else x.reshape(R, L, *x.shape[2:])

    def by_segment(x):              # [R, ...] -> [nseg, B, ...], the exchange's order
        return x.view(B, nseg, *x.shape[1:]).transpose(0, 1)

    if cu_seqlens is None:
        o0, final = linear_attention(rows(q), rows(k), rows(v), rows(g), g_gamma, scale=scale,
                                     causal=causal, output_final_state=True)
        last = first = final
        reach = tail = None
    else:
        o0, final = linear_attention(q, k, v, g, g_gamma, scale=scale, causal=causal,
                                     cu_seqlens=layout.local_cu_seqlens(cu_seqlens),
                                     output_final_state=True)
        first_seq, last_seq, reach, tail = _document_edges(layout, cu_seqlens)
        last, first = final.index_select(0, last_seq), final.index_select(0, first_seq)

    def passes(edge, log_decay):
        """The segment's log-transition, or -inf where a document boundary stops the chain."""
        return log_decay if edge is None else log_decay.masked_fill((edge != L)[:, None], float("-inf"))

    if causal:
        chains = [(last, passes(reach, segment_log_decay(rows(q), rows(g), g_gamma)))]
    else:
        zero = final.new_zeros(R, H)
        chains = [(last, passes(reach, zero)), (first, passes(tail, zero))]
    incoming = exchange(torch.stack([by_segment(s) for s, _ in chains], 1),
                        torch.stack([by_segment(a) for _, a in chains], 1),
                        layout, group, reverse=(False, True)[:len(chains)])
    from_left, *from_right = (incoming[:, c].transpose(0, 1).reshape(R, *incoming.shape[3:])
                              for c in range(len(chains)))

    q_rows = rows(q)
    if causal:
        extra = state_output(q_rows, from_left, rows(g), g_gamma, scale=scale, reach=reach)
    elif reach is None:
        extra = state_output(q_rows, from_left + from_right[0], scale=scale)
    else:                           # the state from the right enters the last document, from the end
        extra = (state_output(q_rows, from_left, scale=scale, reach=reach)
                 + state_output(q_rows.flip(1), from_right[0], scale=scale, reach=tail).flip(1))
    return (o0.reshape(extra.shape) + extra).reshape(B, nseg * L, *extra.shape[2:])


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
