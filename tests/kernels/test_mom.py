"""Mixture-of-Memories kernels against the loop-over-memories oracle, outputs and every gradient.

The torch path (counting-sort dispatch, one varlen torch-backend call, torch combine) is
checked in float64 to 1e-10; the Triton path (Triton linear attention and the fused
Triton combine, under TRITON_INTERPRET=1 on CPU) in float32 at small shapes. Gradients
cover q, k, v, g / g_gamma / gk, beta, initial states, final-state cotangents and the
router logits (through the routing weights). Cases include memories that receive no
token, k = 1, k = M, packed documents (with an empty one), per-key decays (gk, on both
backends) and delta-rule memories (beta, with none, g, g_gamma or gk).
"""

import inspect
import re

import pytest
import torch
import torch.nn.functional as F

import lasp.kernels.mom as mom
import lasp.kernels.triton_mom as triton_mom
from lasp.kernels.mom import (load_balancing_loss, mixture_of_memories, mom_dispatch, mom_projection,
                              mom_reference, mom_route, mom_state_output)
from tests.bf16_interpreter import bf16_interpreter
from tests.kernels.test_mom_gpu import check_bf16_against_fp32
from tests.utils import random_cu_seqlens, rel_err



def routing_logits(B, T, M, *, dtype, gen, empty=()):
    """Random router logits; memories in `empty` receive no token."""
    logits = torch.randn(B, T, M, dtype=dtype, generator=gen) * 2
    for m in empty:
        logits[..., m] = -50.0
    return logits.requires_grad_()


def mom_inputs(B, T, M, H, K, V, *, decay, dtype, gen, n_rows, with_h0=True):
    def rand(*shape):
        return torch.randn(*shape, dtype=dtype, generator=gen)
    q, k, v = rand(B, T, H, K), rand(B, T, M, H, K), rand(B, T, M, H, V)
    g = F.logsigmoid(rand(B, T, M, H) + 2.0) if decay == "g" else None
    g_gamma = F.logsigmoid(rand(H) + 3.0) if decay == "g_gamma" else None
    h0 = rand(M, n_rows, H, K, V) if with_h0 else None
    return [None if x is None else x.requires_grad_() for x in (q, k, v, g, g_gamma, h0)]


def memory_gates(B, T, M, H, K, *, decay, delta, dtype, gen):
    """gk [B, T, M, H, K] (decay "gk") and beta [B, T, M, H] (delta), or None, requiring grad."""
    gk = beta = None
    if decay == "gk":
        gk = F.logsigmoid(torch.randn(B, T, M, H, K, dtype=dtype, generator=gen) + 2.0).requires_grad_()
    if delta:
        beta = torch.randn(B, T, M, H, dtype=dtype, generator=gen).sigmoid().requires_grad_()
    return gk, beta


def run_case(B, T, M, top_k, H, K, V, *, decay, lengths=None, empty=(), dtype, backend, seed=0, delta=False):
    """Fast path and oracle on the same inputs and cotangents: (name, fast, reference) pairs.
    `delta`: delta-rule memories (beta; keys L2-normalised, as the layers do)."""
    gen = torch.Generator().manual_seed(seed)
    cu = None if lengths is None else random_cu_seqlens(lengths)
    n_rows = B if cu is None else len(lengths)
    logits = routing_logits(B, T, M, dtype=dtype, gen=gen, empty=empty)
    q, k, v, g, g_gamma, h0 = mom_inputs(B, T, M, H, K, V, decay=decay, dtype=dtype, gen=gen, n_rows=n_rows)
    if delta:
        k = F.normalize(k.detach(), dim=-1).requires_grad_()
    gk, beta = memory_gates(B, T, M, H, K, decay=decay, delta=delta, dtype=dtype, gen=gen)
    inputs = (q, k, v, g, g_gamma, h0, gk, beta)
    do = torch.randn(B, T, H, V, dtype=dtype, generator=gen)
    d_final = torch.randn(M, n_rows, H, K, V, dtype=torch.float64, generator=gen)
    leaves = [x for x in (*inputs, logits) if x is not None]
    names = [n for n, x in zip("q k v g g_gamma h0 gk beta logits".split(), (*inputs, logits)) if x is not None]

    weights, indices, _ = mom_route(logits, top_k)
    plan = mom_dispatch(indices, M, cu)
    o, final = mixture_of_memories(q, k, v, weights, plan, g, g_gamma, gk=gk, beta=beta, initial_state=h0,
                                   output_final_state=True, backend=backend)
    got = torch.autograd.grad([o, final], leaves, [do, d_final.to(final.dtype)], retain_graph=True)

    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    rq, rk, rv, *rest = ref_leaves
    ref = dict(zip(names, ref_leaves))
    r_weights, r_indices, _ = mom_route(ref["logits"], top_k)
    assert torch.equal(r_indices, indices)
    o_ref, final_ref = mom_reference(rq, rk, rv, r_weights, r_indices, ref.get("g"), ref.get("g_gamma"),
                                     gk=ref.get("gk"), beta=ref.get("beta"), initial_state=ref["h0"],
                                     output_final_state=True, cu_seqlens=cu)
    want = torch.autograd.grad([o_ref, final_ref], ref_leaves, [do.double(), d_final])
    pairs = [("o", o, o_ref), ("final", final, final_ref)]
    pairs += [(f"d{n}", a, b) for n, a, b in zip(names, got, want)]
    if top_k == 1:                  # one renormalised weight is exactly 1: no gradient to the router
        name, d_logits, _ = pairs.pop()
        assert d_logits.abs().max() <= 1e3 * torch.finfo(dtype).eps, name
    return pairs, plan


