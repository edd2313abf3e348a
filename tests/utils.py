"""Helpers shared by the test modules: fresh random inputs and relative errors."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64; NaN anywhere in `a` fails every tolerance."""
    a, b = a.double(), b.double()
    if torch.isnan(a).any():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def run_twice(run, names, guard=contextlib.nullcontext):
    """run()'s results (a sequence of tensors or None, named by `names`), after a second call
    returned them bitwise: the GPU tiers' kernels accumulate nothing atomically, so a
    difference is a race or a miscompile (session 12: a delta-rule variant's KDA dk was
    3.00e-3 and 3.25e-3 from the fp32 oracle in two runs of one binary on an H100). Both
    calls run inside `guard()` (e.g. `lasp.no_host_sync`), the comparison after it."""
    with guard():
        first, again = run(), run()
    changed = [name for name, a, b in zip(names, first, again) if a is not None and not torch.equal(a, b)]
    assert not changed, f"a second run differs in {changed}"
    return first


def random_inputs(B, T, H, K, V, *, decay=None, dtype=torch.float64, device="cpu",
                  n_states=None, generator=None, requires_grad=True):
    """q, k, v, g, g_gamma, h0 drawn fresh: decay is None, "g" or "g_gamma".

    Log-decays are -softplus(randn)-ish so that the decays vary over (0, 1).
    """
    def rand(*shape):
        return torch.randn(*shape, dtype=dtype, device=device, generator=generator)

    q, k, v = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, V)
    g = g_gamma = None
    if decay == "g":
        g = F.logsigmoid(rand(B, T, H) + 2.0)
    elif decay == "g_gamma":
        g_gamma = F.logsigmoid(rand(H) + 3.0)
    h0 = None if n_states is None else rand(n_states, H, K, V).float().to(
        torch.float64 if dtype == torch.float64 else torch.float32)
    tensors = [q, k, v, g, g_gamma, h0]
    if requires_grad:
        for t in tensors:
            if t is not None:
                t.requires_grad_(True)
    return tensors


def random_cu_seqlens(lengths, device="cpu"):
    """int32 offsets [0, l0, l0+l1, ...] of the given sequence lengths."""
    offsets = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)
    return offsets.to(torch.int32).to(device)


def grads(outputs, inputs, cotangents):
    """Gradients of sum(<output, cotangent>) for the inputs that are not None."""
    live = [x for x in inputs if x is not None]
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o is not None]
    return torch.autograd.grad([o for o, _ in pairs], live, [c for _, c in pairs])


# The decay arguments every family test runs over (ids are the public argument names).
DECAYS = (None, "g_gamma", "g", "gk")


def random_decay(decay, B, T, H, K, *, dtype=torch.float64, device="cpu", generator=None,
                 requires_grad=True) -> dict:
    """Fresh log-decays as the keyword of `linear_attention` that `decay` names (or {})."""
    shapes = {"g_gamma": (H,), "g": (B, T, H), "gk": (B, T, H, K)}
    if decay is None:
        return {}
    x = torch.randn(*shapes[decay], dtype=dtype, device=device, generator=generator)
    x = F.logsigmoid(x + (3.0 if decay == "g_gamma" else 2.0))
    return {decay: x.requires_grad_(requires_grad)}


def assert_layer_gradients_match(layer, x, out, expected, tol=1e-11):
    """The gradients of x and of every parameter of `layer` through `out` match those
    through `expected` (one random cotangent), each by name, and none is zero."""
    cot = torch.randn_like(out)
    leaves = [x, *layer.parameters()]
    names = ["x", *(name for name, _ in layer.named_parameters())]
    for name, a, b in zip(names, torch.autograd.grad(out, leaves, cot), torch.autograd.grad(expected, leaves, cot)):
        assert rel_err(a, b) < tol, name
        assert b.abs().sum() > 0, f"{name} gets no gradient"


def assert_layer_matches_recurrence(layer, x, lengths, expected, tol=1e-12):
    """`layer(x)` on the packed documents `lengths` equals `expected` (its token-loop oracle),
    the packed run equals each document run alone, and every gradient matches the oracle's."""
    cu = random_cu_seqlens(lengths) if len(lengths) > 1 else None
    out = layer(x, cu_seqlens=cu)
    assert rel_err(out, expected) < tol
    if cu is not None:
        alone = torch.cat([layer(doc) for doc in x.split(lengths, dim=1)], 1)
        assert rel_err(out, alone) < tol
    assert_layer_gradients_match(layer, x, out, expected)


def assert_bf16_gpu_layer_matches_fp64(layer, hidden: int, lengths, out_tol=3e-2, grad_tol=5e-2):
    """`layer` in bf16 on the GPU, under `no_host_sync`, against its float64 copy on the CPU
    on packed documents `lengths`: output and every parameter gradient."""
    import copy

    from lasp.sync import no_host_sync
    oracle = copy.deepcopy(layer).double()
    x = torch.randn(1, sum(lengths), hidden, dtype=torch.float64)
    cot = torch.randn_like(x)
    cu = random_cu_seqlens(lengths)
    expected = oracle(x, cu_seqlens=cu)
    expected_grads = torch.autograd.grad(expected, list(oracle.parameters()), cot)
    layer = layer.cuda().bfloat16()
    x, cot, cu = x.cuda().bfloat16(), cot.cuda().bfloat16(), cu.cuda()
    with no_host_sync():
        out = layer(x, cu_seqlens=cu)
        grads = torch.autograd.grad(out, list(layer.parameters()), cot)
    assert rel_err(out.cpu(), expected) < out_tol
    for (name, _), a, b in zip(layer.named_parameters(), grads, expected_grads):
        assert rel_err(a.cpu(), b) < grad_tol, name
