"""The job's processes: stopping on a signal, dying with the launcher, one job per output directory.

- `GracefulStop`: SIGTERM or SIGINT (a scheduler's preemption, Ctrl-C) lets every rank finish
  its step, write a checkpoint and exit cleanly; a second signal stops a process at once.
- `die_with_launcher`: a worker is killed by the kernel when the process that started it dies.
- `lock_output_dir`: an exclusive lock on `<output-dir>/.lock` for the job's lifetime.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
LAUNCHER_PID_ENV = "LASP_LAUNCHER_PID"  # set by the launcher for its workers
LOCK_HELD_ENV = "LASP_OUTPUT_DIR_LOCKED"  # set by a launcher that holds the output directory's lock
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class GracefulStop:
    """Turns SIGTERM / SIGINT into "stop after this step", agreed by all ranks.

    The handler only records the signal. Each step, the ranks all-reduce (max) a
    one-element HOST tensor on a gloo group: started at the top of the step, read once the
    step's work is issued. Why this and not the alternatives:
    - it never waits for the GPU (a host tensor on gloo), so the loop's only device syncs
      stay at the log steps, and the exchange overlaps with issuing the step;
    - every rank reads the same collective after the same step, so all stop after the same
      step even when the signal reaches them at different times (torchrun forwards it to
      each worker in turn; a scheduler may signal only some);
    - an all-reduce only "at the step where a signal arrived" cannot work: the other ranks
      do not know that step; agreeing only at the log steps (the loop's existing device
      sync) waits up to --log-every steps, and torchrun SIGKILLs its workers 30 s after it
      forwards the signal;
    - it is never left in flight across code that can fail, so a rank that raises still
      exits at once (and torchrun stops the others).
    A signal that arrives during step s stops the job after step s or s + 1.
    """

    def __init__(self):
        self.received: signal.Signals | None = None
        self._group = self._pending = None
        self._flag = torch.zeros(1, dtype=torch.int64)
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum)
        for stop_signal in STOP_SIGNALS:  # a second one stops the process at once
            signal.signal(stop_signal, signal.SIG_DFL)

    def start(self, group) -> signal.Signals | None:
        """Before the loop: join the ranks (`group`: a gloo group of all of them); the signal
        that any rank received during the set-up."""
        self._group = group
        self.share()
        return self.agreed()

    def share(self) -> None:
        """At the top of every step on every rank: start sharing whether a signal arrived."""
        self._flag.fill_(int(self.received or 0))
        self._pending = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)

    def agreed(self) -> signal.Signals | None:
        """After the step's work is issued: the signal if any rank had one when it shared; then
        every rank stops after this step."""
        self._pending.wait()
        self._pending = None
        received = int(self._flag.item())  # a host tensor: no device sync
        return signal.Signals(received) if received else None

    def close(self) -> None:
        """Restore the handlers that were there before."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def first_error(error: str | None, world_size: int) -> str | None:
    """The error of the lowest rank that has one, on every rank, so that all ranks take the
    same decision (start-up only: it waits for every rank)."""
    errors = [None] * world_size
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def die_with_launcher() -> None:
    """Linux: ask the kernel to SIGKILL this worker when its parent (torchrun, or the
    `lasp-train` launcher that runs torchrun) dies, even by SIGKILL.

    torchrun starts each worker in a session of its own, so without this a killed launcher
    leaves its workers training unsupervised. PR_SET_PDEATHSIG is used rather than a thread
    that polls the parent's pid: the kernel delivers it whatever the worker is doing (a
    polling thread can be starved while the main thread holds the GIL, and it would need a
    period). It fires when the parent THREAD exits: torchrun starts workers from its main
    thread. A launcher that died before this call is caught by comparing the parent pid
    with the one the launcher exported.
    """
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher is not None and os.getppid() != int(launcher):
        os._exit(1)  # the launcher is already gone


def lock_output_dir(output_dir: str):
    """Hold an exclusive lock on `<output_dir>/.lock` (created with the directory) for as long as
    the returned file stays open (the kernel releases it when the process dies); ValueError
    naming --output-dir if another job holds it.

    fcntl.flock; on NFS, Linux maps it to a POSIX lock that the server enforces for every node.
    """
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    file = open(path / ".lock", "a+")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "another process"
        file.close()
        raise ValueError(f"--output-dir {output_dir} is in use by another lasp-train job ({holder}); wait for "
                         "it to finish, stop it, or choose another --output-dir") from None
    file.truncate(0)
    file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    file.flush()
    return file
