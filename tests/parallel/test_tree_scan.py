"""The log-depth exchange (`lasp.parallel.scan.PrefixScan`) on gloo CPU processes in float64,
and the rule by which LASP-2 chooses its exchange (`default_exchange`).

Every rank draws the same summaries of every global segment from a fixed seed, walks the
chains one segment at a time (the oracle), runs the exchange on its own segments, and
checks the incoming values and the gradients of its states and transition parameters
against its rows of the oracle's: a forward and a reverse chain, every transition kind,
both layouts.
"""

import math

import pytest
import torch

from lasp.kernels import linear_attention
from lasp.kernels.transition import KINDS, Transition
from lasp.parallel import SequenceLayout, comm, lasp2_linear_attention, scan
from lasp.parallel.scan import AllGatherScan, PrefixScan, default_exchange, prefix_scan
from tests.distributed import run_distributed
from tests.parallel.test_lasp2 import documents, random_transitions, sequential_chains
from tests.utils import grads, random_decay, random_inputs, rel_err

TOL = 1e-10


def _scan_body(rank, W, layouts, kinds, device="cpu"):
    B, H, K, V, reverse = 2, 2, 3, 4, (False, True)
    for layout_kind in layouts:
        layout = SequenceLayout(4 * W, W, rank, layout_kind)
        S, mine = layout.num_segments, list(layout.local_segments)
        for kind in kinds:
            gen = torch.Generator().manual_seed(11 + W)
            states = torch.randn(S, 2, B, H, K, V, dtype=torch.float64, generator=gen)
            transitions = random_transitions(kind, (S, 2, B, H), K, gen)
            d_incoming = torch.randn(S, 2, B, H, K, V, dtype=torch.float64, generator=gen).to(device)
            leaves = [x.detach().to(device).requires_grad_() for x in (states, transitions.param) if x is not None]
            states, transitions = leaves[0], transitions if kind == "identity" else Transition(kind, leaves[1])
            want = sequential_chains(states, transitions, reverse)
            want_grads = (torch.autograd.grad(want, leaves, d_incoming) if want.requires_grad
                          else [torch.zeros_like(x) for x in leaves])     # one segment: nothing enters it

            local = [x[mine].detach().requires_grad_() for x in leaves]
            local_transitions = transitions if transitions.param is None else Transition(kind, local[1])
            scan.bytes_sent = 0
            got = prefix_scan(local[0], local_transitions, layout, None, reverse)
            where = f"prefix_scan W={W} {layout_kind} {kind}"
            assert rel_err(got, want[mine]) <= TOL, where
            # log depth: at most ⌈log2 S⌉ rounds, each sending each local summary at most once
            summary_bytes = (states[0, 0].numel() + (0 if transitions.param is None
                                                     else transitions.param[0, 0].numel())) * 8
            assert scan.bytes_sent <= math.ceil(math.log2(S)) * len(mine) * 2 * summary_bytes, where
            for name, a, b in zip(("states", "transitions"), torch.autograd.grad(got, local, d_incoming[mine]),
                                  want_grads):
                assert rel_err(a, b[mine]) <= TOL, f"{where}: d {name} rel err {rel_err(a, b[mine]):.1e}"


@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_prefix_scan_matches_a_sequential_scan(W):
    """Incoming values and the gradients of the states and every kind of transition
    parameter (dense: the transposed, reversed compositions), forward and reverse chains,
    both layouts; bytes sent stay within ⌈log2 S⌉ summaries per local segment and chain."""
    run_distributed(_scan_body, W, ("contiguous", "zigzag"), KINDS)


def test_prefix_scan_at_eight_ranks():
    """W = 8, zigzag (16 segments, 4 rounds, two positions per rank), dense transitions."""
    run_distributed(_scan_body, 8, ("zigzag",), ("dense",))


@pytest.mark.gpu
def test_prefix_scan_on_gpus():
    """W = 2 on CUDA tensors: NCCL on two GPUs, or (one GPU, or LASP_SHARED_GPU=1) two ranks on one
    GPU over gloo, whose CUDA tensors go through host memory (tests/distributed.py)."""
    run_distributed(_scan_body, 2, ("contiguous", "zigzag"), KINDS, "cuda", cuda=True)


def _lasp2_body(rank, W):
    """LASP-2 through its default exchange with the rule lowered to pick `PrefixScan` at
    W = 2 (the all-gather made to fail), against the single-process oracle."""
    def no_gather(*args, **kwargs):
        raise AssertionError("the all-gather ran although the rule picked the prefix scan")
    comm.all_gather_into_tensor = no_gather
    scan.PREFIX_SCAN_WORLD = 2
    H, K, V, L = 2, 5, 6, 7
    T = 2 * W * L
    for decay, causal in (("g", True), (None, False)):
        gen = torch.Generator().manual_seed(5)
        q, k, v, _, _, _ = random_inputs(1, T, H, K, V, generator=gen)
        gate = random_decay(decay, 1, T, H, K, generator=gen)
        do = torch.randn(1, T, H, V, dtype=torch.float64, generator=gen)
        cu = documents(T, L, W)
        inputs = [q, k, v, *gate.values()]
        o, _ = linear_attention(q, k, v, **gate, cu_seqlens=cu, causal=causal, backend="torch")
        want = [o, *grads([o], inputs, [do])]
        for kind in ("contiguous", "zigzag"):
            layout = SequenceLayout(T, W, rank, kind)
            local = [layout.shard(x).detach().requires_grad_() for x in inputs]
            o_local = lasp2_linear_attention(*local[:3], **dict(zip(gate, local[3:])), layout=layout,
                                             cu_seqlens=cu, causal=causal)
            got = [o_local, *grads([o_local], local, [layout.shard(do)])]
            for name, mine, ref in zip(["o", "dq", "dk", "dv", f"d{decay}"], got, want):
                err = rel_err(mine, layout.shard(ref))
                assert err <= TOL, f"{kind} {decay} causal={causal}: {name} rel err {err:.1e}"


def test_lasp2_with_the_prefix_scan():
    """Outputs and gradients of q, k, v, g: packed documents, causal with g and
    bidirectional (the reverse chain), both layouts, W = 2."""
    run_distributed(_lasp2_body, 2)


def test_default_exchange_rule():
    """The all-gather below 16 ranks whatever the size, and up to 32 for states under
    8 MiB; the prefix scan from 32 ranks, or from 16 with states of 8 MiB or more."""
    MiB = 1 << 20
    for W, state, want in ((1, 64 * MiB, AllGatherScan), (2, 1, AllGatherScan), (8, 64 * MiB, AllGatherScan),
                           (16, 8 * MiB - 1, AllGatherScan), (16, 8 * MiB, PrefixScan),
                           (31, 1 * MiB, AllGatherScan), (32, 0, PrefixScan), (256, 1 * MiB, PrefixScan)):
        assert default_exchange(W, state) is want, (W, state)
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        default_exchange(0, 1)
    with pytest.raises(ValueError, match="state_bytes must be >= 0"):
        default_exchange(2, -1)
    with pytest.raises(TypeError, match="world_size must be an int"):
        default_exchange(2.0, 1)
    with pytest.raises(TypeError, match="state_bytes must be an int"):
        default_exchange(2, True)

