"""`no_host_sync()`: prove a region of a training step never waits for the GPU.

A host synchronisation (`.item()`, a device-to-host copy, a Python branch on a tensor
value) stalls the CPU until the GPU drains, so the next kernels are launched late and
the GPU idles. lasp's kernels, MoM routing and sequence-parallel ops have none on the
training hot path; wrap a step in `no_host_sync()` to check yours.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def no_host_sync():
    """Raise on any host-device synchronisation inside the block (CUDA; it synchronises
    once on entry so that earlier work does not count)."""
    if not torch.cuda.is_available():
        raise RuntimeError("no_host_sync() checks CUDA synchronisations and needs a CUDA device")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
