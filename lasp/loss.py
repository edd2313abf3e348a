"""Language-model loss without the logits of the whole sequence, and its sharding contract.

At a million tokens and a 128K vocabulary the logits would need hundreds of GB, so
`chunked_cross_entropy` projects and scores `chunk_size` tokens at a time, each chunk
under activation checkpointing (its logits are recomputed in the backward, never kept).

Contract under sequence parallelism (torchtitan's): each rank's loss is the SUM of its
local token losses divided by the number of valid tokens of the WHOLE sequence (counted
before sharding: `ShardedBatch.num_tokens`), and parameter gradients are SUMMED across
the SP group. FSDP/DDP over a dp×sp mesh reduce gradients for you but AVERAGE them: set
their divide factor to 1 (FSDP2: `set_gradient_divide_factor(1.0)` on every `fully_shard`
unit, as `lasp-train` does) and divide by the valid tokens of the whole global batch, or
multiply the loss by the number of ranks they average over. Without a wrapper, call
`sum_gradients(model, group)` after `backward()`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lasp.parallel.comm import all_reduce

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 4096


def chunk_loss(hidden, weight, labels, ignore_index):
    """Summed cross-entropy of one chunk's tokens; its [chunk, vocab] logits exist only here.
    Compiled (`lasp-train --compile`: `lasp.launch.compile`), the logits' upcast, log-softmax
    and gradient fuse into a few passes over them instead of one per op."""
    logits = F.linear(hidden, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          chunk_size: int = DEFAULT_CHUNK_SIZE, ignore_index: int = IGNORE_INDEX,
                          scoring=chunk_loss) -> torch.Tensor:
    """Sum over tokens of cross_entropy(hidden @ weightᵀ, labels), `chunk_size` tokens at a time.

    hidden: [..., D]; weight: [V, D] (the output embedding); labels: [...] next-token
    targets, `ignore_index` where there is none; scoring: each chunk's loss, `chunk_loss` or
    it compiled. Returns a scalar (fp32, fp64 for fp64).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden {tuple(hidden.shape)} without its "
                         "last dimension")
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.shape[0], chunk_size):
        part = slice(start, start + chunk_size)
        total = total + checkpoint(scoring, hidden[part], weight, labels[part], ignore_index,
                                   use_reentrant=False)
    return total


def sum_gradients(model: torch.nn.Module, group=None) -> None:
    """All-reduce (sum) every parameter gradient over `group`: the SP half of the loss contract.
    A trainable parameter without a gradient on this rank contributes zeros."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:  # unused here (an expert no local token chose) but maybe not on a peer:
            p.grad = torch.zeros_like(p)  # every rank joins every all-reduce, in the same order
        all_reduce(p.grad, group)


def causal_lm_loss(model, batch, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """This rank's loss on a `ShardedBatch`: local token-loss sum ÷ `batch.num_tokens`, plus
    `config.router_aux_loss_coef` × this rank's share of the load-balancing loss of the whole
    sequence, when the model has one (`causal_lm_losses`).

    Works for every model `lasp.parallelize` supports (its decoder is `model.base_model`,
    its output embedding `model.get_output_embeddings()`); logits exist one chunk at a time.
    A transformers model must have been parallelized (W = 1 is fine) for packed documents
    to be masked: its own attention ignores `cu_seqlens`. (Summed over dp data-parallel
    sequences, the aux part is the sum of their aux losses, not their mean: `lasp-train`'s
    `train_step` composes its loss itself, weighing the aux loss by 1/dp.)
    """
    lm_loss, aux_loss = causal_lm_losses(model, batch.input_ids, batch.shift_labels, cu_seqlens=batch.cu_seqlens,
                                         num_tokens=batch.num_tokens, chunk_size=chunk_size)
    return lm_loss if aux_loss is None else lm_loss + model.config.router_aux_loss_coef * aux_loss


def causal_lm_losses(model, input_ids: torch.Tensor, shift_labels: torch.Tensor, *,
                     cu_seqlens: torch.Tensor | None, num_tokens: torch.Tensor,
                     chunk_size: int = DEFAULT_CHUNK_SIZE, scoring=chunk_loss
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(lm_loss, aux_loss) of this rank's tokens: the token-loss sum ÷ `num_tokens`, and this
    rank's share of the WHOLE sequence's load-balancing loss, or None. `scoring`: as in
    `chunked_cross_entropy`.

    The aux loss: lasp's Mixture-of-Memories layers report their share in the decoder's
    `aux_loss`; a transformers MoE model whose config sets `output_router_logits` (its own
    forward then adds the aux loss) gets transformers' load-balancing loss computed over the
    whole sequence (`lasp.integrations.hf.moe`). The ranks' shares sum to the loss of the
    whole sequence, and so do their gradients.
    """
    routed = False
    if getattr(model.config, "output_router_logits", False):   # a transformers MoE model (lasp's have no such field)
        from lasp.integrations.hf.moe import router_aux_loss, routes_aux_loss
        routed = routes_aux_loss(model)
    out = model.base_model(input_ids=input_ids, cu_seqlens=cu_seqlens,
                           **(dict(output_router_logits=True) if routed else {}))
    weight = model.get_output_embeddings().weight
    lm_loss = chunked_cross_entropy(out.last_hidden_state, weight, shift_labels, chunk_size=chunk_size,
                                    scoring=scoring) / num_tokens
    if routed:
        return lm_loss, router_aux_loss(model, out.router_logits, input_ids.shape[1])
    return lm_loss, getattr(out, "aux_loss", None)
