"""The public op: argument checks, the backend choice, and the state decomposition."""

import pytest
import torch

from lasp.kernels import linear_attention, segment_log_decay, state_output
from tests.utils import random_cu_seqlens, random_inputs, rel_err


def _qkv(B=1, T=8, H=2, K=16, V=16, dtype=torch.float32):
    return torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, K, dtype=dtype), \
        torch.randn(B, T, H, V, dtype=dtype)


BAD_INPUTS = [
    (lambda q, k, v: dict(k=k[:, :4]), ValueError, "k must have the shape of q"),
    (lambda q, k, v: dict(v=v[..., :1, :]), ValueError, "v must be"),
    (lambda q, k, v: dict(q=q[0]), ValueError, "q must have 4 dimensions"),
    (lambda q, k, v: dict(k=k.double()), TypeError, "share one dtype"),
    (lambda q, k, v: dict(q=q.int(), k=k.int(), v=v.int()), TypeError, "q must be bf16"),
    (lambda q, k, v: dict(q=q.expand(2, -1, -1, -1), k=k.expand(2, -1, -1, -1),
                          v=v.expand(2, -1, -1, -1), cu_seqlens=torch.tensor([0, 8])),
     ValueError, "batch size 1"),
    (lambda q, k, v: dict(cu_seqlens=torch.tensor([0, 3, 7])), ValueError, "end at T=8"),
    (lambda q, k, v: dict(cu_seqlens=torch.tensor([0, 5, 3, 8])), ValueError, "non-decreasing"),
    (lambda q, k, v: dict(cu_seqlens=torch.tensor([0.0, 8.0])), TypeError, "cu_seqlens must be int"),
    (lambda q, k, v: dict(g=torch.rand(1, 8, 2)), ValueError, "g holds log-decays"),
    (lambda q, k, v: dict(g_gamma=torch.tensor([-0.1, 0.2])), ValueError, "g_gamma holds log-decays"),
    (lambda q, k, v: dict(g=-torch.rand(1, 8, 3)), ValueError, r"g must have shape \(1, 8, 2\)"),
    (lambda q, k, v: dict(g=-torch.rand(1, 8, 2), g_gamma=-torch.rand(2)), ValueError, "at most one"),
    (lambda q, k, v: dict(g=-torch.rand(1, 8, 2), causal=False), ValueError, "causal=False"),
    (lambda q, k, v: dict(initial_state=torch.zeros(2, 2, 16, 16)), ValueError, "initial_state must have shape"),
    (lambda q, k, v: dict(backend="cuda"), ValueError, "backend must be one of"),
    (lambda q, k, v: dict(q=q.double(), k=k.double(), v=v.double(), backend="triton"),
     TypeError, "float64"),
]


@pytest.mark.parametrize("make, error, match", BAD_INPUTS)
def test_bad_inputs_raise_naming_the_argument(make, error, match):
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v)
    args.update(make(q, k, v))
    with pytest.raises(error, match=match):
        linear_attention(**args)


@pytest.mark.parametrize("K, V", [(8, 64), (64, 320)])
def test_triton_rejects_unsupported_head_dims(K, V):
    q, k, v = _qkv(K=K, V=V)
    with pytest.raises(ValueError, match="head dims 16..256"):
        linear_attention(q, k, v, backend="triton")


def test_default_backend_on_cpu_is_torch_and_handles_any_dtype():
    q, k, v = _qkv(dtype=torch.bfloat16)
    o, s = linear_attention(q, k, v, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32 and s.shape == (1, 2, 16, 16)


@pytest.mark.parametrize("decay", [None, "g_gamma", "g"])
def test_initial_state_enters_linearly(decay):
    """o(S) = o(0) + state_output(S) and S_out(S) = S_out(0) + exp(segment_log_decay)·S."""
    q, k, v, g, g_gamma, h0 = random_inputs(2, 37, 2, 8, 12, decay=decay, n_states=2)
    o, s = linear_attention(q, k, v, g, g_gamma, initial_state=h0, output_final_state=True)
    o0, s0 = linear_attention(q, k, v, g, g_gamma, output_final_state=True)
    assert rel_err(o0 + state_output(q, h0, g, g_gamma), o) < 1e-12
    carried = segment_log_decay(q, g, g_gamma).exp()[..., None, None] * h0
    assert rel_err(s0 + carried, s) < 1e-12


def test_state_output_reach_limits_the_state_to_the_first_tokens():
    q, _, _, g, _, h0 = random_inputs(2, 10, 1, 4, 4, decay="g", n_states=2, requires_grad=False)
    out = state_output(q, h0, g, reach=torch.tensor([3, 10]))
    full = state_output(q, h0, g)
    assert torch.equal(out[0, :3], full[0, :3]) and not out[0, 3:].any()
    assert torch.equal(out[1], full[1])


def test_gradient_of_fixed_decay_is_the_sum_over_tokens():
    q, k, v, _, g_gamma, _ = random_inputs(1, 20, 2, 8, 8, decay="g_gamma")
    o, _ = linear_attention(q, k, v, g_gamma=g_gamma)
    (dgg,) = torch.autograd.grad(o.square().sum(), g_gamma)
    g = g_gamma.detach()[None, None].expand(1, 20, 2).clone().requires_grad_(True)
    o2, _ = linear_attention(q, k, v, g)
    (dg,) = torch.autograd.grad(o2.square().sum(), g)
    assert rel_err(dgg, dg.sum((0, 1))) < 1e-12


def test_empty_packed_sequences_keep_their_initial_state():
    cu = random_cu_seqlens([5, 0, 7, 0])
    q, k, v, g, _, h0 = random_inputs(1, 12, 2, 8, 8, decay="g", n_states=4, requires_grad=False)
    _, s = linear_attention(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert torch.equal(s[1], h0[1]) and torch.equal(s[3], h0[3])


def test_kernels_stay_single_device():
    """`lasp.kernels` loads no torch.distributed module beyond those `import torch` loads."""
    import subprocess
    import sys
    code = ("import sys, torch; before = {m for m in sys.modules if m.startswith('torch.distributed')}; "
            "import lasp.kernels, lasp.kernels.mom, lasp.kernels.softmax_attention; "
            "print(sorted({m for m in sys.modules if m.startswith('torch.distributed')} - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
