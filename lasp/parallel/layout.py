"""`SequenceLayout`: which tokens of a sequence each sequence-parallel rank holds.

Every sequence-parallel piece follows one layout: the data loader's sharding, RoPE
positions, the linear layers' segment order and the softmax layers' masks.

- ``contiguous``: the sequence is cut into W equal segments; rank r holds segment r.
- ``zigzag``: the sequence is cut into 2W segments; rank r holds segments r and
  2W−1−r, in that order, which balances causal softmax work across ranks.

Segments are the unit of the LASP-2 scan: a rank's local tokens are its segments
concatenated in local order, and each segment is an independent entry of the scan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from lasp.parallel.comm import all_gather

KINDS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class SequenceLayout:
    """The split of a `seq_len`-token sequence over `world_size` ranks, seen from `rank`."""

    seq_len: int
    world_size: int
    rank: int
    kind: str = "contiguous"

    def __post_init__(self):
        for name in ("seq_len", "world_size", "rank"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise TypeError(f"SequenceLayout.{name} must be an int, got {getattr(self, name)!r}")
        if self.kind not in KINDS:
            raise ValueError(f"SequenceLayout.kind must be one of {KINDS}, got {self.kind!r}")
        if self.world_size < 1:
            raise ValueError(f"SequenceLayout.world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"SequenceLayout.rank must be in [0, {self.world_size}), got {self.rank}")
        if self.seq_len <= 0 or self.seq_len % self.num_segments:
            raise ValueError(
                f"SequenceLayout.seq_len={self.seq_len} must be a positive multiple of "
                f"{self.num_segments} ({self.kind} layout over {self.world_size} ranks)")

    @property
    def num_segments(self) -> int:
        """Segments of the whole sequence: W (contiguous) or 2W (zigzag)."""
        return self.world_size * (2 if self.kind == "zigzag" else 1)

    @property
    def segment_len(self) -> int:
        return self.seq_len // self.num_segments

    @property
    def local_len(self) -> int:
        return self.segment_len * len(self.local_segments)

    @property
    def local_segments(self) -> tuple[int, ...]:
        """Global indices of this rank's segments, in local order."""
        return self.segments_of(self.rank)

    def segments_of(self, rank: int) -> tuple[int, ...]:
        if self.kind == "zigzag":
            return (rank, self.num_segments - 1 - rank)
        return (rank,)

    def owner(self, segment: int) -> int:
        """The rank that holds global segment `segment`."""
        return segment if segment < self.world_size else self.num_segments - 1 - segment

    def segment_bounds(self) -> list[tuple[int, int]]:
        """Global [start, end) token ranges of the local segments, in local order."""
        L = self.segment_len
        return [(s * L, (s + 1) * L) for s in self.local_segments]

    def check_input(self, name: str, x: torch.Tensor, dim: int = 1, local: bool = True) -> None:
        """Raise if `x` does not hold this layout's local (or full) number of tokens on `dim`."""
        want = self.local_len if local else self.seq_len
        if x.dim() <= dim or x.shape[dim] != want:
            what = "local" if local else "full"
            raise ValueError(f"{name} must hold the {what} {want} tokens on dim {dim} for {self}, "
                             f"got shape {tuple(x.shape)}")

    def check_group(self, group=None) -> None:
        """Raise on this rank if the layout does not describe `group` (before any collective)."""
        if not dist.is_initialized():
            if self.world_size != 1:
                raise ValueError(f"{self} needs an initialised process group of {self.world_size} ranks")
            return
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        if (size, rank) != (self.world_size, self.rank):
            raise ValueError(f"layout is for rank {self.rank} of {self.world_size}, but this process is "
                             f"rank {rank} of {size} in the process group")

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of a full-sequence tensor, in local order."""
        self.check_input("x", x, dim, local=False)
        pieces = [x.narrow(dim, start, end - start) for start, end in self.segment_bounds()]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)

    def unshard(self, x_local: torch.Tensor, dim: int = 1, group=None) -> torch.Tensor:
        """All ranks' local tokens back in global order (a collective over `group`).

        Differentiable: the gradient of `x_local` is the gradient of its tokens SUMMED over
        the ranks (`lasp.parallel.comm.all_gather`), as lasp's SP loss contract wants (the
        ranks' losses add up). If every rank computes one and the same loss from the result,
        that is W times its gradient.
        """
        self.check_input("x_local", x_local, dim)
        if self.world_size == 1:
            return x_local
        self.check_group(group)
        gathered = all_gather(x_local.movedim(dim, 0), group)    # [W · local_len, ...] in rank order
        L = self.segment_len
        by_segment = [None] * self.num_segments
        for rank in range(self.world_size):
            for i, segment in enumerate(self.segments_of(rank)):
                by_segment[segment] = gathered.narrow(0, rank * self.local_len + i * L, L)
        return torch.cat(by_segment, 0).movedim(0, dim)

    def positions(self, device=None) -> torch.Tensor:
        """Global positions of the local tokens (LongTensor [local_len])."""
        return torch.cat([torch.arange(s, e, device=device) for s, e in self.segment_bounds()])

    def local_cu_seqlens(self, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """The global packed documents clipped to each local segment, as local offsets.

        Returns [(N+1) · segments] offsets (same dtype and device): for each local segment
        in order, `clamp(cu_seqlens, start, end) − start` shifted by the segment's local
        offset. Documents that miss a segment become empty entries, so the shape does not
        depend on the values (no host sync), and every segment starts a new local sequence.
        """
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D [N+1], got shape {tuple(cu_seqlens.shape)}")
        parts = []
        for i, (start, end) in enumerate(self.segment_bounds()):
            parts.append(cu_seqlens.clamp(start, end) - start + i * self.segment_len)
        return torch.cat(parts)
