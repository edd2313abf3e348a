"""Linear-Llama: the Llama-3 architecture with linear attention, and its hybrids.

Each block is pre-norm attention (linear, GLA, MoM, Gated DeltaNet, KDA, Mamba-2 or softmax, by the
config's layer pattern) and a SwiGLU MLP, with Hugging Face Llama's parameter names. The models are
`transformers.PreTrainedModel`s (save_pretrained / from_pretrained with safetensors).

Sequence parallelism: `lasp.parallelize(model, group)` sets `model.model.lasp_sp`; each
forward then takes this rank's tokens, builds the layout of the batch from their number,
and every layer runs under it. Without it the whole sequence is local.

Mixture-of-Memories layers (``M``) also return a load-balancing loss; the model output
carries their mean as `aux_loss`, and the causal-LM loss adds
`config.router_aux_loss_coef` times it.

Long sequences on few GPUs (DeepSpeed ALST's recipe): `activation_checkpointing` keeps one
[B, T, hidden] input per block; `offload_activations` moves those, and what the final norm
and the loss save, to pinned host memory (`HostOffload`); `tile_tokens` runs the norms and
the MLP a tile of tokens at a time (`lasp.layers.mlp.token_tiles`); the loss is chunked
already. What stays on the GPU is then one block's recomputation at a time.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from lasp.batch import next_token_labels
from lasp.layers import (GatedDeltaNet, GatedLinearAttention, KimiDeltaAttention, LinearAttention, Mamba2,
                         MixtureOfMemories, RMSNorm, ShortConv, SoftmaxAttention, SwiGLU)
from lasp.layers.mlp import token_tiles
from lasp.layers.delta_rule import DeltaRuleAttention
from lasp.layers.feature_maps import ReBasedMap
from lasp.layers.linear_attention import decay_kind
from lasp.layers.mom import MemoryProjection
from lasp.loss import IGNORE_INDEX, chunk_loss, chunked_cross_entropy
from lasp.models.checkpointing import checkpoint_context_fn, selective_context
from lasp.models.config import LinearLlamaConfig


# Saved tensors smaller than this stay on the device under `offload_activations` (positions,
# cu_seqlens, scalars: not worth a copy); the blocks' inputs are B·T·hidden·2 bytes.
OFFLOAD_MIN_BYTES = 1 << 20


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """Within it, every tensor autograd saves for the backward — but parameters and tensors under
    `OFFLOAD_MIN_BYTES` — is copied to host memory (pinned, asynchronously on the current stream)
    and copied back to its device when the backward unpacks it (`save_on_cpu`, filtered: the
    lm_head weight that each loss chunk saves must not cross the bus once per chunk).

    Around a forward with non-reentrant activation checkpointing, what gets offloaded is what is
    saved outside the checkpointed code: each block's inputs (the checkpoint saves them through
    autograd), the final norm's intermediates and each loss chunk's hidden states. Inside a
    checkpointed block the checkpoint's own hooks come first and nothing is saved."""

    def __init__(self):
        pin = torch.cuda.is_available()

        def pack(tensor):
            if isinstance(tensor, nn.Parameter) or tensor.numel() * tensor.element_size() < OFFLOAD_MIN_BYTES:
                return tensor
            host = torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=pin and tensor.is_cuda)
            host.copy_(tensor, non_blocking=True)
            return tensor.device, host

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            device, host = packed
            return host.to(device, non_blocking=True)

        super().__init__(pack, unpack)


def activation_offload(config: LinearLlamaConfig):
    """`HostOffload()` when the config asks for it and autograd records, else a no-op context."""
    if config.offload_activations and config.activation_checkpointing and torch.is_grad_enabled():
        return HostOffload()
    return nullcontext()


# MixtureOfMemories takes the decays under their earlier names.
_MOM_DECAYS = {"identity": "none", "fixed": "fixed", "scalar": "data"}


