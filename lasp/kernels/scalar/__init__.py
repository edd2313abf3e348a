"""Plain linear attention and a scalar decay per head (`g_gamma`) or per head and token (`g`).

- `chunk`: the chunkwise torch form (any dtype; the oracle of the Triton kernels).
- `triton`: the Triton kernels, their launches (`LAUNCHES`), `triton_linear_attention` and
  `triton_phases` (the host side shared with the other span-walk family:
  `lasp.kernels.common.span_phases`; imported on use: Triton is optional for the torch
  backend).
"""

from lasp.kernels.scalar.chunk import chunk_linear_attention

__all__ = ["chunk_linear_attention"]
