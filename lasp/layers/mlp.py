"""SwiGLU feed-forward block (Llama's MLP; parameter names match Hugging Face Llama), and
`token_tiles`, which runs a token-wise function over the sequence a tile at a time."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class SwiGLU(nn.Module):
    """`down(silu(gate(x)) · up(x))`. Token-wise, so it needs nothing from the sequence layout."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def token_tiles(fn: Callable[..., torch.Tensor], x: torch.Tensor, tile_tokens: int, *more: torch.Tensor
                ) -> torch.Tensor:
    """fn(x, *more) for a token-wise `fn` of x [B, T, ...] (and of further [B, T, ...] tensors
    `more`, tiled alike), `tile_tokens` tokens at a time (0: all at once).

    Under autograd each tile runs under activation checkpointing, so fn's intermediates (the
    SwiGLU's four [tile, intermediate] tensors, a norm's fp32 copies) exist for one tile at a
    time, in the forward and in the backward, and only the tiles' inputs are saved (views of x).
    The same per-token math as fn(x); weight gradients add the tiles' shares (DeepSpeed ALST's
    tiled MLP, here also for the norms)."""
    if tile_tokens <= 0 or x.shape[1] <= tile_tokens:
        return fn(x, *more)
    # one SplitBackward per input joins the tiles' input gradients
    tiles = zip(*(t.split(tile_tokens, dim=1) for t in (x, *more)))
    if torch.is_grad_enabled():
        return torch.cat([checkpoint(fn, *tile, use_reentrant=False) for tile in tiles], dim=1)
    return torch.cat([fn(*tile) for tile in tiles], dim=1)