CASES = [
    # B, T, M, top_k, decay, lengths, empty
    (2, 37, 4, 2, "g", None, ()),
    (2, 37, 4, 2, "g_gamma", None, (1,)),
    (1, 40, 4, 1, None, [9, 0, 1, 30], ()),
    (1, 40, 3, 3, "g", [17, 23], ()),
    (1, 40, 4, 2, "g", [5, 0, 20, 15], (0, 3)),
]
IDS = ["g B=2", "g_gamma empty memory", "plain k=1 packed", "g k=M packed", "g packed two empty memories"]


@pytest.mark.parametrize("B, T, M, top_k, decay, lengths, empty", CASES, ids=IDS)
def test_torch_path_matches_oracle(B, T, M, top_k, decay, lengths, empty):
    pairs, plan = run_case(B, T, M, top_k, 2, 6, 5, decay=decay, lengths=lengths, empty=empty,
                           dtype=torch.float64, backend="torch")
    for name, got, want in pairs:
        assert rel_err(got, want) <= 1e-10, f"{name}: rel err {rel_err(got, want):.2e}"
    R = plan.num_rows
    counts = plan.cu_seqlens.diff().view(M, R).sum(1)
    for m in empty:
        assert counts[m] == 0                               # the forced memory really got nothing


@pytest.mark.parametrize("B, T, M, top_k, decay, lengths, empty", [CASES[0], CASES[2], CASES[4]],
                         ids=[IDS[0], IDS[2], IDS[4]])
def test_triton_matches_oracle(B, T, M, top_k, decay, lengths, empty):
    pairs, _ = run_case(B, T, M, top_k, 2, 16, 16, decay=decay, lengths=lengths, empty=empty,
                        dtype=torch.float32, backend="triton")
    for name, got, want in pairs:
        assert rel_err(got, want) <= 2e-5, f"{name}: rel err {rel_err(got, want):.2e}"


def test_triton_half_precision():
    # The copies' outputs and dq stay fp32 to the sum of a token's copies; the output is fp16.
    pairs, _ = run_case(1, 40, 4, 2, 2, 16, 16, decay="g", lengths=[17, 23], dtype=torch.float16,
                        backend="triton")
    assert pairs[0][1].dtype == torch.float16
    for name, got, want in pairs:
        assert rel_err(got, want) <= 3e-3, f"{name}: rel err {rel_err(got, want):.2e}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tier (CPU)")
@pytest.mark.parametrize("decay", [None, "g_gamma", "g"])
def test_triton_bf16_as_on_the_gpu(decay):
    """The GPU tier's bf16 bound at a small shape, the interpreter computing bf16 as a GPU."""
    check_bf16_against_fp32(decay, 1, 2048, 4, 2, 2, 64, [500, 1, 1000, 547], "cpu", bf16_interpreter)


def test_dispatch_is_a_stable_counting_sort():
    gen = torch.Generator().manual_seed(3)
    B, T, M, top_k = 2, 50, 5, 2
    _, indices, _ = mom_route(torch.randn(B, T, M, generator=gen), top_k)
    for kwargs, bounds in ((dict(), [0, 50, 100]), (dict(segment_len=25), [0, 25, 50, 75, 100]),
                           (dict(cu_seqlens=random_cu_seqlens([7, 0, 43])), None)):
        idx = indices[:1] if "cu_seqlens" in kwargs else indices
        plan = mom_dispatch(idx, M, **kwargs)
        bounds = bounds or [0, 7, 7, 50]
        R = len(bounds) - 1
        assert plan.num_rows == R and plan.cu_seqlens.numel() == M * R + 1
        assert torch.equal(plan.src[plan.dest], torch.arange(plan.num_copies))
        token = plan.src // top_k
        memory = idx.reshape(-1)[plan.src]
        row = torch.searchsorted(torch.tensor(bounds[1:]), token, right=True)
        stream = memory * R + row
        # Sorted by (memory, row), each stream contiguous at its offsets, positions increasing.
        assert torch.equal(stream, torch.repeat_interleave(torch.arange(M * R), plan.cu_seqlens.diff()))
        same = stream[1:] == stream[:-1]
        assert (token[1:][same] > token[:-1][same]).all()
        assert torch.equal(plan.memory_ends.long(), plan.cu_seqlens[R::R])


