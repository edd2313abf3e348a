"""Softmax attention and LASP-2H with value heads of another width than query/key heads
(Dv ≠ D, as in MLA: Kimi Linear's softmax layers).

The oracle: values zero-padded to D give the same attention output in the first Dv
columns (and zeros after), through the Dv = D path that tests/kernels and
tests/parallel/test_lasp2h.py check against naive attention.
"""

import pytest
import torch
import torch.nn.functional as F

from lasp.kernels.softmax_attention import flash_attn_available, softmax_attention
from lasp.parallel.lasp2h import lasp2h_attention, ring_attention
from lasp.parallel.layout import SequenceLayout
from tests.distributed import run_distributed
from tests.utils import rel_err

TOL = 1e-12
D = 12


def _inputs(T, Hq, Hkv, Dv, seed, Dqk=D, dtype=torch.float64, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k = (torch.randn(1, T, H, Dqk, dtype=dtype, device=device, generator=g) for H in (Hq, Hkv))
    v = torch.randn(1, T, Hkv, Dv, dtype=dtype, device=device, generator=g)
    do = torch.randn(1, T, Hq, Dv, dtype=dtype, device=device, generator=g)
    return q, k, v, do


def _padded_reference(q, k, v, do, **kwargs):
    """(o, dq, dk, dv) of attention with v zero-padded to D, cut back to Dv columns."""
    full = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    Dv = v.shape[-1]
    o = softmax_attention(full[0], full[1], F.pad(full[2], (0, D - Dv)), backend="math", **kwargs)[..., :Dv]
    return (o, *torch.autograd.grad(o, full, do))


DOCUMENTS = dict(cu_seqlens_q=torch.tensor([0, 5, 5, 13, 16]), cu_seqlens_k=torch.tensor([0, 5, 5, 13, 16]))


def test_narrower_values_match_padded_values():
    """Causal with documents, GQA: output and every gradient."""
    q, k, v, do = _inputs(16, 4, 2, 6, seed=0)
    want = _padded_reference(q, k, v, do, **DOCUMENTS)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    o = softmax_attention(*leaves, **DOCUMENTS)
    for name, a, b in zip(("o", "dq", "dk", "dv"), (o, *torch.autograd.grad(o, leaves, do)), want):
        assert rel_err(a, b) < TOL, name


def test_wider_values_attend_column_block_by_column_block():
    """Attention weights do not depend on v: any D columns of v give those columns of o."""
    q, k, v, _ = _inputs(16, 4, 2, 20, seed=1)
    o = softmax_attention(q, k, v, **DOCUMENTS)
    for cols in (slice(0, D), slice(20 - D, 20)):
        assert rel_err(o[..., cols], softmax_attention(q, k, v[..., cols].contiguous(), **DOCUMENTS)) < TOL


def _lasp2h_body(rank, W):
    """Both layouts, packed documents crossing ranks, one key/value head gathered at a time."""
    for kind in ("contiguous", "zigzag"):
        layout = SequenceLayout(4 * W * (2 if kind == "zigzag" else 1), W, rank, kind)
        T = layout.seq_len
        cu = torch.tensor([0, 3, T - 2, T], dtype=torch.int32)
        q, k, v, do = _inputs(T, 4, 2, 6, seed=1)
        want = _padded_reference(q, k, v, do, cu_seqlens_q=cu, cu_seqlens_k=cu)
        local = [layout.shard(x).requires_grad_() for x in (q, k, v)]
        o = lasp2h_attention(*local, layout=layout, cu_seqlens=cu, heads_per_gather=1)
        got = (o, *torch.autograd.grad(o, local, layout.shard(do)))
        for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
            assert rel_err(a, layout.shard(b)) < TOL, f"{name}, {kind}"


def test_lasp2h_matches_single_device():
    run_distributed(_lasp2h_body, 2)


def test_ring_attention_refuses_values_of_another_width():
    layout = SequenceLayout(8, 1, 0)
    q, k, v, _ = _inputs(8, 2, 2, 6, seed=0)
    with pytest.raises(ValueError, match="ring_attention needs values as wide as the keys"):
        ring_attention(q, k, v, layout=layout)


@pytest.mark.gpu
def test_gpu_backends_take_values_of_another_width():
    """bf16 on CUDA: sdpa (its dispatch skips the flash kernel) and flex against fp32 math;
    the automatic choice never picks flash-attn, which needs Dv = D."""
    q, k, v, do = _inputs(512, 8, 2, 64, seed=0, Dqk=128, dtype=torch.bfloat16, device="cuda")  # as MLA's 192 / 128
    leaves = [x.requires_grad_() for x in (q, k, v)]
    o_ref = softmax_attention(*(x.float() for x in leaves), backend="math")
    want = torch.autograd.grad(o_ref, leaves, do.float())
    for backend in ("sdpa", "flex", None):
        o = softmax_attention(*leaves, backend=backend)
        assert rel_err(o, o_ref) < 1e-2, backend
        for a, b in zip(torch.autograd.grad(o, leaves, do), want):
            assert rel_err(a, b) < 1e-2, backend
    if flash_attn_available():
        with pytest.raises(ValueError, match="values as wide as the queries"):
            softmax_attention(*leaves, backend="flash_attn")
