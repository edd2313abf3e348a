"""The token-by-token spec against forms written independently here: explicit K×K
transition matrices for every family, float64."""

import pytest
import torch

from lasp.kernels.naive import naive_linear_attention
from tests.utils import random_cu_seqlens, random_decay, rel_err


def _matrix_recurrence(q, k, v, gate, beta, scale, h0):
    """S_t = M_t S_{t-1} + W_t with M_t, W_t built as dense matrices, one row, one head at a time."""
    B, T, H, K = q.shape
    o = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            S = h0[b, h].clone()
            for t in range(T):
                if "gk" in gate:
                    A = torch.diag(gate["gk"][b, t, h].exp())
                elif "g" in gate:
                    A = gate["g"][b, t, h].exp() * torch.eye(K, dtype=torch.float64)
                else:
                    A = torch.eye(K, dtype=torch.float64)
                kk, vv = k[b, t, h], v[b, t, h]
                if beta is None:
                    S = A @ S + torch.outer(kk, vv)
                else:
                    P = torch.eye(K, dtype=torch.float64) - beta[b, t, h] * torch.outer(kk, kk)
                    S = P @ A @ S + beta[b, t, h] * torch.outer(kk, vv)
                o[b, t, h] = scale * q[b, t, h] @ S
    return o


@pytest.mark.parametrize("decay", [None, "g", "gk"])
@pytest.mark.parametrize("delta", [False, True])
def test_naive_matches_explicit_transition_matrices(decay, delta):
    B, T, H, K, V = 2, 9, 2, 4, 3
    q, k, v = (torch.randn(B, T, H, d, dtype=torch.float64) for d in (K, K, V))
    k = k / k.norm(dim=-1, keepdim=True)             # the delta rule's layers normalise keys
    gate = random_decay(decay, B, T, H, K, requires_grad=False)
    beta = torch.rand(B, T, H, dtype=torch.float64) if delta else None
    h0 = torch.randn(B, H, K, V, dtype=torch.float64)
    o, _ = naive_linear_attention(q, k, v, **gate, beta=beta, scale=0.5, initial_state=h0)
    assert rel_err(o, _matrix_recurrence(q, k, v, gate, beta, 0.5, h0)) < 1e-13


def test_packed_documents_run_alone():
    q, k, v = (torch.randn(1, 10, 2, 4, dtype=torch.float64) for _ in range(3))
    gate = random_decay("gk", 1, 10, 2, 4, requires_grad=False)
    cu = random_cu_seqlens([3, 0, 1, 6])
    o, s = naive_linear_attention(q, k, v, **gate, scale=1.0, cu_seqlens=cu, output_final_state=True)
    start = 4
    alone, s_alone = naive_linear_attention(q[:, start:], k[:, start:], v[:, start:], gk=gate["gk"][:, start:],
                                            scale=1.0, output_final_state=True)
    assert torch.equal(o[:, start:], alone) and torch.equal(s[3], s_alone[0])
    assert not s[1].any()                             # the empty document keeps the zero state