def _attention(config: LinearLlamaConfig, kind: str) -> nn.Module:
    heads = dict(hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
                 head_dim=config.head_dim, num_kv_heads=config.num_key_value_heads)
    if kind == "N":
        return SoftmaxAttention(**heads, rope_theta=config.rope_theta)
    if kind in ("D", "K"):
        delta = dict(hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
                     head_dim=config.head_dim, num_v_heads=config.delta_num_v_heads,
                     conv_size=config.delta_conv_size, norm_eps=config.rms_norm_eps)
        if kind == "D":
            return GatedDeltaNet(**delta)
        return KimiDeltaAttention(**delta, decay_rank=config.kda_decay_rank)
    if kind == "S":
        mamba_heads = 2 * config.num_attention_heads if config.mamba_num_heads is None else config.mamba_num_heads
        return Mamba2(config.hidden_size, mamba_heads, config.head_dim, state_size=config.mamba_state_size,
                      n_groups=config.mamba_num_groups, conv_size=config.mamba_conv_size, norm_eps=config.rms_norm_eps)
    if kind == "G":
        return GatedLinearAttention(**heads, key_dim=config.gla_key_dim, decay_rank=config.linear_decay_rank,
                                    conv_size=config.linear_conv_size, norm_eps=config.rms_norm_eps)
    linear = dict(feature_map=config.linear_feature_map, output_norm=config.linear_output_norm,
                  output_gate=config.linear_output_gate, norm_eps=config.rms_norm_eps)
    if kind == "M":
        return MixtureOfMemories(config.hidden_size, config.num_attention_heads, config.head_dim,
                                 num_memories=config.mom_num_memories, top_k=config.mom_top_k,
                                 shared_memory=config.mom_shared_memory,
                                 decay=_MOM_DECAYS[decay_kind(config.linear_decay)], **linear)
    return LinearAttention(**heads, key_dim=config.linear_key_dim, decay=config.linear_decay,
                           fixed_decays=config.linear_fixed_decays, decay_rank=config.linear_decay_rank,
                           conv_size=config.linear_conv_size, **linear)


@dataclass
class LinearLlamaModelOutput(BaseModelOutput):
    """The last hidden states, and the mean load-balancing loss of the MoM layers (None without)."""

    aux_loss: torch.FloatTensor | None = None


@dataclass
class LinearLlamaCausalLMOutput(CausalLMOutput):
    """`loss` = `lm_loss` + `router_aux_loss_coef · aux_loss` (Hugging Face's convention); the two
    parts come on their own too, so that a training loop can weigh them itself."""

    lm_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None


class LinearLlamaBlock(nn.Module):
    def __init__(self, config: LinearLlamaConfig, kind: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = _attention(config, kind)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.tile_tokens = config.tile_tokens
        if isinstance(self.self_attn, LinearAttention):   # its norm, gate and o_proj, tiled alike
            self.self_attn.tile_tokens = config.tile_tokens

    def forward(self, x, layout=None, group=None, cu_seqlens=None, selective_checkpoint=False):
        """Returns (x, aux_loss): the layer's load-balancing loss for MoM, else None. The norms
        and the MLP run in tiles of `config.tile_tokens` tokens (when set). With
        `selective_checkpoint` (and autograd recording) the block checkpoints itself under the
        selective policy (`lasp.models.checkpointing`): inside its forward, so that a compiled
        block holds the checkpoint in its graph and AOT autograd applies the policy."""
        if selective_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, layout, group, cu_seqlens, use_reentrant=False,
                              context_fn=selective_context)
        return self._forward(x, layout, group, cu_seqlens)

    def _forward(self, x, layout, group, cu_seqlens):
        hidden = token_tiles(self.input_layernorm, x, self.tile_tokens)
        out = self.self_attn(hidden, layout=layout, group=group, cu_seqlens=cu_seqlens)
        out, aux = out if isinstance(self.self_attn, MixtureOfMemories) else (out, None)
        x = x + out
        return x + token_tiles(self.feed_forward, x, self.tile_tokens), aux

    def feed_forward(self, x):
        """The MLP sublayer without its residual: `mlp(post_attention_layernorm(x))`."""
        return self.mlp(self.post_attention_layernorm(x))


class LinearLlamaPreTrainedModel(PreTrainedModel):
    config_class = LinearLlamaConfig
    base_model_prefix = "model"
    _no_split_modules = ["LinearLlamaBlock"]

    def _init_weights(self, module):
        """Hugging Face's defaults (MoM's per-memory projections like nn.Linear), nn.Conv1d's
        for the short convolution, the identity affine of ReBased's feature map, and the
        delta-rule and Mamba-2 layers' other parameters as their reference models draw them."""
        if isinstance(module, ShortConv):
            init.uniform_(module.weight, -module.init_bound, module.init_bound)
        elif isinstance(module, DeltaRuleAttention):  # A_log, dt_bias; its Linears are visited on their own
            for name, value in module.initial_decay_parameters().items():
                init.copy_(getattr(module, name), value)
        elif isinstance(module, Mamba2):  # conv, A_log, dt_bias, D, norm; its Linears are visited on their own
            for name, value in module.initial_parameters().items():
                init.copy_(getattr(module, name), value)
        elif isinstance(module, ReBasedMap):
            init.ones_(module.gamma)
            init.zeros_(module.beta)
        elif isinstance(module, MemoryProjection):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        else:
            super()._init_weights(module)


