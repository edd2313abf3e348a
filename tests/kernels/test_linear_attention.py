"""The public op: argument checks, the backend choice, and the state decomposition."""

import pytest
import torch

from lasp.kernels import linear_attention, run_transition, state_output
from lasp.kernels.checks import check_decay
from tests.utils import DECAYS, random_cu_seqlens, random_decay, random_inputs, rel_err


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
    (lambda q, k, v: dict(g=-torch.rand(1, 8, 2), gk=-torch.rand(1, 8, 2, 16)), ValueError, "g and gk"),
    (lambda q, k, v: dict(gk=-torch.rand(1, 8, 2, 8)), ValueError, r"gk must have shape \(1, 8, 2, 16\)"),
    (lambda q, k, v: dict(gk=torch.rand(1, 8, 2, 16)), ValueError, "gk holds log-decays"),
    (lambda q, k, v: dict(gk=-torch.rand(1, 8, 2, 16).int()), TypeError, "gk must be a floating"),
    (lambda q, k, v: dict(g=torch.full((1, 8, 2), float("-inf"))), ValueError, "g holds log-decays and must be finite"),
    (lambda q, k, v: dict(g_gamma=torch.tensor([-1.0, float("-inf")])), ValueError, "g_gamma holds log-decays"),
    (lambda q, k, v: dict(gk=torch.full((1, 8, 2, 16), float("-inf"))), ValueError, "gk holds log-decays"),
    (lambda q, k, v: dict(g=torch.full((1, 8, 2), float("nan"))), ValueError, "g holds log-decays"),
    # One bad entry among valid ones (the check is a single min/max pass: a NaN must still fail it).
    (lambda q, k, v: dict(gk=torch.where(torch.arange(8)[:, None, None] == 5, float("nan"), -torch.rand(1, 8, 2, 16))),
     ValueError, "gk holds log-decays"),
    (lambda q, k, v: dict(gk=-torch.rand(1, 8, 2, 16), causal=False), ValueError, "causal=False"),
    (lambda q, k, v: dict(beta=torch.rand(1, 8, 3)), ValueError, r"beta must have shape \(1, 8, 2\)"),
    (lambda q, k, v: dict(beta=torch.rand(1, 8, 2), causal=False), ValueError, "beta must be None"),
    (lambda q, k, v: dict(beta=torch.full((1, 8, 2), float("nan"))), ValueError, "beta must be finite"),
    (lambda q, k, v: dict(beta=torch.where(torch.arange(8)[:, None] == 3, float("inf"), torch.rand(1, 8, 2))),
     ValueError, "beta must be finite"),
    (lambda q, k, v: dict(beta=torch.ones(1, 8, 2, dtype=torch.int64)), TypeError, "beta must be a floating"),
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


@pytest.mark.parametrize("decay", DECAYS)
def test_initial_state_enters_linearly(decay):
    """o(S) = o(0) + state_output(S) and S_out(S) = S_out(0) + A_run(S), A_run the
    composition of the tokens' transitions."""
    q, k, v, _, _, h0 = random_inputs(2, 37, 2, 8, 12, n_states=2)
    gate = random_decay(decay, 2, 37, 2, 8)
    o, s = linear_attention(q, k, v, **gate, initial_state=h0, output_final_state=True)
    o0, s0 = linear_attention(q, k, v, **gate, output_final_state=True)
    assert rel_err(o0 + state_output(q, h0, **gate), o) < 1e-12
    carried = run_transition(check_decay(q, **gate)).apply(h0)
    assert rel_err(s0 + carried, s) < 1e-12


