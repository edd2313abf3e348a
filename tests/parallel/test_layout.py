"""SequenceLayout: shard/unshard round trip, positions, local cu_seqlens, bad input."""

import pytest
import torch

from lasp.parallel import SequenceLayout
from tests.distributed import run_distributed


@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_shards_partition_the_sequence(kind, W):
    T = 2 * W * 5
    x = torch.randn(2, T, 3)
    seen = torch.zeros(T, dtype=torch.long)
    for r in range(W):
        layout = SequenceLayout(T, W, r, kind)
        pos = layout.positions()
        assert torch.equal(layout.shard(x), x[:, pos])
        seen[pos] += 1
    assert torch.equal(seen, torch.ones(T, dtype=torch.long))


def test_zigzag_segment_order():
    layout = SequenceLayout(16, 2, 0, "zigzag")
    assert layout.local_segments == (0, 3)
    assert layout.positions().tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert [layout.owner(s) for s in range(4)] == [0, 1, 1, 0]


def test_local_cu_seqlens_clips_documents_to_segments():
    cu = torch.tensor([0, 5, 9, 24], dtype=torch.int32)
    layout = SequenceLayout(24, 3, 1, "zigzag")          # segments [4, 8) and [16, 20)
    assert layout.local_cu_seqlens(cu).tolist() == [0, 1, 4, 4, 4, 4, 4, 8]
    assert layout.local_cu_seqlens(cu).dtype == torch.int32


def _unshard_body(rank, W):
    T = 4 * W
    g = torch.Generator().manual_seed(0)
    full = torch.randn(2, T, 3, dtype=torch.float64, generator=g)
    cotangents = torch.randn(W, 2, T, 3, dtype=torch.float64, generator=g)   # each rank's own
    for kind in ("contiguous", "zigzag"):
        layout = SequenceLayout(T, W, rank, kind)
        assert torch.equal(layout.unshard(layout.shard(full)), full)
        # A tensor that requires grad: differentiable on every rank, its gradient summed over the ranks.
        x_local = layout.shard(full).requires_grad_()
        y = layout.unshard(x_local)
        assert torch.equal(y, full)
        (dx,) = torch.autograd.grad(y, x_local, cotangents[rank])
        assert torch.allclose(dx, layout.shard(cotangents.sum(0)), rtol=1e-14, atol=0), kind


@pytest.mark.parametrize("W", [2, 3])
def test_unshard_restores_global_order_and_is_differentiable(W):
    run_distributed(_unshard_body, W)


@pytest.mark.parametrize("args, match", [
    ((10, 3, 0, "contiguous"), "multiple of 3"),
    ((15, 3, 0, "zigzag"), "multiple of 6"),
    ((12, 3, 3, "contiguous"), "rank"),
    ((12, 3, 0, "ring"), "kind"),
    ((12.0, 3, 0, "contiguous"), "seq_len"),
])
def test_bad_layouts_raise(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SequenceLayout(*args)


def _group_mismatch_body(rank, W):
    with pytest.raises(ValueError, match="layout is for rank"):
        SequenceLayout(12, 3, 0).check_group()


def test_layout_group_mismatch_raises_on_every_rank():
    run_distributed(_group_mismatch_body, 2)
