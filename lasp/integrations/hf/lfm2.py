"""LFM2 (``lfm2``): `Lfm2ShortConv`'s gated short convolution through lasp's `short_conv`.

transformers' layer (channels last here):

    b, c, x = in_proj(h).chunk(3)
    out     = out_proj(c ⊙ conv(b ⊙ x))     (depthwise causal conv of width conv_L_cache, no activation)

lasp's `short_conv` gives the convolution its left context from the previous rank (the SP
halo) and masks taps that reach before a packed document's start. The softmax layers go
through `lasp_sp`; the MLPs are per token.
"""

from __future__ import annotations

import torch

from lasp.integrations.hf.context import check_training_call, context_of
from lasp.layers.conv import short_conv

MODEL_TYPES = ("lfm2",)


def gated_short_conv(bcx, weight, bias=None, **op_kwargs) -> torch.Tensor:
    """LFM2's operator on [B, T, 3C] in-projections (b, c, x): c ⊙ conv(b ⊙ x), conv `weight`
    [C, K] with the current token last; `op_kwargs` from `HFContext.op_kwargs`."""
    b, c, x = bcx.chunk(3, dim=-1)
    return c * short_conv(b * x, weight, bias, **op_kwargs)


def short_conv_forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
    """`Lfm2ShortConv.forward` with lasp's convolution (SP halo, document masking) → output.
    A cache or padding mask is refused."""
    check_training_call(self, cache, attention_mask, **kwargs)
    y = gated_short_conv(self.in_proj(hidden_states), self.conv.weight[:, 0], self.conv.bias,
                         **context_of(self).op_kwargs(hidden_states.shape[1]))
    return self.out_proj(y)


ADAPTERS = {"Lfm2ShortConv": short_conv_forward}
