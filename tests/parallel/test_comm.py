"""`lasp.parallel.comm`: every collective against its definition, on gloo CPU ranks; on a GPU
(marker `gpu`), the same calls on CUDA tensors inside `lasp.no_host_sync()`.

The GPU test runs W ranks on W GPUs over NCCL, or, with fewer GPUs (or `LASP_SHARED_GPU=1`),
W ranks sharing GPU 0 over gloo (tests/distributed.py): there the gloo calls are exempt from the sync check,
and only for their own duration (a `.item()` right after still fails).
"""

import pytest
import torch
import torch.distributed as dist

import lasp
from lasp.parallel import comm
from tests.distributed import run_distributed


def _check_collectives(rank, W, device):
    def full(r):  # what rank r contributes: distinct values per rank and element
        return torch.arange(6, dtype=torch.float64, device=device).view(2, 3) + 100 * r

    everyone = torch.cat([full(r) for r in range(W)])                     # [W·2, 3]
    out = torch.empty_like(everyone)
    assert comm.all_gather_into_tensor(out, full(rank)) is None
    assert torch.equal(out, everyone)
    work = comm.all_gather_into_tensor(out.zero_(), full(rank), async_op=True)
    work.wait()
    assert torch.equal(out, everyone)

    stacked = torch.stack([everyone * (r + 1) for r in range(W)])         # rank r contributes everyone·(r+1)
    part = torch.empty(2, 3, dtype=torch.float64, device=device)
    comm.reduce_scatter_tensor(part, stacked[rank], async_op=True).wait()
    assert torch.equal(part, stacked.sum(0)[2 * rank:2 * rank + 2])

    x = full(rank)
    total = comm.sum_tensor(x)
    assert torch.equal(x, full(rank)) and torch.equal(total, sum(full(r) for r in range(W)))
    comm.all_reduce(x)
    assert torch.equal(x, total)

    received, works = comm.shift(full(rank))
    for work in works:
        work.wait()
    assert torch.equal(received, full((rank - 1) % W))
    into = torch.empty(2, 3, dtype=torch.float64, device=device)
    comm.send_recv({(rank + 1) % W: full(rank)}, {(rank - 1) % W: into})   # PrefixScan's rounds
    assert torch.equal(into, full((rank - 1) % W))
    if rank == 0:
        comm.send(full(0), 1)
    elif rank == 1:
        into = torch.empty(2, 3, dtype=torch.float64, device=device)
        comm.recv(into, 0)
        assert torch.equal(into, full(0))

    # all_gather is differentiable: the backward sums each block's gradient over the ranks.
    leaf = full(rank).requires_grad_()
    gathered = comm.all_gather(leaf)
    assert torch.equal(gathered, everyone)
    (grad,) = torch.autograd.grad(gathered, leaf, stacked[rank])
    assert torch.equal(grad, stacked.sum(0)[2 * rank:2 * rank + 2])


def _cpu_body(rank, W):
    _check_collectives(rank, W, "cpu")


def test_collectives_on_gloo_cpu():
    run_distributed(_cpu_body, 3)


def _gpu_body(rank, W):
    with lasp.no_host_sync():
        _check_collectives_without_host_values(rank, W)
    with lasp.no_host_sync():
        comm.sum_tensor(torch.ones(3, device="cuda"))
        with pytest.raises(RuntimeError):             # the check is back on after an exempt call
            torch.ones(3, device="cuda").sum().item()
    _check_collectives(rank, W, "cuda")               # and the values are right
    dist.barrier()


def _check_collectives_without_host_values(rank, W):
    """Every collective of comm on CUDA tensors, nothing read back to the host."""
    x = torch.randn(4, 3, device="cuda")
    out = x.new_empty(W * 4, 3)
    comm.all_gather_into_tensor(out, x)
    comm.all_gather_into_tensor(out, x, async_op=True).wait()
    comm.reduce_scatter_tensor(x.new_empty(4, 3), torch.randn(W * 4, 3, device="cuda"))
    comm.all_reduce(x)
    comm.sum_tensor(x)
    received, works = comm.shift(x)
    for work in works:
        work.wait()
    comm.send_recv({(rank + 1) % W: x}, {(rank - 1) % W: torch.empty_like(x)})
    leaf = x.clone().requires_grad_()
    torch.autograd.grad(comm.all_gather(leaf), leaf, torch.ones(W * 4, 3, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2])
def test_collectives_on_cuda_stay_sync_free(W):
    run_distributed(_gpu_body, W, cuda=True, timeout=300)
