"""Write `examples/hf/<model_type>/config.json`: a small config of each transformers hybrid
that `lasp.parallelize` wraps, for `lasp-train --model hf:examples/hf/<model_type>`.

    python examples/hf/make_configs.py          # rewrites the directories next to this file

Shapes are small but shaped like the released models (hidden 256, 4 layers with the family's
mix of linear and softmax layers, head dims 64, MoE where the family has one); the
vocabulary holds lasp-train's byte tokenizer (257 tokens). Each is built by
`AutoConfig.for_model` and written by `save_pretrained`: no weights, so lasp-train
initialises the model at random from the config.
"""

from __future__ import annotations

import sys
from pathlib import Path

BASE = dict(vocab_size=512, hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=65536)
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256)
LINEAR_GDN = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64,
                  linear_value_head_dim=64, linear_conv_kernel_dim=4)
HYBRID = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]

CONFIGS = {
    # MiniMax-Text-01: lightning (linear) attention, one softmax layer in four, top-2 MoE
    "minimax": dict(BASE, num_hidden_layers=4, head_dim=64, layer_types=HYBRID, num_local_experts=8,
                    num_experts_per_tok=2, block_size=256),
    # LFM2: short gated convolutions and softmax layers
    "lfm2": dict(BASE, num_hidden_layers=4, layer_types=["conv", "conv", "full_attention", "conv"],
                 block_auto_adjust_ff_dim=False, conv_L_cache=3),
    # Mamba-2 hybrids
    "bamba": dict(BASE, num_hidden_layers=4, attn_layer_indices=[3], mamba_n_heads=8, mamba_d_head=64,
                  mamba_n_groups=1, mamba_d_state=64, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=256),
    "nemotron_h": dict(BASE, head_dim=64, layer_types=["mamba", "moe", "attention", "mamba"], mamba_num_heads=8,
                       mamba_head_dim=64, n_groups=1, ssm_state_size=64, n_routed_experts=8, num_experts_per_tok=2,
                       moe_intermediate_size=256, moe_shared_expert_intermediate_size=256, chunk_size=256),
    "granitemoehybrid": dict(BASE, num_hidden_layers=4, layer_types=["mamba", "mamba", "mamba", "attention"],
                             mamba_n_heads=8, mamba_d_head=64, mamba_n_groups=1, mamba_d_state=64, mamba_expand=2,
                             mamba_chunk_size=256, num_local_experts=8, num_experts_per_tok=2,
                             shared_intermediate_size=256),
    "zamba2": dict(BASE, num_hidden_layers=4, layers_block_type=["mamba", "mamba", "hybrid", "mamba"],
                   n_mamba_heads=8, mamba_headdim=64, mamba_ngroups=1, mamba_d_state=64, mamba_expand=2,
                   chunk_size=256, adapter_rank=32),
    "falcon_h1": dict(BASE, num_hidden_layers=4, head_dim=64, mamba_n_heads=8, mamba_d_head=64, mamba_d_ssm=512,
                      mamba_n_groups=1, mamba_d_state=64, mamba_chunk_size=256),
    # Gated DeltaNet hybrids
    "qwen3_next": dict(BASE, num_hidden_layers=4, head_dim=64, layer_types=HYBRID, **LINEAR_GDN, **MOE,
                       shared_expert_intermediate_size=256),
    "qwen3_5_text": dict(BASE, num_hidden_layers=4, head_dim=64, layer_types=HYBRID, **LINEAR_GDN),
    "qwen3_5_moe_text": dict(BASE, num_hidden_layers=4, head_dim=64, layer_types=HYBRID, **LINEAR_GDN, **MOE,
                             shared_expert_intermediate_size=256),
    "olmo_hybrid": dict(BASE, num_hidden_layers=4, head_dim=64, layer_types=HYBRID, **LINEAR_GDN,
                        pad_token_id=0, eos_token_id=1),
    # Kimi Linear: KDA and MLA softmax layers, MoE after a dense first layer
    "kimi_linear": dict(BASE, num_hidden_layers=4, layer_types=HYBRID, num_key_value_heads=4,   # MLA: no GQA
                        mlp_layer_types=["dense", "sparse", "sparse", "sparse"], kv_lora_rank=128,
                        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                        linear_attn_config=dict(head_dim=64, num_heads=4, short_conv_kernel_size=4),
                        num_experts=8, num_experts_per_token=2, moe_intermediate_size=256, num_shared_experts=1,
                        pad_token_id=None, bos_token_id=None, eos_token_id=None),
}


def main(root: Path) -> None:
    from transformers import AutoConfig

    for model_type, fields in CONFIGS.items():
        config = AutoConfig.for_model(model_type, **fields)
        config.save_pretrained(root / model_type)
        print(f"{root / model_type / 'config.json'}: {model_type}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
