"""`LinearLlamaConfig`: Llama-3 with linear attention, hybrids by a layer pattern, and presets.

The layer pattern is a string of layer kinds repeated over the depth: ``L`` linear
attention, ``N`` normal (softmax) attention, ``M`` Mixture-of-Memories; ``"LLLN"`` is one
softmax layer in four (the LASP-2 paper's hybrids).
"""

from __future__ import annotations

from transformers import PretrainedConfig

LAYER_KINDS = {"L": "linear attention", "N": "normal (softmax) attention", "M": "Mixture-of-Memories"}


def parse_layer_pattern(pattern: str, num_layers: int) -> list[str]:
    """The kind of each of `num_layers` layers: `pattern` repeated (and cut) over the depth."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"layer_pattern must be a non-empty string of {sorted(LAYER_KINDS)}, got {pattern!r}")
    for letter in pattern:
        if letter not in LAYER_KINDS:
            raise ValueError(f"layer_pattern {pattern!r}: unknown layer kind {letter!r}; use "
                             + ", ".join(f"'{k}' ({v})" for k, v in LAYER_KINDS.items()))
    return [pattern[i % len(pattern)] for i in range(num_layers)]


class LinearLlamaConfig(PretrainedConfig):
    """Defaults are `linear-llama3-1b`: Llama-3.2-1B's sizes with every layer linear.

    Linear layers: `linear_feature_map` (identity | elu+1 | relu | silu), `linear_decay`
    (none | fixed | data), `linear_conv_size` (short convolution width, 0 = none),
    `linear_output_norm`, `linear_output_gate` (silu | sigmoid | None); MoM layers share
    them and add `mom_num_memories`, `mom_top_k`, `mom_shared_memory`, and
    `router_aux_loss_coef` (weight of the mean load-balancing loss of the MoM layers in
    the training loss). Training: `activation_checkpointing` (recompute each layer in the
    backward) and `loss_chunk_size` (tokens per chunk of the output projection + cross-entropy).
    """

    model_type = "linear_llama"

    def __init__(self, vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=64, layer_pattern="L",
                 rope_theta=500000.0, rms_norm_eps=1e-5, initializer_range=0.02, tie_word_embeddings=True,
                 linear_feature_map="identity", linear_decay="fixed", linear_conv_size=0,
                 linear_output_norm=True, linear_output_gate="silu", mom_num_memories=4, mom_top_k=2,
                 mom_shared_memory=True, router_aux_loss_coef=0.01, activation_checkpointing=False,
                 loss_chunk_size=4096, **kwargs):
        parse_layer_pattern(layer_pattern, num_hidden_layers)
        if not 1 <= mom_top_k <= mom_num_memories:
            raise ValueError(f"mom_top_k={mom_top_k} must be in [1, mom_num_memories={mom_num_memories}]")
        if num_attention_heads % num_key_value_heads:
            raise ValueError(f"num_attention_heads={num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={num_key_value_heads}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.layer_pattern = layer_pattern
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.tie_word_embeddings = tie_word_embeddings
        self.linear_feature_map = linear_feature_map
        self.linear_decay = linear_decay
        self.linear_conv_size = linear_conv_size
        self.linear_output_norm = linear_output_norm
        self.linear_output_gate = linear_output_gate
        self.mom_num_memories = mom_num_memories
        self.mom_top_k = mom_top_k
        self.mom_shared_memory = mom_shared_memory
        self.router_aux_loss_coef = router_aux_loss_coef
        self.activation_checkpointing = activation_checkpointing
        self.loss_chunk_size = loss_chunk_size
        super().__init__(**kwargs)

    @property
    def layer_kinds(self) -> list[str]:
        return parse_layer_pattern(self.layer_pattern, self.num_hidden_layers)


PRESETS = {
    "linear-llama3-1b": {},
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}


def linear_llama_config(name: str, **overrides) -> LinearLlamaConfig:
    """A preset (`linear-llama3-1b`, `tiny`) with overrides, e.g. ``layer_pattern="LLLN"``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return LinearLlamaConfig(**{**PRESETS[name], **overrides})
