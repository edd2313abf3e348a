"""The Mamba-2 hybrids (`bamba`, `nemotron_h`, `granitemoehybrid`, `zamba2`, `falcon_h1`) under
lasp.parallelize: Mamba-2 mixers on lasp's per-token-decay kernels and conv halo, softmax
layers on LASP-2H, MoE blocks untouched (`lasp/integrations/hf/mamba2.py`)."""

from __future__ import annotations

import pytest
import torch

import lasp
from lasp.integrations.hf.mamba2 import ADAPTERS
from tests.distributed import run_distributed
from tests.integrations.hf_checks import VOCAB, check_one_rank, check_sequence_parallel, tiny_model

SIZES = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)


def _randomized(model):
    """Every Mamba-2 mixer's conv, decay, skip and norm parameters drawn fresh: transformers
    initialises them to constants (zero conv bias, D = 1, dt_bias = 1, unit norm weight)."""
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ not in ADAPTERS:
                continue
            module.conv1d.weight.normal_(0, 0.3)
            module.conv1d.bias.normal_(0, 0.3)
            module.A_log.normal_(0, 0.5)
            module.dt_bias.normal_(0, 0.5)
            module.D.normal_(0, 1)
            if isinstance(getattr(module.norm, "weight", None), torch.Tensor):
                module.norm.weight.normal_(1, 0.2)
    return model


def make_bamba():
    """Mamba, softmax, Mamba; 2 groups of B/C over 4 heads; a time-step limit that clamps Δ
    of some heads from above and of others from below."""
    return _randomized(tiny_model("bamba", num_hidden_layers=3, attn_layer_indices=[1], mamba_n_heads=4,
                                  mamba_n_groups=2, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
                                  mamba_chunk_size=8, time_step_limit=(0.55, 0.85), **SIZES))


def make_nemotron_h():
    """MoE (top-2 of 4 and a shared expert), Mamba, softmax, Mamba. The MoE comes first: its
    router computes in fp32, which would blur the gradients of every layer below it. No cache
    for the native forward: transformers asks the first layer's cache for the sequence length."""
    return _randomized(tiny_model("nemotron_h", layer_types=["moe", "mamba", "attention", "mamba"], use_cache=False,
                                  mamba_num_heads=4, mamba_head_dim=16, n_groups=2, ssm_state_size=16, head_dim=8,
                                  n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                  moe_shared_expert_intermediate_size=16, chunk_size=8, **SIZES))


def make_granitemoehybrid():
    """Mamba, softmax, Mamba, each with top-2 of 4 experts and a shared MLP."""
    return _randomized(tiny_model("granitemoehybrid", num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"],
                                  mamba_n_heads=4, mamba_n_groups=2, mamba_d_state=16, mamba_expand=2,
                                  mamba_chunk_size=8, num_local_experts=4, num_experts_per_tok=2,
                                  shared_intermediate_size=16, **SIZES))


def make_zamba2():
    """Mamba, hybrid (the shared softmax block on [hidden, embeddings], then Mamba), Mamba."""
    return _randomized(tiny_model("zamba2", num_hidden_layers=3, layers_block_type=["mamba", "hybrid", "mamba"],
                                  n_mamba_heads=4, mamba_ngroups=2, mamba_d_state=16, mamba_expand=2, chunk_size=8,
                                  adapter_rank=8, **SIZES))


def make_falcon_h1(**options):
    """Two layers of Mamba and softmax side by side, µP multipliers, the gated norm in 2 groups
    applied before the gate, the SSM 48 wide (mamba_d_ssm, not expand · hidden)."""
    options = dict(mamba_rms_norm=True, mamba_norm_before_gate=True) | options
    return _randomized(tiny_model("falcon_h1", num_hidden_layers=2, mamba_n_heads=4, mamba_d_ssm=48,
                                  mamba_n_groups=2, mamba_d_state=16, mamba_chunk_size=8,
                                  ssm_multipliers=[0.9, 1.1, 0.8, 1.2, 0.7], ssm_in_multiplier=1.3,
                                  ssm_out_multiplier=0.8, **options, **SIZES))


def make_falcon_h1_without_norm():
    """Falcon-H1's default: no gated norm, y ⊙ silu(z)."""
    return make_falcon_h1(mamba_rms_norm=False)


MODELS = [make_bamba, make_nemotron_h, make_granitemoehybrid, make_zamba2, make_falcon_h1]
# Nemotron-H's RMSNorm casts its weight to fp32 and its router computes in fp32: transformers
# sums their gradients over the tokens in fp32, so they match W = 1 to fp32 rounding only.
FP32_GRADS = {make_nemotron_h: r"(layers\.\d+\.norm|norm_f)\.weight$|mixer\.gate\.weight$"}


@pytest.mark.parametrize("make_model", [*MODELS, make_falcon_h1_without_norm], ids=lambda f: f.__name__[5:])
def test_one_rank_matches_transformers_and_keeps_documents_apart(make_model):
    check_one_rank(make_model)


def _sequence_parallel_body(rank, W):
    for make_model in MODELS:
        check_sequence_parallel(rank, W, make_model, fp32_grads=FP32_GRADS.get(make_model))


@pytest.mark.parametrize("W", [2, 3])
def test_sequence_parallel_matches_one_rank(W):
    run_distributed(_sequence_parallel_body, W)


def test_cache_is_refused():
    torch.manual_seed(0)
    model = lasp.parallelize(make_bamba())
    with pytest.raises(ValueError, match="BambaMixer.*no cache"):
        model(torch.randint(0, VOCAB, (1, 8)), use_cache=True)
