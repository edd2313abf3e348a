"""Run a test body on W CPU processes joined by a gloo process group.

    def body(rank, world_size, *args): ...      # a module-level function (picklable)
    run_distributed(body, world_size, *args)

Each process calls `body` with the group initialised; a failure on any rank (assertion
or exception) fails the calling test with that rank's traceback. A rank that hangs is
killed after `timeout` seconds and fails the test.
"""

from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, body, args, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        body(rank, world_size, *args)
    except BaseException:  # report every failure, including assertion errors
        errors.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(body, world_size: int, *args, timeout: float = 300.0) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, body, args, errors))
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
    if failures:
        rank, tb = sorted(failures)[0]
        raise AssertionError(f"rank {rank} of {world_size} failed:\n{tb}")
    if hung:
        raise AssertionError(f"ranks {hung} of {world_size} did not finish within {timeout}s")
    bad = [r for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise AssertionError(f"ranks {bad} of {world_size} exited abnormally")
