"""`lasp-train --compile`: `torch.compile` each block, as torchtitan does.

Each block of `model_blocks(model)` is compiled in place (`nn.Module.compile`), so parameter
names, checkpoints and FSDP2's per-block sharding stay as they are, and blocks of one kind
share their compiled graphs. On one GPU (--sp-size 1) a block compiles whole, attention
included: lasp's Triton kernels are custom ops that Dynamo records as single calls
(`lasp.kernels.compiled`) and softmax attention's backends trace. Under sequence
parallelism the graph breaks at each attention op, which runs eagerly as without compile
(Triton kernels, LASP-2 and LASP-2H collectives); what surrounds it — norms, projections,
RoPE, feature maps, gates, the SwiGLU MLP, residuals — is compiled. FSDP2's hooks run
eagerly (Dynamo's default). The loss's per-chunk scoring (`lasp.loss.chunk_loss`) is
compiled too: at a 128K vocabulary each 4K-token chunk's logits take 1 GB in bf16, and
eagerly their fp32 upcast, log-softmax and gradient each make a pass over them.

Full activation checkpointing wraps the compiled block (the backward runs its compiled
forward again). Selective checkpointing sits inside it (torchtitan's order: checkpoint,
then compile; `LinearLlamaBlock.forward`): AOT autograd's partitioner applies its policy,
keeping the matmuls' and the attention ops' outputs and recomputing the element-wise work in
the compiled backward. It needs the block to compile whole: --sp-size 1, lasp presets.
"""

from __future__ import annotations

import torch

from lasp.launch.model import model_blocks


def compile_blocks(model, backend: str = "inductor") -> int:
    """Compile each block of `model` in place with `torch.compile(backend=backend)`, before the
    engine shards it, and the loss's per-chunk scoring (`model.chunk_loss`, which lasp-train's
    models have: `lasp.loss.chunk_loss`); returns the number of blocks. The first steps trace
    and compile."""
    blocks = model_blocks(model)
    for block in blocks:
        block.compile(backend=backend)
    model.chunk_loss = torch.compile(model.chunk_loss, backend=backend)
    return len(blocks)
