"""Pieces that every recurrence family's kernels share (STYLE.md §3).

- `launch`: `CHUNK_SIZE` (the one definition) and each Triton family's `FAMILY_CHUNK`, the
  launch table `LAUNCH`, tile choice and the output allocation `new_tensor`.
- `plan`: packed `cu_seqlens` -> the span table on the device (`SpanPlan`).
- `tiles`: `@triton.jit` helpers (span bounds, tile loads and stores, state pointers,
  query rows, the decayed outer-product accumulation).
- `scan`: the span-summary scan kernel and its launcher (`scan_spans`).
- `documents`: the torch side: `accumulation_dtype`, `matmul_dtype`, the per-document loop and the
  generic `TorchPhases`.

Nothing is imported here: `launch`, `plan`, `tiles` and `scan` need Triton, which the
torch backend does not.
"""
