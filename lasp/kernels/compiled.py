"""How `torch.compile` sees lasp's attention ops: as calls it runs, not code it traces.

The ops launch Triton kernels from autograd Functions that plan their launches on the
host and, under sequence parallelism, overlap LASP-2's collectives with them on a side
stream. Dynamo does not trace that faithfully, so a compiled caller (each block under
`lasp-train --compile`, `lasp.launch.compile`) breaks its graph at the op and runs it
eagerly, exactly as without compile; everything around it (projections, norms, RoPE,
the MLP) is compiled. Eager calls pass straight through (no import of torch._dynamo).
"""

from __future__ import annotations

import functools

import torch


def eager_under_compile(op):
    """`op`, run eagerly when torch.compile traces a call to it (a graph break there)."""
    @functools.wraps(op)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return torch.compiler.disable(op)(*args, **kwargs)
        return op(*args, **kwargs)
    return call
