"""LASP-2 and LASP-1 on gloo CPU processes vs the single-process torch oracle, in float64.

Every rank draws the same full inputs from a fixed seed, runs the oracle on the whole
sequence, shards the inputs with the layout, runs the parallel op on its shard, and
checks its outputs and its gradients against the shard of the oracle's (g_gamma: the sum
over ranks). One process group per world size runs every case, to keep spawning cheap.
Also: the Triton phases through LASP-2 under the interpreter (fp32, and bf16 as a GPU
computes it), the standalone exchanges against a sequential scan, and the order in which
LASP-2 interleaves its collectives with the local phases.
"""

import functools

import pytest
import torch
import torch.distributed as dist

from lasp.kernels import linear_attention
from lasp.kernels.transition import Transition
from lasp.parallel import SequenceLayout, lasp1_linear_attention, lasp2_linear_attention
from lasp.parallel.lasp2 import sequence_parallel_linear_attention
from lasp.parallel.scan import AllGatherScan, all_gather_scan, ring_scan
from tests.distributed import record_overlap, run_distributed
from tests.utils import DECAYS, grads, random_cu_seqlens, random_decay, random_inputs, rel_err

TOL = 1e-10
METHODS = {
    "lasp2": lasp2_linear_attention,
    "lasp1": lasp1_linear_attention,
    "lasp2-sync": functools.partial(sequence_parallel_linear_attention,
                                    exchange=functools.partial(AllGatherScan, overlap=False)),
}


def documents(T, L, W):
    """Packed documents of a T = 2W·L sequence (zigzag segments of L tokens, contiguous
    ones of 2L): length-1 documents, an empty one, a document starting exactly at a
    segment boundary (L; from W = 3 also the contiguous boundary 2L), and one that
    crosses the contiguous boundary T−2L: at W = 4 it spans three ranks (in both
    layouts) and leaves a rank with no document start."""
    offsets = sorted({0, 1, 3, L, T - 2 * L + 2, T - 2 * L + 3, T - 1, T} | ({2 * L} if W >= 3 else set()))
    offsets.insert(offsets.index(3), 3)
    return random_cu_seqlens([b - a for a, b in zip(offsets[:-1], offsets[1:])])


def cases(W):
    """(name, B, L, decay, packed, causal) for one world size; L odd so T = 2W·L is no power of 2."""
    out = []
    for decay in DECAYS:
        out.append((f"{decay} B=2", 2, 7, decay, False, True))
        out.append((f"{decay} packed", 1, 7, decay, True, True))
    out.append(("g B=1 L=13", 1, 13, "g", False, True))
    out.append(("bidirectional B=2", 2, 7, None, False, False))
    out.append(("bidirectional packed", 1, 7, None, True, False))
    return out


def _check_all_body(rank, W, methods):
    H, K, V = 2, 5, 6
    for name, B, L, decay, packed, causal in cases(W):
        T = 2 * W * L
        gen = torch.Generator().manual_seed(1000 * W + len(name))
        q, k, v, _, _, _ = random_inputs(B, T, H, K, V, generator=gen)
        gate = random_decay(decay, B, T, H, K, generator=gen)
        do = torch.randn(B, T, H, V, dtype=torch.float64, generator=gen)
        cu = documents(T, L, W) if packed else None
        o, _ = linear_attention(q, k, v, **gate, cu_seqlens=cu, causal=causal, backend="torch")
        names = ["q", "k", "v", *gate]
        inputs = [q, k, v, *gate.values()]
        want = grads([o], inputs, [do])
        for kind in ("contiguous", "zigzag"):
            layout = SequenceLayout(T, W, rank, kind)
            local = [(x if n == "g_gamma" else layout.shard(x)).detach().requires_grad_()
                     for n, x in zip(names, inputs)]
            for method in methods:
                where = f"{method} {kind} W={W} {name}"
                o_local = METHODS[method](*local[:3], **dict(zip(names[3:], local[3:])), layout=layout,
                                          cu_seqlens=cu, causal=causal)
                got = grads([o_local], local, [layout.shard(do)])
                assert rel_err(o_local, layout.shard(o)) <= TOL, where
                for arg, mine, ref in zip(names, got, want):
                    if arg == "g_gamma":
                        dist.all_reduce(mine)
                    else:
                        ref = layout.shard(ref)
                    assert rel_err(mine, ref) <= TOL, f"{where}: d{arg} rel err {rel_err(mine, ref):.1e}"


