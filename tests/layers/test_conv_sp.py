"""The short convolution under sequence parallelism: each segment's left context comes from
the previous global segment (another rank's), documents still mask it, gradients flow back."""

import pytest
import torch

from lasp.layers import ShortConv
from lasp.loss import sum_gradients
from lasp.parallel import SequenceLayout
from tests.distributed import run_distributed
from tests.utils import random_cu_seqlens, rel_err


def _conv_body(rank, W):
    for kind in ("contiguous", "zigzag"):
        _check_conv(rank, W, kind, [24 * W])                        # one document
        _check_conv(rank, W, kind, [7, 1, 12 * W - 10, 2, 12 * W])  # documents across boundaries


def _check_conv(rank, W, kind, lengths):
    torch.manual_seed(0)
    conv = ShortConv(5, 4).double()
    T = sum(lengths)
    x = torch.randn(1, T, 5, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(1, T, 5, dtype=torch.float64)
    cu = random_cu_seqlens(lengths) if len(lengths) > 1 else None
    out = conv(x, cu_seqlens=cu)
    dx, dw = torch.autograd.grad(out, (x, conv.weight), cot)

    layout = SequenceLayout(T, W, rank, kind)
    x_local = layout.shard(x.detach()).requires_grad_()
    out_local = conv(x_local, layout=layout, cu_seqlens=cu)
    assert rel_err(out_local, layout.shard(out)) < 1e-14
    conv.zero_grad()
    out_local.backward(layout.shard(cot))
    sum_gradients(conv)
    assert rel_err(x_local.grad, layout.shard(dx)) < 1e-14
    assert rel_err(conv.weight.grad, dw) < 1e-13


@pytest.mark.parametrize("W", [2, 3])
def test_short_conv_crosses_ranks(W):
    run_distributed(_conv_body, W)


def test_short_conv_needs_segments_as_long_as_its_context():
    conv = ShortConv(3, 4)
    layout = SequenceLayout(8, 1, 0, "zigzag")                  # segments of 4 ≥ 3: fine
    conv(torch.randn(1, 8, 3), layout=layout)
    with pytest.raises(ValueError, match="segments of at least 3"):
        conv(torch.randn(1, 4, 3), layout=SequenceLayout(4, 1, 0, "zigzag"))
