"""What a layer needs to know about the tokens it holds.

A layer's forward takes ``layout`` (a `SequenceLayout`, or None when the whole sequence
is local), ``group`` (the SP process group) and ``cu_seqlens`` (packed documents of the
WHOLE sequence, the same on every rank). `SPContext` is what `lasp.parallelize` attaches
to a model: the group and the layout kind, from which each forward builds the layout of
its batch's length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lasp.parallel.layout import KINDS, SequenceLayout


@dataclass(frozen=True)
class SPContext:
    """A sequence-parallel group seen from this rank, and how sequences are split over it."""

    world_size: int
    rank: int
    kind: str = "contiguous"
    group: Any = None  # torch.distributed ProcessGroup; None: the default group

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"layout kind must be one of {KINDS}, got {self.kind!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a group of {self.world_size}")

    @classmethod
    def from_group(cls, group=None, kind: str = "contiguous") -> "SPContext":
        """The context of `group` (default: the whole world; one rank without torch.distributed)."""
        if not dist.is_initialized():
            if group is not None:
                raise ValueError("a process group was given but torch.distributed is not initialised")
            return cls(1, 0, kind)
        return cls(dist.get_world_size(group), dist.get_rank(group), kind, group)

    def layout(self, seq_len: int) -> SequenceLayout:
        """The layout of a `seq_len`-token sequence (raises if W does not divide it)."""
        return SequenceLayout(seq_len, self.world_size, self.rank, self.kind)

    def local_layout(self, local_len: int) -> SequenceLayout:
        """The layout under which this rank holds `local_len` tokens."""
        return self.layout(local_len * self.world_size)


def check_local_len(layout: SequenceLayout, local_len: int) -> None:
    if local_len != layout.local_len:
        raise ValueError(f"the input holds {local_len} tokens, but {layout} puts {layout.local_len} "
                         "tokens on this rank")


def token_positions(layout: SequenceLayout | None, local_len: int, device) -> torch.Tensor:
    """Global positions of the local tokens: the layout's, or 0..T-1 on a single device."""
    if layout is None:
        return torch.arange(local_len, device=device)
    check_local_len(layout, local_len)
    return layout.positions(device)


def local_segments(layout: SequenceLayout | None, local_len: int) -> list[tuple[int, int]]:
    """(local start, length) of each contiguous run of global tokens held here, in local order."""
    if layout is None:
        return [(0, local_len)]
    check_local_len(layout, local_len)
    L = layout.segment_len
    return [(i * L, L) for i in range(len(layout.local_segments))]


def document_starts(positions: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Global position where each token's packed document starts (0 without packing). No sync."""
    if cu_seqlens is None:
        return torch.zeros_like(positions)
    cu = cu_seqlens.to(device=positions.device, dtype=torch.int64)
    index = torch.searchsorted(cu, positions, right=True) - 1
    return cu[index.clamp(0, cu.numel() - 1)]
