"""Mixture-of-Memories under sequence parallelism (gloo CPU processes) vs one process, float64.

Every rank draws the same full inputs, runs the single-process oracle (`mom_reference`,
loop over memories) on the whole sequence, shards the inputs by the layout, routes and
dispatches its own tokens, runs `lasp2_mixture_of_memories`, and checks its outputs and
the gradients of q, k, v, g / gk, beta (g_gamma: summed over ranks) and the router logits
against the oracle's shard. Delta-rule memories (beta) go through the dense-transition
exchange. The load-balancing loss shares must sum to the whole
sequence's loss, with matching gradients. The MixtureOfMemories layer (shared memory,
data decay) is checked the same way: outputs and parameter gradients summed over ranks,
and so is a parallelized "LMN" Linear-Llama through `lasp.causal_lm_loss`. Packed
documents cross rank boundaries (`tests.parallel.test_lasp2.documents`); memories that
receive no token on a rank (forced) must pass their state through. The collectives
overlap the local phases as LASP-2's do.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lasp.kernels.mom import load_balancing_loss, mom_reference, mom_route
from lasp.layers import MixtureOfMemories
from lasp.parallel import SequenceLayout, lasp2_load_balancing_loss, lasp2_mixture_of_memories, local_plan
from tests.distributed import record_overlap, run_distributed
from tests.kernels.test_mom import memory_gates, mom_inputs, routing_logits
from tests.parallel.test_lasp2 import documents
from tests.utils import rel_err

TOL = 1e-10
AUX_WEIGHT = 0.7


def cases():
    """(name, B, L, M, top_k, decay, packed, empty, delta); L odd so T = 2W·L is no power of 2."""
    return [
        ("g B=2", 2, 5, 4, 2, "g", False, (), False),
        ("g_gamma packed", 1, 7, 4, 2, "g_gamma", True, (), False),
        ("plain packed k=1", 1, 7, 3, 1, None, True, (), False),
        ("g packed k=M", 1, 5, 3, 3, "g", True, (), False),
        ("g B=2 memory empty on a rank", 2, 5, 4, 2, "g", False, (2,), False),
        ("g_gamma packed memory empty on a rank", 1, 5, 4, 1, "g_gamma", True, (0,), False),
        ("gk packed", 1, 5, 3, 2, "gk", True, (), False),
        ("delta g packed memory empty on a rank", 1, 5, 3, 2, "g", True, (1,), True),
        ("delta gk B=2", 2, 5, 3, 2, "gk", False, (), True),
        ("delta g_gamma packed k=1", 1, 5, 3, 1, "g_gamma", True, (), True),
    ]


def _empty_on_rank(logits, layout, memory):
    """Route `memory` away from every token of `layout`'s rank: a memory empty on one rank."""
    logits = logits.detach().clone()
    for start, end in layout.segment_bounds():
        logits[:, start:end, memory] = -50.0
    return logits.requires_grad_()


