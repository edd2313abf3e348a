"""`lasp-train --compile`: `torch.compile` each block, as torchtitan does.

Each block of `model_blocks(model)` is compiled in place (`nn.Module.compile`), so parameter
names, checkpoints and FSDP2's per-block sharding stay as they are, and blocks of one kind
share their compiled graphs. The attention ops are not traced (`lasp.kernels.compiled`):
the graph breaks at each op, which runs eagerly as without compile (Triton kernels, LASP-2
and LASP-2H collectives), and what surrounds it — norms, projections, RoPE, feature maps,
gates, the SwiGLU MLP, residuals — is compiled. FSDP2's hooks run eagerly too (Dynamo's
default). Full activation checkpointing wraps the compiled block; selective checkpointing
does not combine with it yet (its policy sees no matmul of a compiled graph: it would
recompute everything, as full does).
"""

from __future__ import annotations

from lasp.launch.model import model_blocks


def compile_blocks(model, backend: str = "inductor") -> int:
    """Compile each block of `model` in place with `torch.compile(backend=backend)`, before the
    engine shards it; returns the number of blocks. The first steps trace and compile."""
    blocks = model_blocks(model)
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)
