"""Kimi Linear (`kimi_linear`) under lasp.parallelize: KDA layers on lasp's delta-rule kernels
(`lasp/integrations/hf/kda.py`), MLA softmax layers (query/key heads 12 wide, value heads 6)
on LASP-2H, sparse MoE untouched. W = 1 equals the native model, packed documents stay apart
(the native model mixes them), W = 2 and 3 equal W = 1 in loss and every gradient."""

from __future__ import annotations

import pytest
import torch

import lasp
from tests.distributed import run_distributed
from tests.integrations.hf_checks import PACKED_TOL, VOCAB, check_one_rank, check_sequence_parallel, tiny_model
from tests.utils import random_cu_seqlens, rel_err

pytest.importorskip("transformers")


def make_kimi_linear():
    """KDA, MLA, KDA layers (2 heads of 8, conv width 4), a dense then two top-2-of-4 MoE MLPs.
    Norm weights and A_log/dt_bias drawn away from their constant inits, so each is checked."""
    model = tiny_model(
        "kimi_linear", hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        mlp_layer_types=["dense", "sparse", "sparse"], num_attention_heads=2, num_key_value_heads=2,
        kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
        linear_attn_config=dict(head_dim=8, num_heads=2, short_conv_kernel_size=4),
        num_experts=4, num_experts_per_token=2, num_shared_experts=1,
        pad_token_id=None, bos_token_id=None, eos_token_id=None)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def test_one_rank_matches_native_and_keeps_documents_apart():
    check_one_rank(make_kimi_linear)


@pytest.mark.parametrize("W", [2, 3])
def test_sequence_parallel_matches_one_rank(W):
    run_distributed(check_sequence_parallel, W, make_kimi_linear)


def test_native_mixes_documents_wrapped_does_not():
    """The reason to wrap on one GPU: transformers' KDA carries its state (and its conv, and eager
    MLA its attention) across a packed document boundary (given cu_seqlens, transformers 5.25
    ignores them in KDA and MLA and refuses them in the CPU conv); lasp keeps documents apart."""
    torch.manual_seed(0)
    model = make_kimi_linear()
    ids, cu = torch.randint(0, VOCAB, (1, 16)), random_cu_seqlens([6, 10])
    second_alone = model(ids[:, 6:]).logits
    assert rel_err(model(ids).logits[:, 6:], second_alone) > 1e-3
    lasp.parallelize(model)
    assert rel_err(model(ids, cu_seqlens=cu).logits[:, 6:], model(ids[:, 6:]).logits) < PACKED_TOL


def test_cache_is_refused():
    torch.manual_seed(0)
    model = lasp.parallelize(make_kimi_linear())
    with pytest.raises(ValueError, match="KimiLinearDeltaAttention.*no cache"):
        model(torch.randint(0, VOCAB, (1, 8)), use_cache=True)


def test_router_matches_transformers_in_fp32():
    """lasp's router is transformers' in fp32 (bit for bit), with group-limited routing:
    the best of 2 groups of 4 experts, top-2 inside it, a nonzero score correction."""
    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearTopkRouter

    from lasp.integrations.hf.kda import router_forward

    torch.manual_seed(0)
    router = make_kimi_linear().model.layers[1].mlp.gate.float()
    router.num_experts, router.num_group, router.topk_group = 8, 2, 1
    router.weight.data = torch.randn(8, 32)
    router.e_score_correction_bias = 0.1 * torch.randn(8)
    x = torch.randn(1, 24, 32)
    for got, want in zip(router_forward(router, x), KimiLinearTopkRouter.forward(router, x)):
        assert torch.equal(got, want)
