"""The data side of sequence parallelism: shift labels, then shard a batch by the layout.

Labels are shifted BEFORE sharding: shifting a shard loses the label of its last token
(the next token lives on another rank). Every rank holds the whole batch, shards it
itself, and counts the valid labels of the whole sequence without a collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lasp.loss import IGNORE_INDEX
from lasp.parallel.layout import SequenceLayout


def next_token_labels(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                      ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """targets[t] = labels[t+1]; `ignore_index` at the last token and at each packed document's
    last token (no token predicts across a document boundary). labels: [B, T].

    Empty documents (equal offsets) have no last token: they mark nothing (their entry points
    at the sequence's last token, ignored anyway), computed on the device without a host sync.
    """
    targets = torch.full_like(labels, ignore_index)
    targets[:, :-1] = labels[:, 1:]
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=labels.device, dtype=torch.int64)
        last_tokens = torch.where(cu[1:] > cu[:-1], cu[1:] - 1, labels.shape[1] - 1)
        # scatter_, not `targets[:, last_tokens] = ...`: index_put with a CUDA index syncs.
        targets.scatter_(1, last_tokens[None].expand(targets.shape[0], -1), ignore_index)
    return targets


@dataclass
class ShardedBatch:
    """One rank's share of a batch; the field names are the models' keyword arguments."""

    input_ids: torch.Tensor            # [B, T_local]
    shift_labels: torch.Tensor         # [B, T_local] next-token targets (already shifted)
    position_ids: torch.Tensor         # [B, T_local] global positions of the local tokens
    cu_seqlens: torch.Tensor | None    # packed documents of the WHOLE sequence, unchanged
    num_tokens: torch.Tensor           # valid targets in the whole batch: divide the loss sum by it
    layout: SequenceLayout


def shard_batch(input_ids: torch.Tensor, labels: torch.Tensor | None = None, *, layout: SequenceLayout,
                cu_seqlens: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> ShardedBatch:
    """Shift `labels` (default: `input_ids`) to next-token targets, then shard everything by `layout`.

    input_ids, labels: the whole [B, T] batch, identical on every rank of the SP group
    (`labels` holds `ignore_index` where a token must not be learned). With packed
    documents, B = 1 and `cu_seqlens` [N+1] gives the document offsets.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    layout.check_input("input_ids", input_ids, dim=1, local=False)
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
    if cu_seqlens is not None and input_ids.shape[0] != 1:
        raise ValueError(f"packed documents (cu_seqlens) need batch size 1, got {input_ids.shape[0]}")
    targets = next_token_labels(input_ids if labels is None else labels, cu_seqlens, ignore_index)
    positions = layout.positions(input_ids.device).expand(input_ids.shape[0], -1)
    return ShardedBatch(
        input_ids=layout.shard(input_ids), shift_labels=layout.shard(targets), position_ids=positions,
        cu_seqlens=cu_seqlens, num_tokens=(targets != ignore_index).sum(), layout=layout)
