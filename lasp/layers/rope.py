"""Rotary position embedding at given (global) positions, in Llama's half-split convention."""

from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate x [B, T, H, D] by the angles of `positions` [T].

    Angles are computed in float64: at a million tokens, position × frequency in fp32 is
    off by a few hundredths of a radian.
    """
    D = x.shape[-1]
    if D % 2:
        raise ValueError(f"RoPE needs an even head dim, got {D}")
    inv_freq = theta ** -(torch.arange(0, D, 2, dtype=torch.float64, device=x.device) / D)
    angles = positions.to(device=x.device, dtype=torch.float64)[:, None] * inv_freq   # [T, D/2]
    angles = torch.cat([angles, angles], -1)[None, :, None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x.chunk(2, -1)
    return x * cos + torch.cat([-second, first], -1) * sin
