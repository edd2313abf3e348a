"""Activation checkpointing of the blocks: full, or selective (torchtitan's kind).

`full` (True) recomputes the whole block in the backward. `selective` keeps the outputs of
the block's attention op (lasp's single-device kernels, `lasp.kernels.compiled.FORWARD_OPS`,
and torch's sdpa and flex attention) and of every other matmul (the 1st, 3rd, ... of the
block), and recomputes the rest — the other projections, norms, RoPE, activations, gates.
Keeping every matmul output did not fit linear-llama3-1b at 64K tokens on an 80 GB H100
(out of memory with 77.5 GB in use, 2026-12-06): every other one about halves that memory
for about a third of the block's matmul FLOPs recomputed (torchtitan's default selective
policy). Measured there, compiled, it is slower than `full`: 41.6K tokens/s and 58 GB
against 51.6K and 28.5 GB (session 6). The value is
`LinearLlamaConfig.activation_checkpointing` (False, True / "full", "selective");
`activation_checkpointing_blocks` limits either to the first N blocks.

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

# The functional overloads (a compiled graph's out= matmuls write into buffers of their own
# and must run again).
MATMULS = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default})
ATTENTION_OPS = frozenset({
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    flex_attention_hop, *FORWARD_OPS})


def keeps_output(op, matmuls_before: int) -> bool:
    """Selective checkpointing's rule: keep an attention op's output, and a matmul's when it
    is the 1st, 3rd, 5th ... matmul of the checkpointed call (`matmuls_before` ran before it)."""
    if op in MATMULS:
        return matmuls_before % 2 == 0
    return op in ATTENTION_OPS


def selective_context():
    """The forward and recompute contexts of one selectively checkpointed call. Matmuls are
    counted apart in the forward and in the recompute, so that both pick the same ones."""
    counts = {False: 0, True: 0}

    def policy(ctx, op, *args, **kwargs):
        keep = keeps_output(op, counts[ctx.is_recompute])
        counts[ctx.is_recompute] += op in MATMULS
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE
    return create_selective_checkpoint_contexts(policy)


def checkpoint_context_fn(mode):
    """`context_fn` for torch.utils.checkpoint.checkpoint under `mode` (True or "full":
    recompute everything; "selective": keep attention outputs and every other matmul's)."""
    if mode is True or mode == "full":
        return noop_context_fn
    if mode == "selective":
        return selective_context
    raise ValueError(f"activation_checkpointing must be True, 'full' or 'selective' here, got {mode!r}")
