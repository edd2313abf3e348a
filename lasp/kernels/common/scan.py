"""The span-summary scan: each span's incoming state from the spans before it, on the device.

A span maps the state entering it to the state leaving it affinely::

    S_out = A_s(S_in) + U_s

where U_s is the span's local state (walked from zero) and A_s its transition, given by
its log-decay: none (plain), one number per head (scalar decay, [NS, H]: A_s(S) =
exp(G_s) S), or one per key dimension (per-key decay, [NS, H, K]: row k of the state is
scaled by exp(G_s[k])). The scan walks a document's spans in order and replaces each U_s
in place with the state entering span s; the backward runs the same scan in reverse on
the state gradients (every A_s here is symmetric, so its adjoint is itself).
"""

from __future__ import annotations

import triton
import triton.language as tl

from lasp.kernels.common.launch import LAUNCH, launch_kw
from lasp.kernels.common.plan import SpanPlan

# The scan kernel's DECAY switch: the shape of each span's log-decay.
DECAY_NONE, DECAY_SCALAR, DECAY_PER_KEY = 0, 1, 2


@triton.jit
def scan_kernel(U, span_decay, init, out, doc_spans, SPANS_PER_ROW,
                H: tl.constexpr, V: tl.constexpr, KV: tl.constexpr, BLOCK: tl.constexpr,
                DECAY: tl.constexpr, HAS_INIT: tl.constexpr, STORE_OUT: tl.constexpr,
                REVERSE: tl.constexpr, VARLEN: tl.constexpr):
    """Scan one document's span summaries: U_s is replaced by the carried value at s.

    Forward: carried = incoming state, carried ← A_s(carried) + U_s, starting from `init`
    (initial state) and ending in `out` (final state). REVERSE runs the spans backwards
    with the state gradients (dU_s in, outgoing-state gradient out, `init` = d final
    state, `out` = d initial state). DECAY: 0 none, 1 scalar (`span_decay` [NS, H]), 2 per
    key (`span_decay` [NS, H, K], K = KV / V).
    """
    n = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < KV
    if VARLEN:
        first = tl.load(doc_spans + n)
        count = tl.load(doc_spans + n + 1) - first
    else:
        first = n * SPANS_PER_ROW
        count = SPANS_PER_ROW
    state_offs = (n.to(tl.int64) * H + h) * KV + offs
    if HAS_INIT:
        carried = tl.load(init + state_offs, mask=mask, other=0.0)
    else:
        carried = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(count):
        if REVERSE:
            s = (first + count - 1 - i).to(tl.int64)
        else:
            s = (first + i).to(tl.int64)
        ptrs = U + (s * H + h) * KV + offs
        summary = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, carried, mask=mask)
        if DECAY == 1:
            carried = carried * tl.exp(tl.load(span_decay + s * H + h))
        elif DECAY == 2:
            K: tl.constexpr = KV // V
            decay = tl.load(span_decay + (s * H + h) * K + offs // V, mask=mask, other=0.0)
            carried = carried * tl.exp(decay)
        carried += summary
    if STORE_OUT:
        tl.store(out + state_offs, carried, mask=mask)


def scan_spans(states, span_decay, initial, final, plan: SpanPlan, *, reverse: bool) -> None:
    """Scan every document's spans in place (`scan_kernel`).

    states: fp32 [NS, H, K, V] span summaries, overwritten with each span's carried value;
    span_decay: None, fp32 [NS, H] or [NS, H, K] log-decay of each span; initial: None or
    fp32 [N, H, K, V] (initial state, or d final state when `reverse`); final: None or an
    fp32 [N, H, K, V] buffer for the final state (d initial state when `reverse`).
    """
    KV = plan.K * plan.V
    dummy = states
    if span_decay is None:
        decay = DECAY_NONE
    else:
        decay = DECAY_SCALAR if span_decay.dim() == 2 else DECAY_PER_KEY
    block = LAUNCH["scan"].block
    scan_kernel[(plan.n_docs, plan.H, triton.cdiv(KV, block))](
        states, dummy if span_decay is None else span_decay, dummy if initial is None else initial,
        dummy if final is None else final, plan.doc_spans if plan.varlen else dummy, plan.spans_per_row,
        H=plan.H, V=plan.V, KV=KV, BLOCK=block, DECAY=decay, HAS_INIT=initial is not None,
        STORE_OUT=final is not None, REVERSE=reverse, VARLEN=plan.varlen, **launch_kw("scan"))
