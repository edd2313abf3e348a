"""LASP-2 and LASP-1 on gloo CPU processes vs the single-process torch oracle, in float64.

Every rank draws the same full inputs from a fixed seed, runs the oracle on the whole
sequence, shards the inputs with the layout, runs the parallel op on its shard, and
checks its outputs and its gradients against the shard of the oracle's (g_gamma: the sum
over ranks). One process group per world size runs every case, to keep spawning cheap.
"""

import functools

import pytest
import torch
import torch.distributed as dist

from lasp.kernels import linear_attention
from lasp.parallel import SequenceLayout, lasp1_linear_attention, lasp2_linear_attention
from lasp.parallel.lasp2 import sequence_parallel_linear_attention
from lasp.parallel.scan import all_gather_scan
from tests.distributed import run_distributed
from tests.utils import grads, random_cu_seqlens, random_inputs, rel_err

TOL = 1e-10
METHODS = {
    "lasp2": lasp2_linear_attention,
    "lasp1": lasp1_linear_attention,
    "lasp2-sync": functools.partial(sequence_parallel_linear_attention,
                                    exchange=functools.partial(all_gather_scan, overlap=False)),
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
    for decay in (None, "g_gamma", "g"):
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
        q, k, v, g, g_gamma, _ = random_inputs(B, T, H, K, V, decay=decay, generator=gen)
        do = torch.randn(B, T, H, V, dtype=torch.float64, generator=gen)
        cu = documents(T, L, W) if packed else None
        inputs = [q, k, v, g, g_gamma]
        o, _ = linear_attention(q, k, v, g, g_gamma, cu_seqlens=cu, causal=causal, backend="torch")
        want = grads([o], inputs, [do])
        for kind in ("contiguous", "zigzag"):
            layout = SequenceLayout(T, W, rank, kind)
            local = [None if x is None else (x if x is g_gamma else layout.shard(x)).detach().requires_grad_()
                     for x in inputs]
            for method in methods:
                where = f"{method} {kind} W={W} {name}"
                o_local = METHODS[method](*local, layout=layout, cu_seqlens=cu, causal=causal)
                got = grads([o_local], local, [layout.shard(do)])
                assert rel_err(o_local, layout.shard(o)) <= TOL, where
                live = [(n, x) for n, x in zip("q k v g g_gamma".split(), inputs) if x is not None]
                for (arg, _), mine, ref in zip(live, got, want):
                    if arg == "g_gamma":
                        dist.all_reduce(mine)
                    else:
                        ref = layout.shard(ref)
                    assert rel_err(mine, ref) <= TOL, f"{where}: d{arg} rel err {rel_err(mine, ref):.1e}"


@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_matches_single_process_oracle(W):
    """Outputs and gradients of q, k, v, g, g_gamma: plain, g_gamma, g; B = 2, packed,
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
