"""Run a test body on W processes joined by a process group.

    def body(rank, world_size, *args): ...      # a module-level function (picklable)
    run_distributed(body, world_size, *args)              # W CPU ranks over gloo
    run_distributed(body, world_size, *args, cuda=True)   # W ranks on CUDA (below)

Each process calls `body` with the group initialised; a failure on any rank (assertion
or exception) fails the calling test with every failing rank's traceback. A rank that hangs is
killed after `timeout` seconds and fails the test.

GPU runs (`cuda=True`, the multi-rank GPU tests): with W GPUs, rank r runs on GPU r over
NCCL. With fewer GPUs than ranks, or with the environment variable **`LASP_SHARED_GPU=1`**,
the W ranks share GPU 0 over gloo instead: NCCL refuses two ranks on one device, while
gloo moves CUDA tensors through host memory (`lasp.parallel.comm`). That checks
correctness and stream ordering across ranks on a one-GPU machine, not NCCL's speed, so
the multi-rank GPU tier runs on any GPU machine (tests/conftest.py skips `gpu` tests only
where there is no CUDA GPU).
"""

from __future__ import annotations

import json
import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SHARED_GPU = os.environ.get("LASP_SHARED_GPU") == "1"


def shares_gpu(world_size: int) -> bool:
    """Whether a GPU run of `world_size` ranks puts them all on GPU 0 over gloo."""
    return SHARED_GPU or torch.cuda.device_count() < world_size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_group(rank: int, world_size: int, cuda: bool) -> None:
    if not cuda:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    elif shares_gpu(world_size):
        torch.cuda.set_device(0)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    else:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")    # no NVLink multicast
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=torch.device("cuda", rank))


def _worker(rank, world_size, port, cuda, body, args, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    status = 0
    try:
        _init_group(rank, world_size, cuda)
        body(rank, world_size, *args)
        dist.barrier()      # no rank tears the group down while a peer still uses it
    except BaseException:  # report every failure, including assertion errors
        errors.put((rank, traceback.format_exc()))
        status = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Leave without the interpreter's teardown: gloo's threads can abort it now and then
    # ("terminate called without an active exception") after a body that passed. The
    # report is flushed first; a crash inside the body still shows as an abnormal exit.
    errors.close()
    errors.join_thread()
    os._exit(status)


def run_distributed(body, world_size: int, *args, timeout: float = 300.0, cuda: bool = False) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, cuda, body, args, errors))
             for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    if failures:  # every rank's report: a peer's "connection closed" is not the cause
        raise AssertionError("\n".join(f"rank {rank} of {world_size} failed:\n{tb}" for rank, tb in sorted(failures)))
    if hung:
        raise AssertionError(f"ranks {hung} of {world_size} did not finish within {timeout}s")
    bad = [r for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise AssertionError(f"ranks {bad} of {world_size} exited abnormally")


def global_rel_err(a_local: torch.Tensor, b_local: torch.Tensor, group=None) -> float:
    """‖a − b‖ / ‖b‖ over the whole sequence, from each rank's shards (a collective, float64)."""
    a, b = a_local.double(), b_local.double()
    squares = torch.stack([(a - b).square().sum(), b.square().sum()])
    dist.all_reduce(squares, group=group)
    return (squares[0] / squares[1]).sqrt().item()


def report(name: str, rows: list[dict]) -> None:
    """Print `rows` (one dict per case) as a table and, when $OUT is set, write them with the
    device and versions to $OUT/<name>.json. Rank 0 calls it."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    shared = shares_gpu(dist.get_world_size())
    print(f"\n{name} ({'ranks sharing one GPU over gloo' if shared else 'one GPU per rank'})")
    print("  ".join(keys))
    for row in rows:
        print("  ".join(f"{row[k]:.2e}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys))
    if os.environ.get("OUT"):
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        record = {"device": device, "torch": torch.__version__, "shared_gpu": shared, "rows": rows}
        with open(os.path.join(os.environ["OUT"], f"{name}.json"), "w") as f:
            json.dump(record, f, indent=1)


def record_overlap(*phases_classes) -> list:
    """Log, in the returned list, the phases of each of `phases_classes` (summarize, output
    and grad_q, grad_kvg, or the affine phases' output_grad, grad) and LASP-2's all-gathers
    ("issue" / "wait", or "blocking gather") as they are called in this process: the
    overlap-order tests compare the log with the intended order."""
    from lasp.parallel import comm
    log = []

    def logged(name, fn):
        def phase(*args, **kwargs):
            log.append(name)
            return fn(*args, **kwargs)
        return phase
    for phases_class in phases_classes:
        for name in ("summarize", "output", "grad_q", "grad_kvg", "output_grad", "grad"):
            if hasattr(phases_class, name):
                setattr(phases_class, name, logged(name, getattr(phases_class, name)))

    class Handle:
        def __init__(self, work):
            self.work = work

        def wait(self):
            log.append("wait")
            return self.work.wait()
    gather_into = comm.all_gather_into_tensor

    def gather(*args, async_op=False, **kwargs):
        work = gather_into(*args, async_op=async_op, **kwargs)
        log.append("issue" if async_op else "blocking gather")
        return Handle(work) if async_op else work
    comm.all_gather_into_tensor = gather
    return log


def assert_layer_shards_match(layer, x, cot, layout, cu_seqlens=None, what="", tol=1e-10) -> None:
    """Inside a run_distributed body: `layer` on this rank's shard of the whole input `x`
    (under `layout`) gives the shard of its one-process output, and after `sum_gradients`
    the gradient of x's shard and of every parameter equal one process's (cotangent `cot`)."""
    from lasp.loss import sum_gradients
    from tests.utils import rel_err

    x = x.detach().requires_grad_()
    out = layer(x, cu_seqlens=cu_seqlens)
    dx, *dparams = torch.autograd.grad(out, [x, *layer.parameters()], cot)
    x_local = layout.shard(x.detach()).requires_grad_()
    out_local = layer(x_local, layout=layout, cu_seqlens=cu_seqlens)
    assert rel_err(out_local, layout.shard(out)) < tol, what
    layer.zero_grad()
    out_local.backward(layout.shard(cot))
    sum_gradients(layer)
    assert rel_err(x_local.grad, layout.shard(dx)) < tol, what
    for (name, p), expected in zip(layer.named_parameters(), dparams):
        assert rel_err(p.grad, expected) < tol, (what, name)
