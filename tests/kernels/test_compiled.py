"""torch.compile and the single-device attention ops (`lasp.kernels.compiled`): each compiles into
its caller's graph (`fullgraph=True`, no graph break) and gives the eager call's output and
every gradient; under selective checkpointing inside a compiled region the partitioner keeps
the Triton forward op's outputs instead of launching it again.

The Triton kernels run under TRITON_INTERPRET=1 on CPU (tests/conftest.py); backend
aot_eager: Dynamo and AOT autograd's forward/backward split, as under inductor, without
compiling the graphs' code.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import lasp.kernels.compiled as compiled
from lasp.kernels import linear_attention
from lasp.layers.ops import softmax_attention_op
from lasp.models import checkpointing
from tests.utils import random_cu_seqlens

BACKEND = "aot_eager"
TOL = 1e-5


def _assert_compiled_matches_eager(fn, inputs):
    """`fn` compiled whole gives eager's output and gradients (fresh cotangent)."""
    torch._dynamo.reset()
    out = fn(*inputs)
    cotangent = torch.randn_like(out)
    expected = torch.autograd.grad(out, inputs, cotangent)
    got_out = torch.compile(fn, backend=BACKEND, fullgraph=True)(*inputs)
    got = torch.autograd.grad(got_out, inputs, cotangent)
    torch.testing.assert_close(got_out, out, rtol=0, atol=TOL)
    for name, a, b in zip("qkv" + "d" * len(inputs), got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL, msg=f"d{name}")


@pytest.mark.parametrize("family", ["g", "gk", "beta"])
def test_triton_linear_attention_compiles_whole(family):
    """One case per Triton autograd Function: scalar (g, packed), diagonal (gk), delta (beta with g)."""
    torch.manual_seed(0)
    B, T, H, D = 1, 48, 2, 16
    cu = random_cu_seqlens([20, 28]) if family == "g" else None
    q, k, v = (torch.randn(B, T, H, D, requires_grad=True) for _ in range(3))
    gates = [(-torch.rand(B, T, H, D if family == "gk" else 1).squeeze(-1) * 0.5).requires_grad_()]
    if family == "beta":
        gates.append(torch.rand(B, T, H, requires_grad=True))

    def attend(q, k, v, decay, beta=None):
        kwargs = {"gk": decay} if family == "gk" else {"g": decay, "beta": beta}
        if beta is not None:
            k = F.normalize(k, dim=-1)
        return linear_attention(q.sin(), k, v, backend="triton", cu_seqlens=cu, **kwargs)[0].cos()

    _assert_compiled_matches_eager(attend, [q, k, v, *gates])


def test_softmax_attention_op_compiles_whole():
    torch.manual_seed(0)
    q = torch.randn(1, 40, 4, 16, requires_grad=True)
    k, v = (torch.randn(1, 40, 2, 16, requires_grad=True) for _ in range(2))  # GQA
    cu = random_cu_seqlens([15, 25])
    _assert_compiled_matches_eager(lambda q, k, v: softmax_attention_op(q.sin(), k, v, cu_seqlens=cu).cos(),
                                   [q, k, v])


def test_selective_checkpoint_keeps_the_triton_forward(monkeypatch):
    """Compiled with the checkpoint inside (torchtitan's order), selective runs the forward op
    once and the backward op once; full checkpointing launches the forward again."""
    torch.manual_seed(0)
    D, H = 16, 2
    proj = torch.nn.Linear(D * H, 3 * D * H)
    x = torch.randn(1, 32, D * H, requires_grad=True)

    def block(x):
        q, k, v = proj(x).sin().unflatten(-1, (3, H, D)).unbind(2)
        return linear_attention(q, k, v, g=F.logsigmoid(v[..., 0]), backend="triton")[0].sum()

    runs = []
    real = compiled._span_phases
    monkeypatch.setattr(compiled, "_span_phases", lambda *a: runs.append(a) or real(*a))
    decisions = []
    rule = checkpointing.keeps_output
    monkeypatch.setattr(checkpointing, "keeps_output", lambda op, n: decisions.append(op) or rule(op, n))
    expected = torch.autograd.grad(block(x), [x, *proj.parameters()])
    # (Dynamo takes a context_fn it can name: a module's function, not a closure's variable.)
    steps = {"selective": lambda x: checkpoint(block, x, use_reentrant=False,
                                               context_fn=checkpointing.selective_context),
             "full": lambda x: checkpoint(block, x, use_reentrant=False)}
    for mode, launches in (("selective", 2), ("full", 3)):
        torch._dynamo.reset()
        runs.clear()
        got = torch.autograd.grad(torch.compile(steps[mode], backend=BACKEND, fullgraph=True)(x),
                                  [x, *proj.parameters()])
        assert len(runs) == launches, mode
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=TOL)
    assert torch.ops.lasp.span_forward.default in decisions and torch.ops.aten.addmm.default in decisions


@pytest.mark.parametrize("operands", [torch.bfloat16, torch.float32])
def test_delta_forward_fake_matches_the_op(operands):
    """The delta forward op's fake outputs (what a compiled graph allocates and passes to the
    backward op) have the real outputs' shapes and dtypes in both walk-operand modes."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 32, 2, 16).bfloat16() for _ in range(3))
    k = F.normalize(k.float(), dim=-1).bfloat16()
    args = (q, k, v, torch.rand(1, 32, 2), -torch.rand(1, 32, 2) * 0.5, None, None, 16, 0.25, operands)
    real = compiled.delta_forward(*args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = compiled.delta_forward.op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert [(x.shape, x.dtype) for x in fake] == [(x.shape, x.dtype) for x in real]