@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_matches_single_process_oracle(W):
    """Outputs and gradients of q, k, v and the decay: plain, g_gamma, g, gk; B = 2, packed,
    bidirectional; both layouts; LASP-2 (overlapped and synchronous gather) and LASP-1."""
    run_distributed(_check_all_body, W, list(METHODS))


def _bad_input_body(rank, W):
    T, H, D = 12, 2, 4                                   # W = 2: zigzag segments of 3
    layout = SequenceLayout(T, W, rank, "zigzag")
    q = torch.randn(1, layout.local_len, H, D, dtype=torch.float64)
    for fn in (lasp2_linear_attention, lasp1_linear_attention):
        with pytest.raises(ValueError, match="layout is for rank"):
            fn(q, q, q, layout=SequenceLayout(T, W + 1, rank, "zigzag"))
        with pytest.raises(ValueError, match="local 6 tokens"):
            fn(q[:, :3], q[:, :3], q[:, :3], layout=layout)
        with pytest.raises(ValueError, match="k must have the shape of q"):
            fn(q, q[..., :2], q, layout=layout)
        with pytest.raises(ValueError, match="g must have shape"):
            fn(q, q, q, -torch.rand(1, layout.local_len, H + 1, dtype=torch.float64), layout=layout)
        with pytest.raises(ValueError, match="end at T=12"):
            fn(q, q, q, layout=layout, cu_seqlens=torch.tensor([0, 3, 4]))
        with pytest.raises(ValueError, match="batch size 1"):
            q2 = q.expand(2, -1, -1, -1)
            fn(q2, q2, q2, layout=layout, cu_seqlens=torch.tensor([0, T]))
        with pytest.raises(ValueError, match="causal=False"):
            fn(q, q, q, -torch.rand(1, layout.local_len, H, dtype=torch.float64), layout=layout, causal=False)
        with pytest.raises(TypeError, match="layout must be a SequenceLayout"):
            fn(q, q, q, layout=None)
    with pytest.raises(ValueError, match="multiple of 4"):
        SequenceLayout(T + 2, W, rank, "zigzag")
    # Every rank raised without entering a collective: the group still works.
    assert lasp2_linear_attention(q, q, q, layout=layout).shape == q.shape


def test_bad_input_raises_on_every_rank():
    run_distributed(_bad_input_body, 2)


def _oracle_case(decay, delta, B, T, H, K, V, cu, rounding=torch.float64):
    """One case of the Triton bodies: inputs from a fixed seed, q, k, v and do rounded to
    `rounding` and held in float64 (as the kernels will see them; the delta rule's keys
    normalised, as its layers do), and the float64 oracle's output and gradients."""
    gen = torch.Generator().manual_seed(7)
    q, k, v, _, _, _ = random_inputs(B, T, H, K, V, generator=gen)
    gate = random_decay(decay, B, T, H, K, generator=gen)
    if delta:
        k = torch.nn.functional.normalize(k.detach(), dim=-1)
        gate["beta"] = torch.rand(B, T, H, dtype=torch.float64, generator=gen)
    do = torch.randn(B, T, H, V, dtype=torch.float64, generator=gen).to(rounding).double()
    q, k, v = (x.detach().to(rounding).double().requires_grad_() for x in (q, k, v))
    gate = {name: x.detach().requires_grad_() for name, x in gate.items()}
    inputs = [q, k, v, *gate.values()]
    o, _ = linear_attention(q, k, v, **gate, cu_seqlens=cu, backend="torch")
    return gate, inputs, do, [o, *grads([o], inputs, [do])]


