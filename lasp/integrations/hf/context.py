"""`HFContext`: what lasp's forwards inside a wrapped transformers model read."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lasp.layers.sequence import SPContext


@dataclass
class HFContext:
    """The SP group of a wrapped model and the packed documents of its current forward.

    One object per wrapped model, attached to its decoder's modules as ``lasp_context``.
    The decoder's pre-hook sets `cu_seqlens` at every forward, so layers that transformers
    calls without the caller's keywords (most linear layers) still see the documents, and
    activation checkpointing recomputes with the same ones.
    """

    sp: SPContext
    cu_seqlens: torch.Tensor | None = None  # int [N+1], offsets of the WHOLE sequence

    def op_kwargs(self, local_len: int) -> dict:
        """`layout`, `group` and `cu_seqlens` for `lasp.layers.ops` and `short_conv` on
        `local_len` local tokens (no layout on one rank: the single-device kernels)."""
        layout = None if self.sp.world_size == 1 else self.sp.local_layout(local_len)
        return dict(layout=layout, group=self.sp.group, cu_seqlens=self.cu_seqlens)


def context_of(module) -> HFContext:
    """The `HFContext` that `lasp.parallelize` attached to `module`, or a clear error."""
    context = getattr(module, "lasp_context", None)
    if context is None:
        raise RuntimeError(f"{type(module).__name__} runs lasp's forward but its model did not go through "
                           "lasp.parallelize")
    return context


def check_training_call(module, cache=None, attention_mask=None, **kwargs) -> None:
    """Refuse what a replaced forward cannot honour: a generation cache (transformers passes it as
    `cache` or `cache_params`) or a padding mask (pack the documents and pass `cu_seqlens`)."""
    name = type(module).__name__
    if cache is not None or kwargs.get("cache_params") is not None:
        raise ValueError(f"{name} under lasp.parallelize is for training: it takes no cache (use_cache=False)")
    if attention_mask is not None:
        raise ValueError(f"{name} under lasp.parallelize takes no padding attention_mask: pack the documents "
                         "into one row and pass cu_seqlens")
