"""Span geometry: how the Triton kernels cut the token axis into spans, on the device.

Words (glossary in `lasp.kernels`): a *chunk* is the C tokens a kernel tiles; a *span* is
a run of consecutive chunks that one Triton program walks; a *document* is one
`cu_seqlens` entry (an unpacked row counts as one); a *row* is a batch index. Spans never
cross a document boundary.

Unpacked input needs no table: span s is the (s % spans_per_row)-th span of row
s // spans_per_row. Packed input gets a table computed on the device from `cu_seqlens`
(no host sync): the token range of each span and the first span of each document. The
grid is then an upper bound on the number of spans; surplus spans are empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

# Span length: up to MAX_SPAN_CHUNKS chunks, shorter when that leaves fewer than about
# SPAN_PROGRAMS (span, head) pairs, so that small problems still fill the GPU.
MAX_SPAN_CHUNKS = 64
SPAN_PROGRAMS = 128


@dataclass(frozen=True)
class SpanPlan:
    """Span geometry shared by the forward and the backward of one call.

    `n_spans` is the span grid: exact for unpacked input, otherwise the upper bound
    cdiv(T, span_tokens) + N (surplus spans are empty). For
    packed input `span_bounds` (int64 [n_spans, 2]: token range [start, end) of each span
    on the flattened B·T axis), `doc_spans` (int64 [N+1]: first span of each document) and
    `doc_ends` (int64 [N]: cu_seqlens[1:]) are device tensors; None when unpacked.
    """

    B: int
    T: int
    H: int
    K: int
    V: int
    n_docs: int
    chunk: int
    span_tokens: int
    spans_per_row: int
    n_spans: int
    span_bounds: torch.Tensor | None
    doc_spans: torch.Tensor | None
    doc_ends: torch.Tensor | None

    @property
    def varlen(self) -> bool:
        return self.span_bounds is not None

    @property
    def tokens(self) -> int:
        return self.B * self.T

    def span_args(self, dummy: torch.Tensor):
        """The span arguments of every span kernel: the span table (`dummy`, never read, when
        unpacked) and the sizes (T, SPAN_TOKENS, SPANS_PER_ROW)."""
        return (self.span_bounds if self.varlen else dummy), (self.T, self.span_tokens, self.spans_per_row)


def default_span_chunks(tokens: int, H: int, chunk: int) -> int:
    """A power of two in [2, MAX_SPAN_CHUNKS]: long spans amortise the per-span state
    traffic, short ones give more programs. Depends on shapes only (no retuning)."""
    wanted = triton.cdiv(tokens, chunk) * H // SPAN_PROGRAMS
    return max(2, min(MAX_SPAN_CHUNKS, 1 << max(wanted, 1).bit_length() - 1))


def make_span_plan(k, v, cu_seqlens, chunk, span_chunks) -> SpanPlan:
    """The span geometry of keys k [B,T,H,K] and values v [..., V], packed by `cu_seqlens`
    (None, or an int device tensor [N+1]); `chunk` tokens per chunk, `span_chunks` chunks
    per span (None: `default_span_chunks`)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    if not (chunk >= 16 and chunk & (chunk - 1) == 0):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk}")
    if span_chunks is None:
        span_chunks = default_span_chunks(B * T, H, chunk)
    if span_chunks < 1:
        raise ValueError(f"span_chunks must be >= 1, got {span_chunks}")
    span_tokens = chunk * span_chunks
    span_bounds = doc_spans = doc_ends = None
    if cu_seqlens is None:
        # At least one (possibly empty) span per row, so that T == 0 still scans h0.
        n_docs, spans_per_row = B, max(1, triton.cdiv(T, span_tokens))
        n_spans = B * spans_per_row
    else:
        n_docs, spans_per_row = cu_seqlens.numel() - 1, 0
        n_spans = triton.cdiv(T, span_tokens) + n_docs
        cu = cu_seqlens.to(torch.int64)
        spans_of_doc = (cu[1:] - cu[:-1] + span_tokens - 1) // span_tokens
        doc_spans = torch.nn.functional.pad(spans_of_doc.cumsum(0), (1, 0))
        s = torch.arange(n_spans, device=cu.device)
        doc = torch.searchsorted(doc_spans[1:], s, right=True).clamp_(max=n_docs - 1)
        start = cu[doc] + (s - doc_spans[doc]) * span_tokens
        end = torch.minimum(start + span_tokens, cu[doc + 1])
        valid = s < doc_spans[-1]
        span_bounds = torch.stack([start * valid, end * valid], 1).contiguous()
        doc_ends = cu[1:]
    return SpanPlan(B, T, H, K, V, n_docs, chunk, span_tokens, spans_per_row, n_spans,
                    span_bounds, doc_spans, doc_ends)


def document_chunk_slots(cu_seqlens, total: int, chunk: int):
    """Packed documents cut into whole chunks, one slot per chunk: each document's first
    slot (int64 [N+1], device ops; the last entry is the slots used) and the number of
    slots to allocate, cdiv(total, chunk) + N (a bound from shapes, no host sync)."""
    cu = cu_seqlens.to(torch.int64)
    n_docs = cu.numel() - 1
    first = torch.nn.functional.pad(((cu[1:] - cu[:-1] + chunk - 1) // chunk).cumsum(0), (1, 0))
    return first, triton.cdiv(total, chunk) + n_docs


def span_chunk_slots(plan: SpanPlan, device):
    """Each span's first slot in a buffer of one slot per chunk (int64 [n_spans], device
    ops only) and the buffer's number of slots (a host bound from shapes): the slot of
    chunk i of span s is first[s] + i."""
    C, span_chunks = plan.chunk, plan.span_tokens // plan.chunk
    s = torch.arange(plan.n_spans, device=device)
    if not plan.varlen:
        per_row = triton.cdiv(plan.T, C)
        return (s // plan.spans_per_row) * per_row + (s % plan.spans_per_row) * span_chunks, max(1, plan.B * per_row)
    doc_chunk0, n_slots = document_chunk_slots(torch.nn.functional.pad(plan.doc_ends, (1, 0)), plan.T, C)
    doc = torch.searchsorted(plan.doc_spans[1:], s, right=True).clamp_(max=plan.n_docs - 1)
    return doc_chunk0[doc] + (s - plan.doc_spans[doc]) * span_chunks, n_slots
