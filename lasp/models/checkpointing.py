"""Activation checkpointing of the blocks: full, or selective (torchtitan's kind).

`full` (True) recomputes the whole block in the backward. `selective` keeps the outputs of
the block's matmuls (its projections and MLP: most of its FLOPs) and of its attention op
(lasp's single-device kernels, `lasp.kernels.compiled.FORWARD_OPS`, and torch's sdpa and
flex attention), and recomputes the rest — norms, RoPE, activations, gates — for the memory
of those outputs. The value is `LinearLlamaConfig.activation_checkpointing` (False, True /
"full", "selective").

Under torch.compile the selective checkpoint sits inside each compiled block (torchtitan's
order: checkpoint, then compile; `LinearLlamaBlock.forward`), so that AOT autograd's
partitioner applies the policy to the block's graph. Eagerly the policy sees each op as it
runs. (The sequence-parallel attention ops break a compiled graph, and a checkpoint with a
graph break inside runs eagerly around compiled pieces whose ops its policy does not see:
`lasp-train` refuses selective with --compile under sequence parallelism.)
"""

from __future__ import annotations

import torch
from torch._higher_order_ops.flex_attention import flex_attention as flex_attention_hop
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts, noop_context_fn

from lasp.kernels.compiled import FORWARD_OPS

# The ops whose outputs selective checkpointing keeps (the functional overloads: a compiled
# graph's out= matmuls write into buffers of their own and must run again): matmuls and
# attention (sdpa's kernels, flex attention, lasp's single-device Triton forwards).
SAVED_OPS = frozenset({
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    flex_attention_hop, *FORWARD_OPS})


def save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing's policy: keep matmul and attention outputs, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context():
    """The forward and recompute contexts of one selectively checkpointed call."""
    return create_selective_checkpoint_contexts(save_matmuls)


def checkpoint_context_fn(mode):
    """`context_fn` for torch.utils.checkpoint.checkpoint under `mode` (True or "full":
    recompute everything; "selective": keep matmul and attention outputs)."""
    if mode is True or mode == "full":
        return noop_context_fn
    if mode == "selective":
        return selective_context
    raise ValueError(f"activation_checkpointing must be True, 'full' or 'selective' here, got {mode!r}")
