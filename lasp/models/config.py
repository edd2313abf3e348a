"""`LinearLlamaConfig`: Llama-3 with linear attention, hybrids by a layer pattern, and presets.

The layer pattern is a string of layer kinds repeated over the depth: ``L`` linear
attention, ``G`` gated linear attention (GLA), ``N`` normal (softmax) attention, ``M``
Mixture-of-Memories, ``D`` Gated DeltaNet, ``K`` Kimi Delta Attention (KDA), ``S`` Mamba-2
(selective state space); ``"LLLN"`` is one softmax layer in four (the LASP-2 paper's hybrids),
``"SSSN"`` a Mamba-2 hybrid in the manner of Bamba or Nemotron-H.

A preset gives the sizes (`linear-llama3-1b`, `tiny`); a variant gives the linear layers
of one of the LASP-2 paper's linear-attention models (`VARIANTS`):

    linear     basic linear attention: elu+1 feature map, no decay (Katharopoulos et al. 2020)
    lightning  Lightning Attention: fixed decays exp(−m_h), ALiBi's slopes m_h (TransNormerLLM)
    retention  Retention: RetNet's fixed decays γ_h = 1 − 2^(−5−h)
    gla        GLA: every linear layer is a ``G`` layer (hybrids: write G in the pattern, "GGGN")
    based      Based: 2nd-order Taylor feature map on 16-wide query/key heads, no decay
    rebased    ReBased: learnable affine after LayerNorm, then the square, 16-wide heads

and two delta-rule hybrids, three delta-rule layers per softmax layer:

    qwen3-next   Qwen3-Next's layout: Gated DeltaNet layers, pattern "DDDN" (for its 2× value
                 heads, also set delta_num_v_heads = 2 · num_attention_heads)
    kimi-linear  Kimi Linear's layout: KDA layers, pattern "KKKN"
"""

from __future__ import annotations

from transformers import PretrainedConfig

from lasp.layers.feature_maps import FEATURE_MAPS, POINTWISE_MAPS, check_feature_map
from lasp.layers.linear_attention import FIXED_DECAYS, decay_kind

LAYER_KINDS = {"L": "linear attention", "G": "gated linear attention (GLA)", "N": "normal (softmax) attention",
               "M": "Mixture-of-Memories", "D": "Gated DeltaNet", "K": "Kimi Delta Attention (KDA)",
               "S": "Mamba-2 (selective state space)"}


def parse_layer_pattern(pattern: str, num_layers: int) -> list[str]:
    """The kind of each of `num_layers` layers: `pattern` repeated (and cut) over the depth."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"layer_pattern must be a non-empty string of {sorted(LAYER_KINDS)}, got {pattern!r}")
    for letter in pattern:
        if letter not in LAYER_KINDS:
            raise ValueError(f"layer_pattern {pattern!r}: unknown layer kind {letter!r}; use "
                             + ", ".join(f"'{k}' ({v})" for k, v in LAYER_KINDS.items()))
    return [pattern[i % len(pattern)] for i in range(num_layers)]


def _check_linear_options(kinds, head_dim, feature_map, decay, fixed_decays, key_dim) -> None:
    """The linear layers' options, checked before any model (or process) is built."""
    decay = decay_kind(decay, "linear_decay")
    if fixed_decays not in FIXED_DECAYS:
        raise ValueError(f"linear_fixed_decays must be one of {list(FIXED_DECAYS)}, got {fixed_decays!r}")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"linear_feature_map must be one of {list(FEATURE_MAPS)}, got {feature_map!r}")
    if "L" in kinds:
        check_feature_map(feature_map, head_dim if key_dim is None else key_dim)
    if "M" in kinds and (feature_map not in POINTWISE_MAPS or decay == "diagonal" or fixed_decays != "retnet"
                         or key_dim is not None):
        raise ValueError(f"Mixture-of-Memories layers ('M') take linear_feature_map in {list(POINTWISE_MAPS)}, "
                         "linear_decay identity | fixed | scalar with linear_fixed_decays='retnet', and no "
                         f"linear_key_dim; got {feature_map!r}, {decay!r}, {fixed_decays!r}, {key_dim!r}")


def _check_delta_options(kinds, num_heads, num_v_heads, conv_size, decay_rank) -> None:
    """The delta-rule layers' options, checked before any model (or process) is built."""
    if not ("D" in kinds or "K" in kinds):
        return
    if num_v_heads is not None and (not isinstance(num_v_heads, int) or num_v_heads < 1 or num_v_heads % num_heads):
        raise ValueError(f"delta_num_v_heads must be a positive multiple of num_attention_heads={num_heads} "
                         f"(or None), got {num_v_heads!r}")
    if not isinstance(conv_size, int) or conv_size < 0:
        raise ValueError(f"delta_conv_size must be an int >= 0 (0: no short convolution), got {conv_size!r}")
    if decay_rank is not None and (not isinstance(decay_rank, int) or decay_rank < 1):
        raise ValueError(f"kda_decay_rank must be a positive int (or None), got {decay_rank!r}")