def _triton_body(rank, W):
    from tests.conftest import install_kernel_test_hooks
    install_kernel_test_hooks()                       # NaN-poisoned outputs, interpreter fix
    H, K, V, L = 2, 16, 32, 11
    T = 2 * W * L
    for decay, delta, packed in ((None, False, False), ("g", False, True), ("gk", False, True), ("g", True, True),
                                 ("gk", True, False)):
        B = 1 if packed else 2
        cu = documents(T, L, W) if packed else None
        gate, inputs, do, want = _oracle_case(decay, delta, B, T, H, K, V, cu)
        for kind in ("contiguous", "zigzag"):
            layout = SequenceLayout(T, W, rank, kind)
            local = [layout.shard(x).detach().float().requires_grad_() for x in inputs]
            o_local = sequence_parallel_linear_attention(*local[:3], **dict(zip(gate, local[3:])), layout=layout,
                                                         cu_seqlens=cu, backend="triton")
            got = [o_local, *grads([o_local], local, [layout.shard(do).float()])]
            for name, mine, ref in zip(["o", "dq", "dk", "dv", *(f"d{x}" for x in gate)], got, want):
                err = rel_err(mine, layout.shard(ref))
                assert err <= 2e-5, f"{kind} {list(gate)} packed={packed}: {name} rel err {err:.1e}"


def test_triton_phases_under_the_interpreter():
    """LASP-2 on the Triton kernels (TRITON_INTERPRET=1, fp32, outputs poisoned with NaN):
    plain B = 2, g and gk with packed documents, the delta rule (dense transitions) with g
    packed and with gk at B = 2, both layouts, outputs and gradients."""
    run_distributed(_triton_body, 2)


def _triton_bf16_body(rank, W):
    from tests.bf16_interpreter import bf16_interpreter
    from tests.conftest import install_kernel_test_hooks
    install_kernel_test_hooks()
    H, K, V, L = 2, 16, 32, 11
    T = 2 * W * L
    cu = documents(T, L, W)
    gate, inputs, do, want = _oracle_case("g", True, 1, T, H, K, V, cu, rounding=torch.bfloat16)
    layout = SequenceLayout(T, W, rank, "zigzag")
    local = [layout.shard(x).detach().to(torch.bfloat16 if i < 3 else torch.float32).requires_grad_()
             for i, x in enumerate(inputs)]
    with bf16_interpreter():
        o_local = sequence_parallel_linear_attention(*local[:3], **dict(zip(gate, local[3:])), layout=layout,
                                                     cu_seqlens=cu, backend="triton")
        got = [o_local, *grads([o_local], local, [layout.shard(do).bfloat16()])]
    errors = {name: rel_err(mine, layout.shard(ref))
              for name, mine, ref in zip(["o", "dq", "dk", "dv", "dg", "dbeta"], got, want)}
    assert max(errors.values()) <= 4e-3, f"rank {rank}: relative errors {errors}"


def test_triton_phases_bf16_walks():
    """LASP-2 on the Triton kernels with bf16 inputs, so bf16 walk operands (the delta rule
    with g, packed, zigzag; its summaries' dense transitions walk widened values, and
    their gradients go through the backward walk's bf16 dδ and dS'), against the float64
    oracle on the same rounded inputs: within the GPU tier's bound for bf16 walks (4e-3).
    The interpreter computes bf16 as a GPU does (`bf16_interpreter`)."""
    run_distributed(_triton_bf16_body, 2)


def sequential_chains(states, transitions, reverse):
    """The value entering each global segment, walking the chains one segment at a time."""
    incoming = torch.zeros_like(states)
    for c, rev in enumerate(reverse):
        value = torch.zeros_like(states[0, c])
        for s in (reversed if rev else list)(range(states.shape[0])):
            incoming[s, c] = value
            value = transitions.select((s, c)).apply(value) + states[s, c]
    return incoming


