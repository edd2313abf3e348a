"""The oracle checks itself: naive token-by-token recurrence vs the chunked torch form,
float64, outputs and every gradient, ≤ 1e-10."""

import pytest
import torch

from lasp.kernels import chunk_linear_attention, linear_attention, naive_linear_attention
from tests.utils import grads, random_cu_seqlens, random_inputs, rel_err

TOL = 1e-10


def _compare(B, T, H, K, V, decay, cu=None, with_h0=True, causal=True, chunk_size=16):
    n = B if cu is None else cu.numel() - 1
    q, k, v, g, g_gamma, h0 = random_inputs(B, T, H, K, V, decay=decay, n_states=n if with_h0 else None)
    gate = g if g_gamma is None else g_gamma[None, None].expand(B, T, H)
    scale = K ** -0.5
    kw = dict(scale=scale, initial_state=h0, output_final_state=True, cu_seqlens=cu, causal=causal)
    o_ref, s_ref = naive_linear_attention(q, k, v, gate, **kw)
    o, s = chunk_linear_attention(q, k, v, gate, chunk_size=chunk_size, **kw)
    assert rel_err(o, o_ref) < TOL
    assert rel_err(s, s_ref) < TOL
    do, ds = torch.randn_like(o), torch.randn_like(s)
    inputs = [q, k, v, g, g_gamma, h0]
    for a, b in zip(grads([o, s], inputs, [do, ds]), grads([o_ref, s_ref], inputs, [do, ds])):
        assert rel_err(a, b) < TOL


@pytest.mark.parametrize("decay", [None, "g_gamma", "g"])
@pytest.mark.parametrize("T", [1, 15, 37, 64])
def test_chunked_matches_naive(decay, T):
    _compare(2, T, 2, 8, 12, decay)


@pytest.mark.parametrize("decay", [None, "g"])
def test_chunked_matches_naive_packed(decay):
    cu = random_cu_seqlens([1, 17, 5, 33, 16])
    _compare(1, 72, 2, 8, 8, decay, cu=cu)


def test_chunked_matches_naive_without_initial_state():
    _compare(1, 40, 3, 6, 10, "g", with_h0=False)


def test_noncausal_matches_naive():
    _compare(2, 29, 2, 8, 8, None, causal=False)
    _compare(1, 40, 2, 8, 8, None, cu=random_cu_seqlens([11, 29]), causal=False)


def test_public_torch_backend_is_the_chunked_form():
    q, k, v, g, _, h0 = random_inputs(1, 70, 2, 16, 16, decay="g", n_states=1)
    o, s = linear_attention(q, k, v, g, initial_state=h0, output_final_state=True, backend="torch")
    o_ref, s_ref = naive_linear_attention(q, k, v, g, scale=16 ** -0.5, initial_state=h0,
                                          output_final_state=True)
    assert rel_err(o, o_ref) < TOL and rel_err(s, s_ref) < TOL


def test_packed_documents_do_not_leak():
    """Changing one packed document leaves every other document's outputs unchanged."""
    cu = random_cu_seqlens([20, 30, 14])
    q, k, v, g, _, _ = random_inputs(1, 64, 2, 8, 8, decay="g", requires_grad=False)
    o1, _ = linear_attention(q, k, v, g, cu_seqlens=cu)
    k2 = k.clone()
    k2[:, 20:50] = torch.randn_like(k2[:, 20:50])
    o2, _ = linear_attention(q, k2, v, g, cu_seqlens=cu)
    assert torch.equal(o1[:, :20], o2[:, :20]) and torch.equal(o1[:, 50:], o2[:, 50:])
    assert not torch.allclose(o1[:, 20:50], o2[:, 20:50])


@pytest.mark.parametrize("log_decay", [-30.0, -300.0])
def test_strong_decay_gradients(log_decay):
    """g = −30 (and −300) per token: every gradient, dg included, matches the naive
    recurrence to 1e-10 in float64 through the public torch backend, across chunks,
    packed documents, initial and final states. dg is then ~exp(g) times the other
    gradients' size, so a form that cancels q·dq against k·dk (size ~1) loses it all."""
    cu = random_cu_seqlens([50, 1, 45])
    q, k, v, g, _, h0 = random_inputs(1, 96, 2, 8, 8, decay="g", n_states=3)
    g = (g.detach() * 0 + log_decay * (1 + 0.1 * torch.rand_like(g))).requires_grad_()
    kw = dict(scale=0.5, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    o_ref, s_ref = naive_linear_attention(q, k, v, g, **kw)
    o, s = linear_attention(q, k, v, g, backend="torch", **kw)
    do, ds = torch.randn_like(o), torch.randn_like(s)
    inputs = [q, k, v, g, h0]
    got, want = grads([o, s], inputs, [do, ds]), grads([o_ref, s_ref], inputs, [do, ds])
    errors = {name: rel_err(a, b) for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), got, want)}
    assert all(err < TOL for err in errors.values()), errors


def test_noncausal_packed_has_no_host_loop():
    """The bidirectional form (pieces on the device, no `.tolist()`) against the naive
    per-document loop in float64, every gradient: empty, length-1 and multi-piece
    documents (pieces of 8 tokens here), with and without an initial state."""
    from lasp.kernels.scalar.chunk import noncausal_linear_attention

    cu = random_cu_seqlens([0, 19, 1, 0, 8, 34, 0])
    q, k, v, _, _, h0 = random_inputs(1, 62, 2, 6, 5, decay=None, n_states=7)
    for initial in (None, h0):
        kw = dict(scale=0.4, initial_state=initial, output_final_state=True, cu_seqlens=cu)
        o, s = noncausal_linear_attention(q, k, v, piece_tokens=8, **kw)
        o_ref, s_ref = naive_linear_attention(q, k, v, causal=False, **kw)
        assert rel_err(o, o_ref) < TOL and rel_err(s, s_ref) < TOL
        inputs = [x for x in (q, k, v, initial) if x is not None]
        do, ds = torch.randn_like(o), torch.randn_like(s)
        for a, b in zip(grads([o, s], inputs, [do, ds]), grads([o_ref, s_ref], inputs, [do, ds])):
            assert rel_err(a, b) < TOL


@pytest.mark.gpu
def test_gpu_noncausal_packed_without_host_sync():
    """Bidirectional attention on packed CUDA input, forward and backward, under
    `no_host_sync`, against the float64 naive loop."""
    from lasp.sync import no_host_sync

    cu = random_cu_seqlens([700, 1, 0, 1347], "cuda")
    q, k, v, _, _, _ = random_inputs(1, 2048, 4, 64, 64, decay=None, dtype=torch.float32, device="cuda")
    with no_host_sync():
        o, _ = linear_attention(q, k, v, cu_seqlens=cu, causal=False)
        dq, dk, dv = torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o_ref, _ = naive_linear_attention(*ref, scale=64 ** -0.5, cu_seqlens=cu, causal=False)
    assert rel_err(o, o_ref) < 1e-5
    for a, b in zip((dq, dk, dv), torch.autograd.grad(o_ref, ref, torch.ones_like(o_ref))):
        assert rel_err(a, b) < 1e-5
