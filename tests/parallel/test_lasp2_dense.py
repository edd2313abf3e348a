"""LASP-2 and LASP-1 with dense transitions (the delta rule: DeltaNet, Gated DeltaNet,
KDA) on gloo CPU processes vs the single-process torch oracle, float64: outputs and the
gradients of q, k, v, beta and the decay, both layouts, B = 2 and packed documents that
cross ranks (with an empty and a length-1 document, and one that starts exactly at
a segment boundary)."""

import pytest
import torch
import torch.nn.functional as F

from lasp.kernels import linear_attention
from lasp.parallel import SequenceLayout, lasp1_linear_attention, lasp2_linear_attention
from tests.distributed import run_distributed
from tests.utils import grads, random_cu_seqlens, random_decay, rel_err

TOL = 1e-10


def _body(rank, W):
    H, K, V, L = 2, 4, 3, 5
    T = 2 * W * L
    for decay in (None, "g", "gk"):
        for packed in (False, True):
            B = 1 if packed else 2
            gen = torch.Generator().manual_seed(10 * W + packed)
            q, k, v = (torch.randn(B, T, H, d, dtype=torch.float64, generator=gen) for d in (K, K, V))
            k = F.normalize(k, dim=-1)                    # the layers normalise the delta rule's keys
            beta = torch.rand(B, T, H, dtype=torch.float64, generator=gen)
            gate = random_decay(decay, B, T, H, K, generator=gen, requires_grad=False)
            names = ["q", "k", "v", "beta", *gate]
            inputs = [x.requires_grad_() for x in (q, k, v, beta, *gate.values())]
            # a document starts exactly at a segment boundary (2L) and one crosses ranks
            cu = random_cu_seqlens([1, 2, 0, 2 * L - 3, T - 2 * L]) if packed else None
            o, _ = linear_attention(q, k, v, **gate, beta=beta, cu_seqlens=cu)
            do = torch.randn(o.shape, dtype=torch.float64, generator=gen)
            want = grads([o], inputs, [do])
            for kind in ("contiguous", "zigzag"):
                layout = SequenceLayout(T, W, rank, kind)
                local = [layout.shard(x).detach().requires_grad_() for x in inputs]
                for method in (lasp2_linear_attention, lasp1_linear_attention):
                    where = f"{method.__name__} {kind} W={W} {decay} packed={packed}"
                    o_local = method(*local[:3], beta=local[3], **dict(zip(gate, local[4:])), layout=layout,
                                     cu_seqlens=cu)
                    assert rel_err(o_local, layout.shard(o)) <= TOL, where
                    got = grads([o_local], local, [layout.shard(do)])
                    for name, mine, ref in zip(names, got, want):
                        err = rel_err(mine, layout.shard(ref))
                        assert err <= TOL, f"{where}: d{name} rel err {err:.1e}"


@pytest.mark.parametrize("W", [2, 3, 4])
def test_dense_transitions_match_single_process_oracle(W):
    run_distributed(_body, W)
