"""Activation checkpointing of the blocks: full, or selective (torchtitan's kind).

`full` (True) recomputes the whole block in the backward. `selective` keeps the outputs of
the block's matmuls (its projections and MLP: most of its FLOPs) and recomputes the rest —
norms, RoPE, activations, gates and the attention ops — for the memory of those outputs.
The value is `LinearLlamaConfig.activation_checkpointing` (False, True / "full", "selective").
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts, noop_context_fn

# The ops whose outputs selective checkpointing keeps (the functional overloads: a compiled
# graph's out= matmuls write into buffers of their own and must run again).
SAVED_OPS = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default})


def save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing's policy: keep matmul outputs, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context():
    """The forward and recompute contexts of one selectively checkpointed call."""
    return create_selective_checkpoint_contexts(save_matmuls)


def checkpoint_context_fn(mode):
    """`context_fn` for torch.utils.checkpoint.checkpoint under `mode` (True or "full":
    recompute everything; "selective": keep matmul outputs)."""
    if mode is True or mode == "full":
        return noop_context_fn
    if mode == "selective":
        return selective_context
    raise ValueError(f"activation_checkpointing must be True, 'full' or 'selective' here, got {mode!r}")
