"""GPU tier of Mixture-of-Memories (`gpu` marker; skipped without CUDA).

    python -m pytest tests/kernels/test_mom_gpu.py -q

- The Triton path in bf16 at real shapes against the fp32 torch path on the same routing
  (the torch path is checked against the loop-over-memories oracle in float64 on CPU):
  relative error <= 3e-3 for the output and the gradients of q, k, v (the router logits'
  and dg: 5e-3, the kernel tier's gradient bound: the router gradient differences the
  copies' outputs, dg sums over a sequence),
  forward and backward under `set_sync_debug_mode("error")`.
- The layer in bf16 (grouped projections on sm90/sm100): forward and backward without a
  host sync; its grouped projections against every memory's projection plus selection.
- A training step of the layer (forward, backward, optimizer step) captured in one CUDA
  graph and replayed: the same losses and parameters as the same steps run eagerly.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from lasp.kernels import mixture_of_memories, mom_dispatch, mom_projection, mom_route
from lasp.layers import MixtureOfMemories
from lasp.sync import no_host_sync
from tests.utils import random_cu_seqlens, rel_err

pytestmark = pytest.mark.gpu
TOL = dict(o=3e-3, dq=3e-3, dk=3e-3, dv=3e-3, dlogits=5e-3, dg=5e-3)



@pytest.mark.parametrize("decay", [None, "g_gamma", "g"])
@pytest.mark.parametrize("B, T, M, top_k, H, D, lengths", [
    (1, 4096, 4, 2, 4, 128, [1000, 1, 2047, 1048]),
    (2, 3000, 4, 2, 8, 64, None),
    (1, 4096, 8, 1, 2, 128, None),
])
def test_bf16_matches_fp32(decay, B, T, M, top_k, H, D, lengths):
    check_bf16_against_fp32(decay, B, T, M, top_k, H, D, lengths, "cuda", no_host_sync)


def check_bf16_against_fp32(decay, B, T, M, top_k, H, D, lengths, device, context):
    """The Triton path in bf16 against the torch path in fp32 on the same routing and the
    same (rounded) inputs, within TOL; `context` wraps routing, dispatch, kernels and
    combine (no host sync on the GPU, bf16 emulation in the CPU interpreter)."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=device, generator=gen)
    cu = None if lengths is None else random_cu_seqlens(lengths, device)
    logits = (2 * rand(B, T, M)).requires_grad_()
    q, k, v = rand(B, T, H, D), rand(B, T, M, H, D), rand(B, T, M, H, D)
    g = F.logsigmoid(rand(B, T, M, H) + 4).requires_grad_() if decay == "g" else None
    g_gamma = F.logsigmoid(rand(H) + 4) if decay == "g_gamma" else None
    do = rand(B, T, H, D)
    leaves16 = [x.bfloat16().requires_grad_() for x in (q, k, v)]
    leaves32 = [x.detach().float().requires_grad_() for x in leaves16]     # the same (rounded) values
    # With k = 1 the renormalised weight is exactly 1: the router gets no gradient to compare.
    extra = ([logits] if top_k > 1 else []) + ([g] if g is not None else [])
    with context():
        weights, indices, _ = mom_route(logits, top_k)
        plan = mom_dispatch(indices, M, cu)
        o16, _ = mixture_of_memories(*leaves16, weights, plan, g, g_gamma, backend="triton")
        got = torch.autograd.grad(o16, leaves16 + extra, do.bfloat16(), retain_graph=True)
    o32, _ = mixture_of_memories(*leaves32, weights, plan, g, g_gamma, backend="torch")
    want = torch.autograd.grad(o32, leaves32 + extra, do.bfloat16().float())
    names = ["dq", "dk", "dv"] + (["dlogits"] if top_k > 1 else []) + (["dg"] if g is not None else [])
    assert rel_err(o16, o32) <= TOL["o"], f"o: {rel_err(o16, o32):.2e}"
    for name, a, b in zip(names, got, want):
        assert rel_err(a, b) <= TOL[name], f"{name}: {rel_err(a, b):.2e}"


def _layer(decay="data"):
    torch.manual_seed(0)
    return MixtureOfMemories(1024, 8, 128, decay=decay).cuda().bfloat16()


@pytest.mark.parametrize("packed", [False, True])
def test_layer_has_no_host_sync(packed):
    layer = _layer()
    B, T = (1, 4096) if packed else (2, 2048)
    cu = random_cu_seqlens([1500, 2596], "cuda") if packed else None
    x = torch.randn(B, T, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with no_host_sync():
        out, aux = layer(x, cu_seqlens=cu)
        (out.float().square().mean() + 0.01 * aux).backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_grouped_projection_matches_selection():
    x = torch.randn(2, 3000, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(4, 512, 1024, device="cuda") / 32).bfloat16().requires_grad_()
    logits = torch.randn(2, 3000, 4, device="cuda")
    logits[1, :, 3] = -50                               # a memory empty on one row
    _, indices, _ = mom_route(logits, 2)
    plan = mom_dispatch(indices, 4)
    dy = torch.randn(plan.num_copies, 512, device="cuda", dtype=torch.bfloat16)
    with no_host_sync():
        grouped = mom_projection(x, weight, plan)
        got = torch.autograd.grad(grouped, [x, weight], dy)
    selected = mom_projection(x.float(), weight.float(), plan, grouped=False)
    want = torch.autograd.grad(selected, [x, weight], dy.float())
    assert rel_err(grouped, selected) <= 3e-3
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 3e-3


def test_training_step_in_a_cuda_graph():
    """Forward, backward and an SGD step of the layer captured once, replayed on new data."""
    layer = _layer()
    eager = copy.deepcopy(layer)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.1)
    B, T = 1, 4096
    cu = random_cu_seqlens([1000, 3096], "cuda")
    batches = [torch.randn(B, T, 1024, device="cuda", dtype=torch.bfloat16) for _ in range(5)]
    static_x = batches[0].clone()

    def step(module, optimizer, x):
        optimizer.zero_grad(set_to_none=False)
        out, aux = module(x, cu_seqlens=cu)
        loss = out.float().square().mean() + 0.01 * aux
        loss.backward()
        optimizer.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                       # warm-up: autotune, allocate grads
        for x in batches[:2]:
            static_x.copy_(x)
            step(layer, opt, static_x)
            step(eager, eager_opt, x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(layer, opt, static_x)
    for x in batches[2:]:
        static_x.copy_(x)
        graph.replay()
        loss = step(eager, eager_opt, x)
        assert rel_err(static_loss, loss) <= 1e-3
    for (name, p), q in zip(layer.named_parameters(), eager.parameters()):
        assert rel_err(p, q) <= 1e-3, name