class LinearLlamaModel(LinearLlamaPreTrainedModel):
    """Embeddings, blocks and the final norm; returns the last hidden states."""

    def __init__(self, config: LinearLlamaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LinearLlamaBlock(config, kind) for kind in config.layer_kinds)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lasp_sp = None  # SPContext, set by lasp.parallelize
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks, in order: the units that FSDP shards and checkpointing wraps."""
        return list(self.layers)

    def forward(self, input_ids=None, inputs_embeds=None, cu_seqlens=None) -> LinearLlamaModelOutput:
        """input_ids [B, T_local] (or inputs_embeds [B, T_local, hidden]); cu_seqlens: packed
        documents of the whole sequence (B = 1). Under sequence parallelism `aux_loss` is
        this rank's share of the whole sequence's (the shares sum to it)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        with activation_offload(self.config):
            return self._forward(input_ids, inputs_embeds, cu_seqlens)

    def _forward(self, input_ids, inputs_embeds, cu_seqlens) -> LinearLlamaModelOutput:
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        sp = self.lasp_sp
        layout = None if sp is None else sp.local_layout(x.shape[1])
        group = None if sp is None else sp.group
        aux_losses = []
        mode = self.config.activation_checkpointing if torch.is_grad_enabled() else False
        blocks = self.config.activation_checkpointing_blocks
        for i, layer in enumerate(self.layers):
            if not mode or (blocks is not None and i >= blocks):  # keeps its activations
                x, aux = layer(x, layout, group, cu_seqlens)
            elif mode == "selective":  # inside the block (compiled with it under --compile)
                x, aux = layer(x, layout, group, cu_seqlens, selective_checkpoint=True)
            else:  # around the block: recompute all of it
                x, aux = checkpoint(layer, x, layout, group, cu_seqlens, use_reentrant=False,
                                    context_fn=checkpoint_context_fn(mode))
            if aux is not None:
                aux_losses.append(aux)
        aux_loss = torch.stack(aux_losses).mean() if aux_losses else None
        hidden = token_tiles(self.norm, x, self.config.tile_tokens)
        return LinearLlamaModelOutput(last_hidden_state=hidden, aux_loss=aux_loss)


class LinearLlamaForCausalLM(LinearLlamaPreTrainedModel):
    """The language model. With labels its forward returns the loss and no logits: the
    loss is computed chunk by chunk (`config.loss_chunk_size` tokens) and the logits of
    the whole sequence never exist."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LinearLlamaConfig):
        super().__init__(config)
        self.model = LinearLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.chunk_loss = chunk_loss  # the loss's per-chunk scoring (compiled by lasp.launch.compile)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def blocks(self) -> list[nn.Module]:
        """The decoder's blocks (`LinearLlamaModel.blocks`)."""
        return self.model.blocks()

    def forward(self, input_ids=None, inputs_embeds=None, cu_seqlens=None, labels=None, shift_labels=None,
                num_items_in_batch=None) -> LinearLlamaCausalLMOutput:
        """Loss from `shift_labels` (next-token targets, as `lasp.shard_batch` makes them) or
        `labels` (Hugging Face convention: shifted here, so single-device only).

        The loss is the sum of token losses ÷ `num_items_in_batch` (the number of valid
        targets of the whole batch: under sequence parallelism `ShardedBatch.num_tokens`),
        or the mean over the local valid targets if it is not given (`lm_loss`); plus
        `router_aux_loss_coef · aux_loss` with MoM layers.
        """
        sp = self.model.lasp_sp
        if labels is not None and shift_labels is None and sp is not None and sp.world_size > 1:
            raise ValueError("under sequence parallelism pass shift_labels (shifted before sharding, "
                             "see lasp.shard_batch), not labels")
        out = self.model(input_ids, inputs_embeds, cu_seqlens)
        hidden, aux_loss = out.last_hidden_state, out.aux_loss
        if labels is None and shift_labels is None:
            return LinearLlamaCausalLMOutput(logits=self.lm_head(hidden), aux_loss=aux_loss)
        if shift_labels is None:
            shift_labels = next_token_labels(labels, cu_seqlens)
        with activation_offload(self.config):  # each chunk's hidden states, B·chunk·hidden
            total = chunked_cross_entropy(hidden, self.lm_head.weight, shift_labels,
                                          chunk_size=self.config.loss_chunk_size, scoring=self.chunk_loss)
        if num_items_in_batch is None:
            num_items_in_batch = (shift_labels != IGNORE_INDEX).sum()
        lm_loss = total / num_items_in_batch
        loss = lm_loss if aux_loss is None else lm_loss + self.config.router_aux_loss_coef * aux_loss
        return LinearLlamaCausalLMOutput(loss=loss, lm_loss=lm_loss, aux_loss=aux_loss)