def _check_mamba_options(kinds, num_heads, mamba_num_heads, state_size, num_groups, conv_size) -> None:
    """The Mamba-2 layers' options, checked before any model (or process) is built."""
    if "S" not in kinds:
        return
    heads = 2 * num_heads if mamba_num_heads is None else mamba_num_heads
    for name, value in (("mamba_num_heads", heads), ("mamba_state_size", state_size),
                        ("mamba_num_groups", num_groups), ("mamba_conv_size", conv_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if heads % num_groups:
        raise ValueError(f"mamba_num_groups={num_groups} must divide the Mamba-2 heads ({heads}): each group of "
                         "B and C serves heads // groups consecutive heads")


def _check_memory_options(activation_checkpointing, activation_checkpointing_blocks, num_blocks, offload_activations,
                          tile_tokens) -> None:
    """The training-memory options, checked before any model (or process) is built."""
    blocks = activation_checkpointing_blocks
    if blocks is not None:
        if not isinstance(blocks, int) or isinstance(blocks, bool) or not 0 <= blocks <= num_blocks:
            raise ValueError(f"activation_checkpointing_blocks must be None (every block) or an int in [0, "
                             f"num_hidden_layers={num_blocks}], got {blocks!r}")
        if offload_activations and blocks < num_blocks:
            raise ValueError(f"offload_activations=True needs every block checkpointed (activation_checkpointing_"
                             f"blocks None), got {blocks} of {num_blocks}: the others would send every activation "
                             "to the host")
    if not isinstance(offload_activations, bool):
        raise ValueError(f"offload_activations must be a bool, got {offload_activations!r}")
    if offload_activations and not activation_checkpointing:
        raise ValueError("offload_activations=True needs activation_checkpointing=True: it offloads the checkpointed "
                         "blocks' inputs (without checkpointing every activation would cross to the host)")
    if not isinstance(tile_tokens, int) or isinstance(tile_tokens, bool) or tile_tokens < 0:
        raise ValueError(f"tile_tokens must be an int >= 0 (0: no tiling), got {tile_tokens!r}")


class LinearLlamaConfig(PretrainedConfig):
    """Defaults are `linear-llama3-1b`: Llama-3.2-1B's sizes with every layer linear.

    Linear layers (``L``). ``M`` layers share the feature map (pointwise only), the decay (not
    diagonal, RetNet's constants) and the output options; ``G`` layers share
    linear_decay_rank and linear_conv_size.
      linear_feature_map: identity | elu+1 | relu | silu | based | rebased (feature_maps.py).
      linear_key_dim: query/key head width before the feature map; None: head_dim. Based and
          ReBased widen it (1 + d + d(d+1)/2, d(d+1)/2), which must stay within 16..256.
      linear_decay: identity | fixed | scalar | diagonal (lasp.layers.linear_attention; the
          earlier none / data mean identity / scalar).
      linear_fixed_decays: the constants of the fixed decay: retnet | lightning.
      linear_decay_rank: rank of the diagonal decay's gate projection (GLA's 16).
      linear_conv_size: short convolution width, 0 = none.
      linear_output_norm: per-head RMSNorm of the attention output.
      linear_output_gate: silu | sigmoid | None.
    GLA layers (``G``):
      gla_key_dim: query/key head width; None: head_dim // 2 (the paper's expand_k = 0.5).
    Delta-rule layers (``D`` Gated DeltaNet, ``K`` KDA; lasp.layers.delta_rule): query/key
    heads are num_attention_heads × head_dim; value heads are head_dim wide.
      delta_num_v_heads: value heads, a multiple of num_attention_heads (each query/key head
          serves the ratio of them); None: num_attention_heads. Qwen3-Next uses 2×.
      delta_conv_size: short convolution width over q, k, v (4 in both models), 0 = none.
      kda_decay_rank: rank of KDA's decay and output-gate projections; None: head_dim.
    Mamba-2 layers (``S``; lasp.layers.mamba2): heads head_dim wide.
      mamba_num_heads: None: 2 · num_attention_heads (Mamba-2's expand = 2 when
          num_attention_heads · head_dim = hidden_size).
      mamba_state_size: the state per head (Mamba-2's d_state; the keys' width), 128.
      mamba_num_groups: groups of B and C (and of the gated norm), dividing the heads.
      mamba_conv_size: width of the short convolution over x, B, C (4).
    MoM layers (``M``): `mom_num_memories`, `mom_top_k`, `mom_shared_memory`, and
      router_aux_loss_coef: weight of the MoM layers' mean load-balancing loss in the loss.
    Training:
      activation_checkpointing: recompute each layer in the backward.
      activation_checkpointing_blocks: with activation_checkpointing, checkpoint only the
          first N blocks; the later ones keep their activations: less recompute for more
          memory. None: every block.
      offload_activations: with activation_checkpointing, what the forward saves outside the
          checkpointed blocks (each block's input [B, T, hidden], the final norm's and the loss's
          inputs) goes to pinned host memory until the backward needs it
          (`lasp.models.linear_llama.HostOffload`): GPU activation memory no longer grows with
          the depth.
      tile_tokens: 0, or run each block's norms and its SwiGLU MLP (and the final norm) over
          the sequence in tiles of this many tokens, each under checkpointing
          (`lasp.layers.mlp.token_tiles`): their [T, intermediate] and fp32 intermediates
          never exist whole. The same result.
      loss_chunk_size: tokens per chunk of the output projection + cross-entropy.
    """

    model_type = "linear_llama"

    def __init__(self, vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=64, layer_pattern="L",
                 rope_theta=500000.0, rms_norm_eps=1e-5, initializer_range=0.02, tie_word_embeddings=True,
                 linear_feature_map="identity", linear_key_dim=None, linear_decay="fixed",
                 linear_fixed_decays="retnet", linear_decay_rank=16, linear_conv_size=0, linear_output_norm=True,
                 linear_output_gate="silu", gla_key_dim=None, delta_num_v_heads=None, delta_conv_size=4,
                 kda_decay_rank=None, mamba_num_heads=None, mamba_state_size=128, mamba_num_groups=1,
                 mamba_conv_size=4, mom_num_memories=4, mom_top_k=2,
                 mom_shared_memory=True, router_aux_loss_coef=0.01, activation_checkpointing=False,
                 activation_checkpointing_blocks=None, offload_activations=False, tile_tokens=0, loss_chunk_size=4096,
                 **kwargs):
        kinds = parse_layer_pattern(layer_pattern, num_hidden_layers)
        _check_linear_options(kinds, head_dim, linear_feature_map, linear_decay, linear_fixed_decays,
                              linear_key_dim)
        _check_delta_options(kinds, num_attention_heads, delta_num_v_heads, delta_conv_size, kda_decay_rank)
        _check_mamba_options(kinds, num_attention_heads, mamba_num_heads, mamba_state_size, mamba_num_groups,
                             mamba_conv_size)
        if not 1 <= mom_top_k <= mom_num_memories:
            raise ValueError(f"mom_top_k={mom_top_k} must be in [1, mom_num_memories={mom_num_memories}]")
        _check_memory_options(activation_checkpointing, activation_checkpointing_blocks, num_hidden_layers,
                              offload_activations, tile_tokens)
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
        self.linear_key_dim = linear_key_dim
        self.linear_decay = linear_decay
        self.linear_fixed_decays = linear_fixed_decays
        self.linear_decay_rank = linear_decay_rank
        self.linear_conv_size = linear_conv_size
        self.linear_output_norm = linear_output_norm
        self.linear_output_gate = linear_output_gate
        self.gla_key_dim = gla_key_dim
        self.delta_num_v_heads = delta_num_v_heads
        self.delta_conv_size = delta_conv_size
        self.kda_decay_rank = kda_decay_rank
        self.mamba_num_heads = mamba_num_heads
        self.mamba_state_size = mamba_state_size
        self.mamba_num_groups = mamba_num_groups
        self.mamba_conv_size = mamba_conv_size
        self.mom_num_memories = mom_num_memories
        self.mom_top_k = mom_top_k
        self.mom_shared_memory = mom_shared_memory
        self.router_aux_loss_coef = router_aux_loss_coef
        self.activation_checkpointing = activation_checkpointing
        self.activation_checkpointing_blocks = activation_checkpointing_blocks
        self.offload_activations = offload_activations
        self.tile_tokens = tile_tokens
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


# The LASP-2 paper's linear-attention models, as overrides of the config (module docstring).
VARIANTS = {
    "linear": dict(linear_feature_map="elu+1", linear_decay="identity"),
    "lightning": dict(linear_decay="fixed", linear_fixed_decays="lightning"),
    "retention": dict(linear_decay="fixed", linear_fixed_decays="retnet"),
    "gla": dict(layer_pattern="G"),
    "based": dict(linear_feature_map="based", linear_key_dim=16, linear_decay="identity"),
    "rebased": dict(linear_feature_map="rebased", linear_key_dim=16, linear_decay="identity"),
    "qwen3-next": dict(layer_pattern="DDDN"),
    "kimi-linear": dict(layer_pattern="KKKN"),
}


def linear_llama_config(name: str, variant: str | None = None, **overrides) -> LinearLlamaConfig:
    """A preset (`linear-llama3-1b`, `tiny`), optionally with the linear layers of a
    `variant` (`VARIANTS`), then overrides, e.g. ``layer_pattern="LLLN"``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    fields = {**PRESETS[name], **VARIANTS.get(variant, {}), **overrides}
    if variant == "gla" and "G" not in fields["layer_pattern"]:
        raise ValueError(f"variant 'gla' builds G layers, but layer_pattern {fields['layer_pattern']!r} has "
                         "none; write G for its linear layers (e.g. 'GGGN')")
    return LinearLlamaConfig(**fields)
