"""The chunked loss equals full cross-entropy, in value and gradient, and skips ignored tokens."""

import pytest
import torch
import torch.nn.functional as F

from lasp.loss import chunk_loss, chunked_cross_entropy
from tests.utils import rel_err


def _check_against_full_cross_entropy(chunk_size, scoring=chunk_loss):
    torch.manual_seed(0)
    hidden = torch.randn(2, 31, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 31))
    labels[0, :5] = -100
    labels[1, -1] = -100
    full = F.cross_entropy((hidden @ weight.T).view(-1, 50), labels.view(-1), reduction="sum")
    chunked = chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk_size, scoring=scoring)
    assert rel_err(chunked, full) < 1e-14
    for a, b in zip(torch.autograd.grad(chunked, (hidden, weight)), torch.autograd.grad(full, (hidden, weight))):
        assert rel_err(a, b) < 1e-13


@pytest.mark.parametrize("chunk_size", [5, 64, 1000])
def test_chunked_loss_matches_full_cross_entropy(chunk_size):
    _check_against_full_cross_entropy(chunk_size)


def test_compiled_scoring_matches_full_cross_entropy():
    """`lasp-train --compile`'s scoring: `chunk_loss` compiled (the shorter last chunk retraces)."""
    torch._dynamo.reset()
    _check_against_full_cross_entropy(5, torch.compile(chunk_loss, backend="aot_eager"))


def test_chunked_loss_accumulates_in_fp32_for_bf16():
    hidden, weight = torch.randn(9, 8, dtype=torch.bfloat16), torch.randn(11, 8, dtype=torch.bfloat16)
    assert chunked_cross_entropy(hidden, weight, torch.randint(0, 11, (9,)), chunk_size=4).dtype == torch.float32


def test_chunked_loss_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="labels"):
        chunked_cross_entropy(torch.randn(2, 5, 4), torch.randn(7, 4), torch.zeros(2, 4, dtype=torch.long))
