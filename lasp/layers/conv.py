"""Short causal depthwise convolution whose left context crosses sequence-parallel ranks.

Token t of a width-K convolution reads tokens t−K+1..t. Under sequence parallelism the
first K−1 tokens of each local segment read the tail of the previous GLOBAL segment,
which another rank may hold: every rank all-gathers the (K−1)-token tails of its
segments (one small collective; its backward sums the tails' gradients back to their
owners) and prepends the predecessor's tail. A tap that would reach before the token's
packed document start (or before the sequence start) is masked out, so the convolution
sees neither across ranks incorrectly nor across documents.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lasp.layers.sequence import document_starts, local_segments, token_positions
from lasp.parallel.comm import all_gather


def left_context(x, layout, group, width: int) -> list[torch.Tensor]:
    """For each local segment, the `width` tokens before it in the global sequence ([B, width, C]).

    The first global segment gets zeros (its taps are masked anyway). Differentiable.
    A collective over `group` whenever the layout has more than one rank.
    """
    zeros = x.new_zeros(x.shape[0], width, x.shape[2])
    segments = local_segments(layout, x.shape[1])
    if layout is None or width == 0 or layout.num_segments == 1:  # the same answer on every rank
        return [zeros] * len(segments)
    if layout.segment_len < width:
        raise ValueError(f"a short convolution of width {width + 1} needs segments of at least {width} "
                         f"tokens; {layout} has {layout.segment_len}")
    tails = torch.stack([x[:, start + n - width:start + n] for start, n in segments])
    if layout.world_size > 1:
        layout.check_group(group)
        # [W, segments per rank, B, width, C]; the backward sums each tail's gradient to its owner
        gathered = all_gather(tails, group).unflatten(0, (layout.world_size, len(segments)))
    else:
        gathered = tails[None]
    # table[s] = context of global segment s: zeros, then the tail of segment s−1, picked with
    # Python ints (views: no index tensor goes to the device). Every rank's output depends on
    # the whole table (even rank 0 of a contiguous layout, which only needs zeros), so every
    # rank runs the gather's backward collective.
    previous = [gathered[layout.owner(s), layout.segments_of(layout.owner(s)).index(s)]
                for s in range(layout.num_segments - 1)]
    table = torch.stack([zeros, *previous])
    return [table[s] for s in layout.local_segments]


def short_conv(x, weight, bias=None, *, layout=None, group=None, cu_seqlens=None):
    """Depthwise causal convolution of [B, T, C] local tokens, no activation.

    weight: [C, K] (`[:, -1]` weighs the current token); bias: [C] or None. Taps that reach
    before the token's packed document (or the sequence start) read nothing; the left
    context of each local segment comes from the rank that holds it (`left_context`).
    """
    K = weight.shape[1]
    positions = token_positions(layout, x.shape[1], x.device)
    starts = document_starts(positions, cu_seqlens)
    contexts = left_context(x, layout, group, K - 1)
    outs = []
    for (start, n), context in zip(local_segments(layout, x.shape[1]), contexts):
        padded = torch.cat([context, x[:, start:start + n]], 1)     # [B, K-1+n, C]
        pos, doc = positions[start:start + n], starts[start:start + n]
        y = 0 if bias is None else bias
        for back in range(K):  # the tap `back` tokens before the current one
            inside = (pos - back >= doc).to(x.dtype)[None, :, None]
            y = y + padded[:, K - 1 - back:K - 1 - back + n] * weight[:, K - 1 - back] * inside
        outs.append(y)
    return torch.cat(outs, 1)


class ShortConv(nn.Module):
    """Depthwise causal convolution over time followed by SiLU, on [B, T, C] local tokens."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))  # [:, -1] weighs the current token
        self.reset_parameters()

    @property
    def init_bound(self) -> float:
        """nn.Conv1d's default for a depthwise kernel: uniform(±1/√K)."""
        return 1 / math.sqrt(self.kernel_size)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.uniform_(-self.init_bound, self.init_bound)

    def forward(self, x, *, layout=None, group=None, cu_seqlens=None):
        return F.silu(short_conv(x, self.weight, layout=layout, group=group, cu_seqlens=cu_seqlens))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, kernel_size={self.kernel_size}"