def random_transitions(kind, shape, K, gen):
    """Transitions of every segment and chain, [S, C, B, H, ...], as leaves."""
    extra = {"identity": None, "scalar": (), "diagonal": (K,), "dense": (K, K)}[kind]
    if extra is None:
        return Transition.identity()
    param = torch.randn(*shape, *extra, dtype=torch.float64, generator=gen)
    param = param / K if kind == "dense" else -param.abs()
    return Transition(kind, param.requires_grad_())


def _exchange_body(rank, W):
    B, H, K, V, reverse = 2, 2, 3, 4, (False, True)
    for kind in ("contiguous", "zigzag"):
        layout = SequenceLayout(4 * W, W, rank, kind)
        S = layout.num_segments
        mine = list(layout.local_segments)
        for transition_kind in ("identity", "scalar", "diagonal", "dense"):
            gen = torch.Generator().manual_seed(3)
            states = torch.randn(S, 2, B, H, K, V, dtype=torch.float64, generator=gen).requires_grad_()
            transitions = random_transitions(transition_kind, (S, 2, B, H), K, gen)
            d_incoming = torch.randn(S, 2, B, H, K, V, dtype=torch.float64, generator=gen)
            leaves = [x for x in (states, transitions.param) if x is not None]
            want = sequential_chains(states, transitions, reverse)
            want_grads = torch.autograd.grad(want, leaves, d_incoming)
            for name, exchange in (("all_gather_scan", all_gather_scan),
                                   ("sync", functools.partial(all_gather_scan, overlap=False)),
                                   ("ring_scan", ring_scan)):
                local = [x[mine].detach().requires_grad_() for x in leaves]
                local_transitions = (transitions if transitions.param is None
                                     else Transition(transition_kind, local[1]))
                got = exchange(local[0], local_transitions, layout, None, reverse)
                where = f"{name} {kind} {transition_kind}"
                assert rel_err(got, want[mine]) <= TOL, where
                for a, b in zip(torch.autograd.grad(got, local, d_incoming[mine]), want_grads):
                    assert rel_err(a, b[mine]) <= TOL, f"{where}: gradient"


def test_exchanges_match_a_sequential_scan():
    """The exchanges as standalone differentiable ops (the delta rule's path runs them so)
    for every kind of transition, dense included: a forward and a reverse chain, incoming
    values and the gradients of the states and the transitions' parameters."""
    run_distributed(_exchange_body, 3)


def _order_body(rank, W):
    """Record the local phases and the collectives as LASP-2 calls them."""
    from lasp.kernels.common.documents import TorchPhases
    from lasp.kernels.delta.chunk import TorchAffinePhases
    log = record_overlap(TorchPhases, TorchAffinePhases)

    layout = SequenceLayout(4 * W * 3, W, rank, "zigzag")
    q, k, v, g, _, _ = random_inputs(1, layout.local_len, 2, 4, 4, decay="g")
    beta = torch.rand(g.shape, dtype=g.dtype).requires_grad_()
    for method, delta, forward, backward in (
            ("lasp2", False, ["summarize", "issue", "output", "wait"], ["issue", "grad_q", "wait", "grad_kvg"]),
            ("lasp2-sync", False, ["summarize", "blocking gather", "output"],
             ["blocking gather", "grad_q", "grad_kvg"]),
            ("lasp2", True, ["summarize", "issue", "output", "wait"], ["issue", "output_grad", "wait", "grad"])):
        inputs = [q, k, v, g, beta] if delta else [q, k, v, g]
        log.clear()
        o = METHODS[method](*inputs[:4], beta=beta if delta else None, layout=layout,
                            cu_seqlens=torch.tensor([0, 5, 4 * W * 3]))
        assert log == forward, f"{method} delta={delta} forward: {log}"
        log.clear()
        torch.autograd.grad(o, inputs, torch.randn_like(o))
        assert log == backward, f"{method} delta={delta} backward: {log}"


def test_collectives_overlap_the_independent_phases():
    """The gather is issued before the local work that does not need it and waited only
    before its result is used: forward after the zero-state outputs, backward after the
    dq phase (the delta rule's dense transitions: after the outputs' dδ). With
    overlap=False the gather blocks where it is issued."""
    run_distributed(_order_body, 2)