@pytest.mark.parametrize("decay", ["g", "gk"])
def test_state_output_gradients_match_autograd(decay):
    """state_output's own backward (it recomputes the decays) against autograd through
    an explicit form, with a reach."""
    q, _, _, _, _, h0 = random_inputs(2, 11, 2, 4, 3, n_states=2)
    gate = random_decay(decay, 2, 11, 2, 4)
    reach = torch.tensor([5, 11])
    out = state_output(q, h0, **gate, scale=0.7, reach=reach)
    x = gate[decay]
    cum = (x.cumsum(1)[..., None] if decay == "g" else x.cumsum(1)).exp()
    inside = (torch.arange(11)[None, :] < reach[:, None])[..., None, None]
    want = torch.einsum("bthk,bhkv->bthv", 0.7 * q * cum * inside, h0)
    do = torch.randn_like(want)
    got = torch.autograd.grad(out, (q, h0, x), do)
    exp = torch.autograd.grad(want, (q, h0, x), do)
    assert rel_err(out, want) < 1e-14
    for a, b in zip(got, exp):
        assert rel_err(a, b) < 1e-12


def test_state_output_saves_no_activation_of_its_own():
    """The correction keeps only references to its inputs for the backward: no fp32
    [B,T,H,V] product (that would double the bf16 output's memory)."""
    q = torch.randn(1, 64, 2, 16, dtype=torch.bfloat16, requires_grad=True)
    h0 = torch.randn(1, 2, 16, 32, requires_grad=True)
    g = (-torch.rand(1, 64, 2)).requires_grad_(True)
    inputs = {q.data_ptr(), h0.data_ptr(), g.data_ptr()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        state_output(q, h0, g)
    assert saved and all(t.data_ptr() in inputs or t.numel() <= q.shape[0] for t in saved)


@pytest.mark.parametrize("decay", [None, "g", "gk"])
def test_beta_selects_the_delta_rule(decay):
    """The public op with `beta` computes the delta rule of the token-by-token spec,
    packed documents and an initial state included (float64, torch backend)."""
    from lasp.kernels import naive_linear_attention
    q, k, v, _, _, h0 = random_inputs(1, 23, 2, 8, 6, n_states=3, requires_grad=False)
    k = torch.nn.functional.normalize(k, dim=-1)
    beta = torch.rand(1, 23, 2, dtype=torch.float64)
    gate = random_decay(decay, 1, 23, 2, 8, requires_grad=False)
    cu = random_cu_seqlens([5, 0, 18])
    o, s = linear_attention(q, k, v, **gate, beta=beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    want = naive_linear_attention(q, k, v, gate.get("g"), gk=gate.get("gk"), beta=beta, scale=8 ** -0.5,
                                  initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert rel_err(o, want[0]) < 1e-12 and rel_err(s, want[1]) < 1e-12


def test_state_output_rejects_a_bad_reach():
    q, _, _, _, _, h0 = random_inputs(2, 10, 1, 4, 4, n_states=2, requires_grad=False)
    with pytest.raises(ValueError, match="reach must be an int tensor"):
        state_output(q, h0, reach=torch.tensor([3.0, 10.0]))


def test_state_output_reach_limits_the_state_to_the_first_tokens():
    q, _, _, g, _, h0 = random_inputs(2, 10, 1, 4, 4, decay="g", n_states=2, requires_grad=False)
    out = state_output(q, h0, g, reach=torch.tensor([3, 10]))
    full = state_output(q, h0, g)
    assert torch.equal(out[0, :3], full[0, :3]) and not out[0, 3:].any()
    assert torch.equal(out[1], full[1])


def test_gradient_of_fixed_decay_matches_finite_differences():
    """d g_gamma against central differences of the float64 op (an independent check of
    the expanded decay's gradient; the probes stay <= 0)."""
    q, k, v, _, g_gamma, _ = random_inputs(1, 20, 2, 8, 8, decay="g_gamma")
    o, _ = linear_attention(q, k, v, g_gamma=g_gamma)
    (dgg,) = torch.autograd.grad(o.square().sum(), g_gamma)
    eps = 1e-6
    for h in range(2):
        step = torch.zeros_like(g_gamma).index_fill_(0, torch.tensor([h]), eps)
        plus = linear_attention(q, k, v, g_gamma=(g_gamma + step).detach())[0].square().sum()
        minus = linear_attention(q, k, v, g_gamma=(g_gamma - step).detach())[0].square().sum()
        assert abs((plus - minus).item() / (2 * eps) - dgg[h].item()) <= 1e-6 * abs(dgg[h].item())


def test_empty_packed_documents_keep_their_initial_state():
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
