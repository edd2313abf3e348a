"""GLA's per-key decay `gk` [B,T,H,K]: `S_t = diag(exp(gk_t)) S_{t-1} + k_t v_tᵀ`.

- `chunk`: the chunkwise torch form (any dtype; the oracle of the Triton kernels) and
  its `TorchPhases`.
- `triton`: the Triton kernels, their launches (`LAUNCHES`), `triton_linear_attention` and
  `triton_phases` (the host side shared with the other span-walk family:
  `lasp.kernels.common.span_phases`; imported on use: Triton is optional for the torch
  backend).
"""

from lasp.kernels.diagonal.chunk import chunk_linear_attention

__all__ = ["chunk_linear_attention"]
