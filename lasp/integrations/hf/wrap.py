"""Hugging Face `transformers` Llama-family causal LMs under sequence parallelism.

Nothing of the model's code is copied or replaced; two extension points do the work:

- an attention function registered in transformers' `AttentionInterface` as
  ``"lasp_sp"``: it receives this rank's queries and keys/values ([B, H, T_local, D],
  RoPE already applied) and runs LASP-2H over the SP group (keys and values gathered,
  causal and packed-document masks by GLOBAL position). transformers builds no mask for
  an attention implementation it does not know, so nothing local gets in the way;
- a forward pre-hook on the decoder that passes the layout's global positions as
  ``position_ids`` when the caller gives none, so RoPE rotates by global positions.

Packed documents: pass ``cu_seqlens=`` (offsets of the WHOLE sequence) to the model's
forward; transformers hands extra keywords through to the attention function.

Loss: transformers shifts ``labels`` inside the tensor it is given, which under sequence
parallelism is this rank's shard (every shard loses the label of its last token) and with
packed documents predicts across document boundaries. So a parallelized model refuses
``labels`` in those cases unless ``shift_labels`` (targets shifted before sharding, from
`lasp.shard_batch`) come with them; `lasp.causal_lm_loss(model, batch)` is the simple way.
"""

from __future__ import annotations

import inspect

from transformers import AttentionInterface

from lasp.layers.sequence import SPContext

ATTENTION = "lasp_sp"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def lasp_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                   sliding_window=None, cu_seqlens=None, **kwargs):
    """transformers attention function: LASP-2H on [B, H, T_local, D] tensors → ([B, T_local, H, D], None)."""
    from lasp.parallel.lasp2h import lasp2h_attention

    sp: SPContext | None = getattr(module, "lasp_sp", None)
    if sp is None:
        raise RuntimeError(f"attn_implementation={ATTENTION!r} needs the model to go through lasp.parallelize")
    if attention_mask is not None:
        raise ValueError("lasp_sp attention takes no attention_mask: pack documents into one row and pass "
                         "cu_seqlens instead of padding")
    if dropout:
        raise NotImplementedError(f"lasp_sp attention has no attention dropout (got {dropout})")
    if key.shape[2] != query.shape[2]:
        raise ValueError("lasp_sp attention is for training: keys must be the local tokens' (no KV cache)")
    layout = sp.local_layout(query.shape[2])
    if sliding_window is not None and sliding_window < layout.seq_len:
        raise NotImplementedError(f"sliding-window attention (window {sliding_window} < sequence "
                                  f"{layout.seq_len}) is not supported under lasp_sp")
    out = lasp2h_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                           layout=layout, group=sp.group, scale=scaling, cu_seqlens=cu_seqlens)
    return out, None


def _global_positions_hook(sp: SPContext):
    def hook(module, args, kwargs):
        if kwargs.get("position_ids") is None:
            tokens = kwargs.get("input_ids", args[0] if args else None)
            if tokens is None:
                tokens = kwargs["inputs_embeds"]
            positions = sp.local_layout(tokens.shape[1]).positions(tokens.device)
            kwargs["position_ids"] = positions.expand(tokens.shape[0], -1)
        return args, kwargs
    return hook


def _labels_hook(sp: SPContext):
    """Refuse `labels` that transformers would shift wrongly (module docstring), on every rank
    before any collective, as lasp's own models do."""
    signatures = {}

    def hook(module, args, kwargs):
        if type(module) not in signatures:       # once per class, not on every forward
            signatures[type(module)] = inspect.signature(module.forward)
        bound = signatures[type(module)].bind_partial(*args, **kwargs).arguments
        if bound.get("labels") is None or kwargs.get("shift_labels") is not None:
            return None
        if sp.world_size > 1 or kwargs.get("cu_seqlens") is not None:
            where = (f"inside each of the {sp.world_size} sequence-parallel shards (losing the label at "
                     "every shard boundary)" if sp.world_size > 1 else "across packed document boundaries")
            raise ValueError(f"{type(module).__name__} would shift labels {where}: compute the loss with "
                             "lasp.causal_lm_loss(model, lasp.shard_batch(...)), or pass shift_labels= and "
                             "num_items_in_batch= from lasp.shard_batch along with labels")
        return None
    return hook


def parallelize_hf(model, sp: SPContext):
    """Route `model`'s attention through LASP-2H and its RoPE through global positions."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"lasp.parallelize does not support {type(model).__name__} (model_type "
                         f"{model_type!r}); supported: lasp's Linear-Llama models and transformers "
                         f"model types {list(SUPPORTED_MODEL_TYPES)}")
    AttentionInterface.register(ATTENTION, lasp_attention)
    model.set_attn_implementation(ATTENTION)
    model.config.use_cache = False  # a KV cache is for generation; training keeps none
    decoder = model.base_model
    for layer in decoder.layers:
        layer.self_attn.lasp_sp = sp
    previous = getattr(decoder, "_lasp_positions_hook", None)
    if previous is not None:
        previous.remove()
    decoder._lasp_positions_hook = decoder.register_forward_pre_hook(_global_positions_hook(sp), with_kwargs=True)
    previous = getattr(model, "_lasp_labels_hook", None)
    if previous is not None:
        previous.remove()
    model._lasp_labels_hook = model.register_forward_pre_hook(_labels_hook(sp), with_kwargs=True)
    return model