def test_combine_kernel_matches_torch():
    gen = torch.Generator().manual_seed(4)
    B, T, M, top_k, H, V = 2, 21, 4, 3, 3, 40            # F = 120: a partial feature block
    logits = torch.randn(B, T, M, generator=gen, requires_grad=True)
    weights, indices, _ = mom_route(logits, top_k)
    plan = mom_dispatch(indices, M)
    o = torch.randn(plan.num_copies, H, V, generator=gen, requires_grad=True)
    do = torch.randn(B, T, H, V, generator=gen)
    got = plan.combine(o, weights, backend="triton")
    want = plan.combine(o.double(), weights.double(), backend="torch")
    assert rel_err(got, want) < 1e-6
    g_got = torch.autograd.grad(got, [o, logits], do, retain_graph=True)
    g_want = torch.autograd.grad(want, [o, logits], do.double())
    for a, b in zip(g_got, g_want):
        assert rel_err(a, b) < 1e-6


def test_grouped_projection_matches_selected_projection():
    """The grouped matmul (torch's CPU fallback here; CUTLASS on sm90) against every
    memory's projection plus selection, outputs and gradients, with an empty memory."""
    gen = torch.Generator().manual_seed(5)
    B, T, M, top_k, n_in, n_out = 2, 30, 4, 2, 32, 16
    logits = routing_logits(B, T, M, dtype=torch.float32, gen=gen, empty=(2,))
    _, indices, _ = mom_route(logits, top_k)
    plan = mom_dispatch(indices, M)
    x = torch.randn(B, T, n_in, generator=gen, requires_grad=True)
    weight = torch.randn(M, n_out, n_in, generator=gen, requires_grad=True)
    dy = torch.randn(plan.num_copies, n_out, generator=gen)
    grouped = mom_projection(x, weight, plan, grouped=True)
    selected = mom_projection(x, weight, plan, grouped=False)
    assert rel_err(grouped, selected) < 1e-6
    for a, b in zip(torch.autograd.grad(grouped, [x, weight], dy), torch.autograd.grad(selected, [x, weight], dy)):
        assert rel_err(a, b) < 1e-6
    x_rows = x.detach().reshape(B * T, n_in)[plan.src // top_k]
    memory = indices.reshape(-1)[plan.src]
    assert rel_err(selected, torch.einsum("pi,poi->po", x_rows, weight.detach()[memory])) < 1e-6


@pytest.mark.parametrize("grouped", [True, False])
def test_projection_of_a_tuple_of_weights(grouped):
    """A tuple of weights (keys and values) projects once-gathered copies: the same
    outputs and gradients as one call per weight."""
    gen = torch.Generator().manual_seed(8)
    B, T, M, top_k, n_in = 1, 25, 3, 2, 16
    _, indices, _ = mom_route(routing_logits(B, T, M, dtype=torch.float32, gen=gen), top_k)
    plan = mom_dispatch(indices, M)
    x = torch.randn(B, T, n_in, generator=gen, requires_grad=True)
    wk, wv = (torch.randn(M, n, n_in, generator=gen, requires_grad=True) for n in (8, 12))
    dk, dv = torch.randn(plan.num_copies, 8, generator=gen), torch.randn(plan.num_copies, 12, generator=gen)
    k, v = mom_projection(x, (wk, wv), plan, grouped=grouped)
    k1, v1 = mom_projection(x, wk, plan, grouped=grouped), mom_projection(x, wv, plan, grouped=grouped)
    assert rel_err(k, k1) < 1e-6 and rel_err(v, v1) < 1e-6
    got = torch.autograd.grad([k, v], [x, wk, wv], [dk, dv])
    want = torch.autograd.grad([k1, v1], [x, wk, wv], [dk, dv])
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("decay", [None, "g_gamma", "g"])
def test_state_output_is_the_initial_state_part(decay):
    """mom_state_output(q, S) = MoM(S) − MoM(0) on each row's tokens before `reach`."""
    gen = torch.Generator().manual_seed(6)
    B, T, M, top_k, H, K, V = 2, 19, 3, 2, 2, 4, 5
    logits = routing_logits(B, T, M, dtype=torch.float64, gen=gen)
    q, k, v, g, g_gamma, h0 = mom_inputs(B, T, M, H, K, V, decay=decay, dtype=torch.float64, gen=gen, n_rows=B)
    weights, indices, _ = mom_route(logits, top_k)
    reach = torch.tensor([T, 11])
    with_state = mom_reference(q, k, v, weights, indices, g, g_gamma, initial_state=h0)[0]
    without = mom_reference(q, k, v, weights, indices, g, g_gamma)[0]
    want = with_state - without
    want[1, 11:] = 0
    got = mom_state_output(q, h0.transpose(0, 1), weights, indices, g, g_gamma, reach=reach)
    assert rel_err(got, want) < 1e-12
    leaves = [x for x in (q, h0, logits, g, g_gamma) if x is not None]
    do = torch.randn(B, T, H, V, dtype=torch.float64, generator=gen)
    got_grads = torch.autograd.grad(got, leaves, do, retain_graph=True)
    for a, b in zip(got_grads, torch.autograd.grad(want, leaves, do)):
        assert rel_err(a, b) < 1e-11


def _state_output_by_autograd(q, state, weights, indices, g, g_gamma, *, reach):
    """The formula mom_state_output replaced, differentiated by autograd: every
    per-memory product [B, T, M, H, V] materialised."""
    B, T, H, K = q.shape
    M = state.shape[1]
    coef = torch.zeros(B, T, M, dtype=q.dtype).scatter(-1, indices, weights) * K ** -0.5
    coef = coef[..., None].expand(B, T, M, H)
    decay = mom.routed_log_decay(indices, M, g, g_gamma, torch.float64)
    if decay is not None:
        coef = coef * decay.cumsum(1).exp()
    coef = coef * (torch.arange(T)[None, :] < reach[:, None])[:, :, None, None]
    per_memory = torch.einsum("bthk,bmhkv->btmhv", q, state)
    return torch.einsum("btmhv,btmh->bthv", per_memory, coef)


@pytest.mark.parametrize("decay", [None, "g_gamma", "g"])
def test_state_output_gradients_match_autograd_of_the_formula(decay):
    """The recomputing backward gives autograd's gradients of q, state, weights and the decay."""
    gen = torch.Generator().manual_seed(7)
    B, T, M, top_k, H, K, V = 2, 13, 3, 2, 2, 4, 5
    logits = routing_logits(B, T, M, dtype=torch.float64, gen=gen)
    q, _, _, g, g_gamma, h0 = mom_inputs(B, T, M, H, K, V, decay=decay, dtype=torch.float64, gen=gen, n_rows=B)
    weights, indices, _ = mom_route(logits, top_k)
    weights = weights.detach().requires_grad_()
    state, reach = h0.transpose(0, 1), torch.tensor([T, 8])
    leaves = [x for x in (q, h0, weights, g, g_gamma) if x is not None]
    do = torch.randn(B, T, H, V, dtype=torch.float64, generator=gen)
    got = mom_state_output(q, state, weights, indices, g, g_gamma, reach=reach)
    want = _state_output_by_autograd(q, state, weights, indices, g, g_gamma, reach=reach)
    assert rel_err(got, want) < 1e-13
    for name, a, b in zip(["q", "state", "weights", "g"], torch.autograd.grad(got, leaves, do),
                          torch.autograd.grad(want, leaves, do)):
        assert rel_err(a, b) < 1e-13, name


def test_state_output_saves_only_its_inputs():
    """Issue 22: the correction keeps only its inputs (and tiny tensors) for the backward,
    no [B, T, M, H, V] product or [B, T, M, H] coefficient."""
    gen = torch.Generator().manual_seed(8)
    B, T, M, top_k, H, K, V = 1, 32, 4, 2, 2, 8, 16
    q, _, _, g, _, h0 = mom_inputs(B, T, M, H, K, V, decay="g", dtype=torch.float32, gen=gen, n_rows=B)
    weights, indices, _ = mom_route(routing_logits(B, T, M, dtype=torch.float32, gen=gen), top_k)
    state, reach = h0.transpose(0, 1), torch.tensor([20])
    inputs = {x.data_ptr() for x in (q, state, weights, indices, g, reach)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mom_state_output(q, state, weights, indices, g, reach=reach)
    assert saved and all(t.data_ptr() in inputs or t.numel() <= B for t in saved)


def _per_key_decay(B, T, M, H, K, gen):
    return F.logsigmoid(torch.randn(B, T, M, H, K, dtype=torch.float64, generator=gen) + 2.0).requires_grad_()


def test_per_key_decay_matches_oracle():
    """gk (per memory, per key) on the torch backend: outputs, final states and every
    gradient vs the loop over memories."""
    gen = torch.Generator().manual_seed(9)
    B, T, M, top_k, H, K, V, lengths = 1, 23, 3, 2, 2, 4, 5, [9, 0, 14]
    cu = random_cu_seqlens(lengths)
    logits = routing_logits(B, T, M, dtype=torch.float64, gen=gen)
    q, k, v, _, _, h0 = mom_inputs(B, T, M, H, K, V, decay=None, dtype=torch.float64, gen=gen, n_rows=3)
    gk = _per_key_decay(B, T, M, H, K, gen)
    weights, indices, _ = mom_route(logits, top_k)
    plan = mom_dispatch(indices, M, cu)
    o, final = mixture_of_memories(q, k, v, weights, plan, gk=gk, initial_state=h0, output_final_state=True,
                                   backend="torch")
    o_ref, final_ref = mom_reference(q, k, v, weights, indices, gk=gk, initial_state=h0,
                                     output_final_state=True, cu_seqlens=cu)
    assert rel_err(o, o_ref) < 1e-12 and rel_err(final, final_ref) < 1e-12
    leaves = [q, k, v, gk, h0, logits]
    do = torch.randn_like(o)
    d_final = torch.randn_like(final)
    got = torch.autograd.grad([o, final], leaves, [do, d_final], retain_graph=True)
    want = torch.autograd.grad([o_ref, final_ref], leaves, [do, d_final])
    for name, a, b in zip("q k v gk h0 logits".split(), got, want):
        assert rel_err(a, b) < 1e-11, name
    with pytest.raises(ValueError, match="at most one of g"):
        mixture_of_memories(q, k, v, weights, plan, gk[..., 0], gk=gk)


def test_triton_per_key_decay_matches_oracle():
    """gk on the Triton backend (the diagonal kernels with the query gather, the routing
    weights applied in fp32): outputs, final states and the gradients of q, k, v, gk, h0
    and the routing weights vs the float64 oracle. Packed documents with an empty one, a
    memory with no token, a zero routing weight (its gradient <do, o> is not 0) and a
    memory decaying strongly enough (gk = -8 per token) for the kernels' exact path."""
    gen = torch.Generator().manual_seed(14)
    B, T, M, top_k, H, K, V, lengths = 1, 40, 4, 2, 2, 16, 16, [5, 0, 20, 15]
    cu = random_cu_seqlens(lengths)
    q, k, v, _, _, h0 = mom_inputs(B, T, M, H, K, V, decay=None, dtype=torch.float32, gen=gen, n_rows=4)
    gk, _ = memory_gates(B, T, M, H, K, decay="gk", delta=False, dtype=torch.float32, gen=gen)
    with torch.no_grad():
        gk[:, :, 1] = -8.0
    weights, indices, _ = mom_route(routing_logits(B, T, M, dtype=torch.float32, gen=gen, empty=(0,)), top_k)
    weights = weights.detach().index_put((torch.tensor([0]), torch.tensor([3]), torch.tensor([1])),
                                         torch.tensor(0.0)).requires_grad_()
    plan = mom_dispatch(indices, M, cu)
    leaves = [q, k, v, gk, h0, weights]
    o, final = mixture_of_memories(q, k, v, weights, plan, gk=gk, initial_state=h0, output_final_state=True,
                                   backend="triton")
    do, d_final = torch.randn_like(o), torch.randn_like(final)
    got = torch.autograd.grad([o, final], leaves, [do, d_final])
    rq, rk, rv, rgk, rh0, rw = ref = [x.detach().double().requires_grad_() for x in leaves]
    o_ref, final_ref = mom_reference(rq, rk, rv, rw, indices, gk=rgk, initial_state=rh0, output_final_state=True,
                                     cu_seqlens=cu)
    want = torch.autograd.grad([o_ref, final_ref], ref, [do.double(), d_final.double()])
    assert want[-1][0, 3, 1] != 0
    assert rel_err(o, o_ref) <= 2e-5 and rel_err(final, final_ref) <= 2e-5
    for name, a, b in zip("q k v gk h0 weights".split(), got, want):
        assert rel_err(a, b) <= 2e-5, f"d{name}: rel err {rel_err(a, b):.2e}"


DELTA_CASES = [
    # B, T, M, top_k, decay, lengths, empty
    (2, 19, 3, 2, None, None, ()),
    (1, 23, 3, 2, "g", [9, 0, 14], (2,)),
    (1, 23, 4, 1, "g_gamma", [1, 22], ()),
    (1, 23, 3, 3, "gk", [9, 0, 14], ()),
]


@pytest.mark.parametrize("B, T, M, top_k, decay, lengths, empty", DELTA_CASES,
                         ids=["DeltaNet B=2", "Gated DeltaNet packed empty memory", "g_gamma k=1", "KDA k=M packed"])
def test_delta_rule_matches_oracle(B, T, M, top_k, decay, lengths, empty):
    """Delta-rule memories (beta) on the torch backend vs the token loop, float64: outputs,
    final states and the gradients of q, k, v, beta, the decay, h0 and the router logits."""
    pairs, _ = run_case(B, T, M, top_k, 2, 4, 5, decay=decay, lengths=lengths, empty=empty, dtype=torch.float64,
                        backend="torch", delta=True)
    for name, got, want in pairs:
        assert rel_err(got, want) <= 1e-10, f"{name}: rel err {rel_err(got, want):.2e}"


def test_triton_delta_rule_matches_oracle():
    """Delta-rule memories with a per-key decay (KDA) on the Triton delta family (query
    copies, the Triton combine), fp32 under the interpreter, vs the float64 oracle."""
    pairs, _ = run_case(1, 40, 4, 2, 2, 16, 16, decay="gk", lengths=[5, 0, 20, 15], empty=(0,),
                        dtype=torch.float32, backend="triton", delta=True)
    for name, got, want in pairs:
        assert rel_err(got, want) <= 2e-5, f"{name}: rel err {rel_err(got, want):.2e}"


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_affine_phases_give_the_run_from_incoming_states(packed):
    """`mom_affine_phases` + `mom_dense_state_output`: from incoming states S, every
    stream ends in U + M S and the outputs are combine(o0) + the states' part, as
    `mixture_of_memories` from S. Unpacked: one state per batch row and memory; packed:
    one row whose states enter only the first document (`reach`). A memory with no token
    on a row has the identity transition and a zero state. Float64, torch."""
    gen = torch.Generator().manual_seed(15)
    B, T, M, top_k, H, K, V = (1, 17, 3, 2, 2, 4, 5) if packed else (2, 9, 3, 2, 2, 4, 5)
    lengths = [6, 0, 11] if packed else None
    cu = None if lengths is None else random_cu_seqlens(lengths)
    q, k, v, g, _, _ = mom_inputs(B, T, M, H, K, V, decay="g", dtype=torch.float64, gen=gen, n_rows=1,
                                  with_h0=False)
    k = F.normalize(k.detach(), dim=-1)
    _, beta = memory_gates(B, T, M, H, K, decay="g", delta=True, dtype=torch.float64, gen=gen)
    weights, indices, _ = mom_route(routing_logits(B, T, M, dtype=torch.float64, gen=gen, empty=(2,)), top_k)
    plan = mom_dispatch(indices, M, cu)
    state = torch.randn(B, M, H, K, V, dtype=torch.float64, generator=gen)     # entering each batch row
    phases, local = mom.mom_affine_phases(q, k, v, weights, plan, g, beta=beta, backend="torch")
    (u, m), saved = phases.summarize(*local[1:])
    o0, x = phases.output(*local, saved)
    reach = None if cu is None else cu[1:2]
    o = plan.combine(o0[0], weights) + mom.mom_dense_state_output(x, state, weights, plan, reach)

    h0 = state.transpose(0, 1)                                               # [M, R, H, K, V]
    if packed:                                                               # only the first document's streams
        h0 = torch.cat([h0, torch.zeros(M, len(lengths) - 1, H, K, V, dtype=torch.float64)], 1)
    want, final = mixture_of_memories(q, k, v, weights, plan, g, beta=beta, initial_state=h0,
                                      output_final_state=True, backend="torch")
    start = h0.reshape(-1, H, K, V)
    assert rel_err(o, want) < 1e-12
    assert rel_err(m @ start + u, final.reshape(-1, H, K, V)) < 1e-12
    R = plan.num_rows
    assert torch.equal(m[2 * R:], torch.eye(K, dtype=torch.float64).expand(R, H, K, K))
    assert torch.equal(u[2 * R:], torch.zeros(R, H, K, V, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs beta"):
        mom.mom_affine_phases(q, k, v, weights, plan, g, beta=None)
    with pytest.raises(ValueError, match="R dividing"):
        mom.mom_dense_state_output(x, torch.cat([state, state]), weights, plan)


def test_state_output_per_key_decay_is_the_initial_state_part():
    """mom_state_output with gk = MoM(S) − MoM(0) before `reach`, and its gradients."""
    gen = torch.Generator().manual_seed(10)
    B, T, M, top_k, H, K, V = 2, 11, 3, 2, 2, 4, 5
    logits = routing_logits(B, T, M, dtype=torch.float64, gen=gen)
    q, k, v, _, _, h0 = mom_inputs(B, T, M, H, K, V, decay=None, dtype=torch.float64, gen=gen, n_rows=B)
    gk = _per_key_decay(B, T, M, H, K, gen)
    weights, indices, _ = mom_route(logits, top_k)
    want = (mom_reference(q, k, v, weights, indices, gk=gk, initial_state=h0)[0]
            - mom_reference(q, k, v, weights, indices, gk=gk)[0])
    want[1, 6:] = 0
    got = mom_state_output(q, h0.transpose(0, 1), weights, indices, gk=gk, reach=torch.tensor([T, 6]))
    assert rel_err(got, want) < 1e-12
    leaves, do = [q, h0, logits, gk], torch.randn_like(got)
    for name, a, b in zip("q h0 logits gk".split(), torch.autograd.grad(got, leaves, do, retain_graph=True),
                          torch.autograd.grad(want, leaves, do)):
        assert rel_err(a, b) < 1e-11, name


@pytest.mark.parametrize("backend, dtype, tol", [("torch", torch.float64, 1e-12), ("triton", torch.float32, 1e-5)])
def test_phases_match_the_op(backend, dtype, tol):
    """`mom_phases` run back to back (summarize, output, grad_q, grad_kvg with the routing
    weights as the extra input) gives `mixture_of_memories`' outputs, final states and
    gradients of q, k, v, g and the router logits (Triton: the fused query gather)."""
    gen = torch.Generator().manual_seed(12)
    B, T, M, top_k, H, K, V = 1, 21, 3, 2, 1, 16, 16
    cu = random_cu_seqlens([8, 13])
    logits = routing_logits(B, T, M, dtype=dtype, gen=gen)
    q, k, v, g, _, _ = mom_inputs(B, T, M, H, K, V, decay="g", dtype=dtype, gen=gen, n_rows=2, with_h0=False)
    weights, indices, _ = mom_route(logits, top_k)
    plan = mom_dispatch(indices, M, cu)
    do = torch.randn(B, T, H, V, dtype=dtype, generator=gen)
    d_final = torch.randn(M, 2, H, K, V, dtype=torch.promote_types(dtype, torch.float32), generator=gen)
    o, final = mixture_of_memories(q, k, v, weights, plan, g, output_final_state=True, backend=backend)
    leaves = [q, k, v, g, logits]
    want = torch.autograd.grad([o, final], leaves, [do, d_final], retain_graph=True)

    phases, (q_, k_, v_, decay_, w_) = mom.mom_phases(q, k, v, weights, plan, g, backend=backend)
    with torch.no_grad():
        final_p, saved = phases.summarize(k_, v_, decay_, None)
        o_p = phases.output(q_, k_, v_, decay_, saved, w_)
        dq, partial = phases.grad_q(q_, k_, v_, decay_, saved, do, w_)
        dk, dv, d_decay, _, d_w = phases.grad_kvg(q_, k_, v_, decay_, saved, partial, d_final.view(M * 2, H, K, V),
                                                  w_, want_dh0=False)
    assert rel_err(o_p, o) < tol and rel_err(final_p.view_as(final), final) < tol
    got = [dq, *torch.autograd.grad([k_, v_, decay_], [k, v, g], [dk, dv, d_decay], retain_graph=True),
           *torch.autograd.grad(w_, logits, d_w)]
    for name, a, b in zip("q k v g logits".split(), got, want):
        assert rel_err(a, b) < tol, f"d{name} {rel_err(a, b):.1e}"


def test_load_balancing_loss():
    gen = torch.Generator().manual_seed(7)
    B, T, M, top_k = 2, 30, 4, 2
    logits = torch.randn(B, T, M, dtype=torch.float64, generator=gen, requires_grad=True)
    _, indices, probs = mom_route(logits, top_k)
    loss = load_balancing_loss(probs, indices)
    fraction = F.one_hot(indices, M).sum((0, 1, 2)).double() / (B * T * top_k)
    want = M * (fraction * probs.mean((0, 1))).sum()
    assert rel_err(loss, want) < 1e-14
    # Perfect balance (uniform probabilities, every memory equally used) gives exactly 1.
    uniform = torch.full((1, 4, M), 1 / M, dtype=torch.float64)
    assert load_balancing_loss(uniform, torch.arange(M).view(1, 4, 1)).item() == pytest.approx(1.0)
    # Shares computed with the whole's totals sum to the whole (what sequence parallelism does).
    counts = mom.routing_counts(indices, M)
    halves = [load_balancing_loss(probs[:, s], indices[:, s], counts=counts, num_tokens=B * T)
              for s in (slice(0, 13), slice(13, T))]
    assert rel_err(sum(halves), loss) < 1e-14
    # The fractions carry no gradient: d loss / d probs = M · f / N.
    d_probs = torch.autograd.grad(loss, probs)[0]
    assert rel_err(d_probs, (M * fraction / (B * T)).expand(B, T, M)) < 1e-14


def test_bad_inputs_raise():
    q = torch.randn(1, 8, 2, 4)
    logits = torch.randn(1, 8, 4)
    logits[:, 0, 3] = 10.0  # memory 3 is routed at least once, so 3 memories are too few
    weights, indices, _ = mom_route(logits, 2)
    plan = mom_dispatch(indices, 4)
    kv = torch.randn(1, 8, 4, 2, 4)
    with pytest.raises(ValueError, match="top_k must be an int in"):
        mom_route(logits, 5)
    with pytest.raises(TypeError, match="indices must be int64"):
        mom_dispatch(indices.int(), 4)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 3\)"):
        mom_dispatch(indices, 3)
    with pytest.raises(ValueError, match="positive divisor"):
        mom_dispatch(indices, 4, segment_len=3)
    with pytest.raises(ValueError, match="end at T=8"):
        mom_dispatch(indices, 4, torch.tensor([0, 3, 7]))
    with pytest.raises(ValueError, match=r"k must be \[B, T, M, H, D\]"):
        mixture_of_memories(q, kv[:, :, 0], kv, weights, plan)
    with pytest.raises(ValueError, match="all 4 memories"):
        mixture_of_memories(q, kv[:, :, :3], kv, weights, plan)
    with pytest.raises(ValueError, match="weights must be"):
        mixture_of_memories(q, kv, kv, weights[..., :1], plan)
    with pytest.raises(ValueError, match="g must have 4 dimensions"):
        mixture_of_memories(q, kv, kv, weights, plan, -torch.rand(1, 8, 2))
    with pytest.raises(ValueError, match="log-decays and must be finite and <= 0"):
        mixture_of_memories(q, kv, kv, weights, plan, torch.rand(1, 8, 4, 2))
    with pytest.raises(ValueError, match="must be finite and <= 0"):
        mixture_of_memories(q, kv, kv, weights, plan, torch.full((1, 8, 4, 2), float("-inf")))
    with pytest.raises(ValueError, match=r"beta must have shape \(1, 8, 4, 2\)"):
        mixture_of_memories(q, kv, kv, weights, plan, beta=torch.rand(1, 8, 3, 2))
    with pytest.raises(ValueError, match="beta must be finite"):
        mixture_of_memories(q, kv, kv, weights, plan, beta=torch.full((1, 8, 4, 2), float("nan")))
    with pytest.raises(ValueError, match="initial_state must be"):
        mixture_of_memories(q, kv, kv, weights, plan, initial_state=torch.zeros(4, 2, 2, 4, 4))
    with pytest.raises(TypeError, match="plan must be a MoMPlan"):
        mixture_of_memories(q, kv, kv, weights, indices)
    with pytest.raises(ValueError, match="weight must be"):
        mom_projection(torch.randn(1, 8, 6), torch.randn(3, 5, 6), plan)


HOT_PATH = [mom.mom_route, mom.mom_dispatch, mom.MoMPlan, mom._Rows, mom._GroupedProjection,
            mom.mom_projection, mom.mixture_of_memories, mom.routed_log_decay, mom.mom_state_output,
            mom._MoMStateOutput, mom.MoMPhases, mom.mom_phases, mom.mom_affine_phases,
            mom.mom_dense_state_output, mom.routing_counts, mom.load_balancing_loss, triton_mom]


def test_hot_path_has_no_host_sync():
    """Structural check (a CPU run cannot catch a sync; the GPU tier runs under
    `set_sync_debug_mode("error")`): no host reads of tensor values on the hot path."""
    from lasp.parallel import mom as parallel_mom
    pattern = re.compile(r"\.(item|tolist|cpu|numpy)\(|\bbincount\b|\bnonzero\b|\bint\(|\bbool\(")
    for obj in HOT_PATH + [parallel_mom]:
        source = inspect.getsource(obj)
        if obj is parallel_mom:
            source = source.split("def _check_inputs")[0]
        assert not pattern.search(source), f"{obj.__name__}: {pattern.search(source).group(0)}"