def _check_op(rank, W, kind, name, B, L, M, top_k, decay, packed, empty, delta):
    H, K, V = 2, 3, 4
    T = 2 * W * L
    gen = torch.Generator().manual_seed(100 * W + len(name))
    layout = SequenceLayout(T, W, rank, kind)
    cu = documents(T, L, W) if packed else None
    logits = routing_logits(B, T, M, dtype=torch.float64, gen=gen)
    for m in empty:
        logits = _empty_on_rank(logits, SequenceLayout(T, W, W // 2, kind), m)   # a middle rank
    q, k, v, g, g_gamma, _ = mom_inputs(B, T, M, H, K, V, decay=decay, dtype=torch.float64, gen=gen,
                                        n_rows=1, with_h0=False)
    if delta:                       # the delta rule wants normalised keys (as the layers give it)
        k = F.normalize(k.detach(), dim=-1)
    gk, beta = memory_gates(B, T, M, H, K, decay=decay, delta=delta, dtype=torch.float64, gen=gen)
    do = torch.randn(B, T, H, V, dtype=torch.float64, generator=gen)
    inputs = dict(q=q, k=k, v=v, g=g, g_gamma=g_gamma, gk=gk, beta=beta, logits=logits)
    inputs = {n: x.requires_grad_() for n, x in inputs.items() if x is not None}

    weights, indices, probs = mom_route(logits, top_k)
    o, _ = mom_reference(q, k, v, weights, indices, g, g_gamma, gk=gk, beta=beta, cu_seqlens=cu)
    loss = (o * do).sum() + AUX_WEIGHT * load_balancing_loss(probs, indices)
    want = dict(zip(inputs, torch.autograd.grad(loss, list(inputs.values()))))

    local = {n: (x if n == "g_gamma" else layout.shard(x)).detach().requires_grad_() for n, x in inputs.items()}
    w_local, idx_local, probs_local = mom_route(local["logits"], top_k)
    plan = local_plan(idx_local, M, layout=layout, cu_seqlens=cu)
    o_local = lasp2_mixture_of_memories(local["q"], local["k"], local["v"], w_local, plan, local.get("g"),
                                        local.get("g_gamma"), gk=local.get("gk"), beta=local.get("beta"),
                                        layout=layout, cu_seqlens=cu)
    aux_local = lasp2_load_balancing_loss(probs_local, idx_local, layout=layout)
    loss_local = (o_local * layout.shard(do)).sum() + AUX_WEIGHT * aux_local
    got = dict(zip(local, torch.autograd.grad(loss_local, list(local.values()))))

    where = f"{kind} W={W} {name}"
    assert rel_err(o_local, layout.shard(o)) <= TOL, where
    aux_total = aux_local.detach().clone()
    dist.all_reduce(aux_total)
    assert rel_err(aux_total, load_balancing_loss(probs, indices)) <= 1e-13, f"{where}: aux"
    for arg, mine in got.items():
        ref = want[arg]
        if arg == "g_gamma":
            dist.all_reduce(mine)
        else:
            ref = layout.shard(ref)
        assert rel_err(mine, ref) <= TOL, f"{where}: d{arg} rel err {rel_err(mine, ref):.1e}"


def _check_layer(rank, W, kind):
    torch.manual_seed(0)
    hidden, H, D, L = 12, 2, 4, 5
    T = 2 * W * L
    gen = torch.Generator().manual_seed(11)
    layout = SequenceLayout(T, W, rank, kind)
    data = MixtureOfMemories(hidden, H, D, num_memories=3, top_k=2, decay="data").double()
    delta = MixtureOfMemories(hidden, H, D, num_memories=3, top_k=2, decay="data", delta_rule=True).double()
    packed = documents(T, L, W)
    for layer, cu, B in ((data, None, 2), (data, packed, 1), (delta, packed, 1)):
        x = torch.randn(B, T, hidden, dtype=torch.float64, generator=gen, requires_grad=True)
        dout = torch.randn(B, T, hidden, dtype=torch.float64, generator=gen)
        params = list(layer.parameters())
        out, aux = layer(x, cu_seqlens=cu)
        want = torch.autograd.grad((out * dout).sum() + AUX_WEIGHT * aux, [x, *params])
        x_local = layout.shard(x).detach().requires_grad_()
        out_local, aux_local = layer(x_local, layout=layout, cu_seqlens=cu)
        got = torch.autograd.grad((out_local * layout.shard(dout)).sum() + AUX_WEIGHT * aux_local,
                                  [x_local, *params])
        where = f"layer {kind} W={W} {'packed' if cu is not None else 'B=2'}{' delta' if layer.delta_rule else ''}"
        assert rel_err(out_local, layout.shard(out)) <= TOL, where
        assert rel_err(got[0], layout.shard(want[0])) <= TOL, f"{where}: dx"
        for (pname, _), mine, ref in zip(layer.named_parameters(), got[1:], want[1:]):
            dist.all_reduce(mine)
            assert rel_err(mine, ref) <= TOL, f"{where}: d{pname} rel err {rel_err(mine, ref):.1e}"


def _check_model(rank, W, kind):
    """A parallelized "LMN" Linear-Llama: `causal_lm_loss` shares (cross-entropy plus the aux
    loss share) sum to the one-process loss, and SP-summed gradients match."""
    import copy

    import lasp
    from lasp.models import LinearLlamaForCausalLM, linear_llama_config
    torch.manual_seed(0)
    model = LinearLlamaForCausalLM(linear_llama_config("tiny", vocab_size=64, layer_pattern="LMN",
                                                       router_aux_loss_coef=0.5)).double()
    T = 2 * W * 5
    ids = torch.randint(0, 64, (1, T))
    cu = documents(T, 5, W)
    reference = copy.deepcopy(model)
    ref_loss = reference(ids, cu_seqlens=cu, labels=ids).loss
    ref_grads = torch.autograd.grad(ref_loss, list(reference.parameters()))
    lasp.parallelize(model, kind=kind)
    batch = lasp.shard_batch(ids, layout=SequenceLayout(T, W, rank, kind), cu_seqlens=cu)
    loss = lasp.causal_lm_loss(model, batch, chunk_size=4)
    loss.backward()
    lasp.sum_gradients(model)
    total = loss.detach().clone()
    dist.all_reduce(total)
    assert rel_err(total, ref_loss) < 1e-10, f"model {kind} W={W}"
    for (name, p), g in zip(model.named_parameters(), ref_grads):
        assert rel_err(p.grad, g) < 1e-9, f"model {kind} W={W}: gradient of {name}"


def _check_all_body(rank, W):
    for kind in ("contiguous", "zigzag"):
        for case in cases():
            _check_op(rank, W, kind, *case)
        _check_layer(rank, W, kind)
        _check_model(rank, W, kind)


@pytest.mark.parametrize("W", [2, 3])
def test_matches_single_process(W):
    """Outputs, aux loss and gradients of every input; both layouts; B = 2 and packed
    documents; k = 1, 2, M; memories with no token on some rank."""
    run_distributed(_check_all_body, W)


def _bad_input_body(rank, W):
    T, H, D, M = 12, 2, 4, 3
    layout = SequenceLayout(T, W, rank, "zigzag")
    q = torch.randn(1, layout.local_len, H, D, dtype=torch.float64)
    kv = torch.randn(1, layout.local_len, M, H, D, dtype=torch.float64)
    weights, indices, _ = mom_route(torch.randn(1, layout.local_len, M, dtype=torch.float64), 2)
    plan = local_plan(indices, M, layout=layout)
    from lasp.kernels import mom_dispatch
    with pytest.raises(ValueError, match="make it with local_plan"):
        lasp2_mixture_of_memories(q, kv, kv, weights, mom_dispatch(indices, M), layout=layout)
    with pytest.raises(ValueError, match="layout is for rank"):
        lasp2_mixture_of_memories(q, kv, kv, weights, plan, layout=SequenceLayout(T, W + 1, rank, "zigzag"))
    with pytest.raises(ValueError, match="local 6 tokens"):
        local_plan(indices[:, :3], M, layout=layout)
    with pytest.raises(TypeError, match="layout must be a SequenceLayout"):
        lasp2_mixture_of_memories(q, kv, kv, weights, plan, layout=None)
    # Every rank raised without entering a collective: the group still works.
    assert lasp2_mixture_of_memories(q, kv, kv, weights, plan, layout=layout).shape == q.shape


def test_bad_input_raises_on_every_rank():
    run_distributed(_bad_input_body, 2)


def _order_body(rank, W):
    """Record MoM's local phases and collectives in the order LASP-2 MoM calls them, for
    decayed memories and for delta-rule ones (the affine phases)."""
    from lasp.kernels.delta.chunk import TorchAffinePhases
    from lasp.kernels.mom import MoMPhases
    log = record_overlap(MoMPhases, TorchAffinePhases)

    B, L, M, top_k, H, K, V = 1, 5, 3, 2, 2, 4, 4
    T = 2 * W * L
    gen = torch.Generator().manual_seed(4)
    layout = SequenceLayout(T, W, rank, "zigzag")
    cu = documents(T, L, W)
    q, k, v, g, _, _ = mom_inputs(B, T, M, H, K, V, decay="g", dtype=torch.float64, gen=gen, n_rows=1,
                                  with_h0=False)
    q, k, v, g = (layout.shard(x).detach().requires_grad_() for x in (q, k, v, g))
    weights, indices, _ = mom_route(layout.shard(routing_logits(B, T, M, dtype=torch.float64, gen=gen)), top_k)
    plan = local_plan(indices, M, layout=layout, cu_seqlens=cu)
    log.clear()
    o = lasp2_mixture_of_memories(q, k, v, weights, plan, g, layout=layout, cu_seqlens=cu)
    assert log == ["summarize", "issue", "output", "wait"], f"forward: {log}"
    log.clear()
    torch.autograd.grad(o, [q, k, v, g], torch.randn_like(o))
    assert log == ["issue", "grad_q", "wait", "grad_kvg"], f"backward: {log}"

    k_unit = F.normalize(k.detach(), dim=-1).requires_grad_()
    beta = torch.rand(*k.shape[:-1], dtype=torch.float64, generator=gen).requires_grad_()   # [B, L, M, H]
    log.clear()
    o = lasp2_mixture_of_memories(q, k_unit, v, weights, plan, g, beta=beta, layout=layout, cu_seqlens=cu)
    assert log == ["summarize", "issue", "output", "wait"], f"delta forward: {log}"
    log.clear()
    torch.autograd.grad(o, [q, k_unit, v, g, beta], torch.randn_like(o))
    assert log == ["issue", "output_grad", "wait", "grad"], f"delta backward: {log}"


def test_collectives_overlap_the_independent_phases():
    """As `lasp2_linear_attention`: the summaries' gather is in flight while the streams'
    zero-state outputs are computed, the state gradients' while the dq phase runs (with
    delta-rule memories: while the outputs' dδ phase runs)."""
    run_distributed(_order_body, 2)


def _triton_body(rank, W):
    from tests.conftest import install_kernel_test_hooks
    install_kernel_test_hooks()                       # NaN-poisoned outputs, interpreter fix
    B, L, M, top_k, H, K, V = 1, 7, 3, 2, 1, 16, 16
    T = 2 * W * L
    cu = documents(T, L, W)
    layout = SequenceLayout(T, W, rank, "zigzag")
    # The scalar and the diagonal kernels, and the delta family's affine run.
    for decay, delta in (("g", False), ("gk", False), ("g", True)):
        gen = torch.Generator().manual_seed(13)
        logits = routing_logits(B, T, M, dtype=torch.float64, gen=gen)
        q, k, v, g, _, _ = mom_inputs(B, T, M, H, K, V, decay=decay, dtype=torch.float64, gen=gen, n_rows=1,
                                      with_h0=False)
        if delta:
            k = F.normalize(k.detach(), dim=-1).requires_grad_()
        gk, beta = memory_gates(B, T, M, H, K, decay=decay, delta=delta, dtype=torch.float64, gen=gen)
        do = torch.randn(B, T, H, V, dtype=torch.float64, generator=gen)
        inputs = dict(q=q, k=k, v=v, g=g, gk=gk, beta=beta, logits=logits)
        inputs = {n: x for n, x in inputs.items() if x is not None}
        weights, indices, _ = mom_route(logits, top_k)
        o, _ = mom_reference(q, k, v, weights, indices, g, gk=gk, beta=beta, cu_seqlens=cu)
        want = dict(zip(inputs, torch.autograd.grad(o, list(inputs.values()), do)))
        local = {n: layout.shard(x).detach().float().requires_grad_() for n, x in inputs.items()}
        w_local, idx_local, _ = mom_route(local["logits"], top_k)
        plan = local_plan(idx_local, M, layout=layout, cu_seqlens=cu)
        o_local = lasp2_mixture_of_memories(local["q"], local["k"], local["v"], w_local, plan, local.get("g"),
                                            gk=local.get("gk"), beta=local.get("beta"), layout=layout,
                                            cu_seqlens=cu, backend="triton")
        where = f"{decay}{' delta' if delta else ''}"
        assert rel_err(o_local, layout.shard(o)) <= 2e-5, where
        got = torch.autograd.grad(o_local, list(local.values()), layout.shard(do).float())
        for name, mine in zip(local, got):
            err = rel_err(mine, layout.shard(want[name]))
            assert err <= 2e-5, f"{where}: d{name} rel err {err:.1e}"


def test_triton_phases_under_the_interpreter():
    """The Triton path (fused query gather, weights in the kernels; the scalar kernels for
    g, the diagonal ones for gk; for delta-rule memories the delta family's affine run)
    through the same overlapped exchanges: fp32, packed documents, zigzag, outputs and
    every gradient."""
    run_distributed(_triton_body, 2)
