"""The ``"lasp_sp"`` attention function that a wrapped transformers model's softmax layers call.

It receives this rank's queries and keys/values ([B, H, T_local, D], RoPE already applied)
and runs LASP-2H over the SP group (the single-device kernel on one rank): keys and values
gathered, causal and packed-document masks by GLOBAL position.

Masks. ``"lasp_sp"`` is deliberately absent from transformers' `AttentionMaskInterface`:
there transformers would build each mask on the LOCAL tokens (wrong under SP) and, given
`position_ids`, look for packed documents with a host sync. So transformers builds none,
and what its masks would carry is honoured or refused here instead:
- causal: always (by global position); padding: refused; packed documents: `cu_seqlens`
  only (`position_ids` that restart at each document, transformers' padding-free packing,
  are refused by the decoder hook in `wrap.py`: given position_ids must be the global ones);
- sliding windows and chunked attention, which some models convey only through their mask
  (e.g. Qwen2-MoE's ``sliding_attention`` layers): read from the config by
  `attention_windows` when the model is parallelized, and a layer whose window is shorter
  than the sequence raises NotImplementedError (a window at least as long is plain causal).
"""

from __future__ import annotations

from lasp.integrations.hf.context import context_of
from lasp.layers.ops import softmax_attention_op

ATTENTION = "lasp_sp"
WINDOW_FIELDS = {"sliding_attention": "sliding_window", "chunked_attention": "attention_chunk_size"}


def attention_windows(config) -> dict[int, tuple[str, int]]:
    """Layer index → (layer type, window in tokens) of each softmax layer that transformers'
    mask would restrict to a sliding window or a chunk; layers not listed see their whole
    causal prefix.

    `layer_types` names the windowed layers (``sliding_attention``: `sliding_window`,
    ``chunked_attention``: `attention_chunk_size`). Without such a layer, a set
    `sliding_window` windows every softmax layer (Mistral, Mixtral, Qwen3-MoE, MiniMax), except
    in configs whose `use_sliding_window` already chose the layers in `layer_types`
    (Qwen2, Qwen3, Qwen2-MoE: ``max_window_layers``).
    """
    layer_types = list(getattr(config, "layer_types", None) or ())
    windows = {}
    for index, layer_type in enumerate(layer_types):
        size = getattr(config, WINDOW_FIELDS.get(layer_type, ""), None)
        if size:
            windows[index] = (layer_type, size)
    sliding_window = getattr(config, "sliding_window", None)
    layers_chosen = layer_types and hasattr(config, "use_sliding_window")
    if not windows and sliding_window and not layers_chosen:
        windows = {index: ("sliding_attention", sliding_window) for index in range(config.num_hidden_layers)}
    return windows


def lasp_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                   sliding_window=None, cu_seqlens=None, **kwargs):
    """transformers attention function: LASP-2H on [B, H, T_local, D] tensors → ([B, T_local, H, D], None)."""
    context = context_of(module)
    if attention_mask is not None:
        raise ValueError("lasp_sp attention takes no attention_mask: pack documents into one row and pass "
                         "cu_seqlens instead of padding")
    if dropout:
        raise NotImplementedError(f"lasp_sp attention has no attention dropout (got {dropout})")
    if key.shape[2] != query.shape[2]:
        raise ValueError("lasp_sp attention is for training: keys must be the local tokens' (no KV cache)")
    seq_len = query.shape[2] * context.sp.world_size
    if sliding_window is not None and sliding_window < seq_len:
        raise NotImplementedError(f"sliding-window attention (window {sliding_window} < sequence "
                                  f"{seq_len}) is not supported under lasp_sp")
    window = getattr(module, "lasp_attention_window", None)   # set by lasp.parallelize (attention_windows)
    if window is not None and window[1] < seq_len:
        layer_type, size = window
        raise NotImplementedError(f"layer {getattr(module, 'layer_idx', '?')} is {layer_type} over {size} tokens, "
                                  f"shorter than the sequence ({seq_len}): lasp_sp attends to the whole causal "
                                  f"prefix; train on sequences of at most {size} tokens")
    kwargs = context.op_kwargs(query.shape[2])
    if cu_seqlens is not None:
        kwargs["cu_seqlens"] = cu_seqlens
    out = softmax_attention_op(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=scaling,
                               **kwargs)
    return out, None
