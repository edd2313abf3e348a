"""Gated DeltaNet hybrids (Qwen3-Next, Qwen3.5 dense and MoE, OLMo-Hybrid) under lasp.parallelize:
W = 1 equals the native model, packed documents stay apart (the native model mixes them),
W = 2 and 3 equal W = 1 in loss and every gradient (`hf_checks`)."""

import pytest
import torch

import lasp
from tests.distributed import run_distributed
from tests.integrations.hf_checks import VOCAB, check_one_rank, check_sequence_parallel, tiny_model
from tests.utils import random_cu_seqlens, rel_err

pytest.importorskip("transformers")

# Two key heads, four value heads (each key head serves two), K ≠ V; one softmax layer.
LINEAR = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=6,
              linear_conv_kernel_dim=4)
COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, layer_types=["linear_attention", "full_attention"],
              **LINEAR)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)
CONFIGS = {
    "qwen3_next": dict(COMMON, **MOE),
    "qwen3_5_text": COMMON,
    "qwen3_5_moe_text": dict(COMMON, **MOE),
    "olmo_hybrid": dict(COMMON, pad_token_id=0, eos_token_id=1, linear_allow_neg_eigval=True),
}


def _tiny(model_type):
    """A tiny float64 model whose decays keep state across tokens. transformers draws Qwen's
    A ∈ [0.01, 16]: per-token decays down to e^-20 leave the state that LASP-2 passes between
    ranks (and the gradients of A_log, dt_bias) negligible, so A ∈ [0.05, 0.5] here."""
    model = tiny_model(model_type, **CONFIGS[model_type])
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "A_log"):
                module.A_log.copy_(torch.empty_like(module.A_log).uniform_(0.05, 0.5).log())
    return model


def make_qwen3_next():
    return _tiny("qwen3_next")


def make_qwen3_5_text():
    return _tiny("qwen3_5_text")


def make_qwen3_5_moe_text():
    return _tiny("qwen3_5_moe_text")


def make_olmo_hybrid():
    return _tiny("olmo_hybrid")


MAKERS = (make_qwen3_next, make_qwen3_5_text, make_qwen3_5_moe_text, make_olmo_hybrid)


@pytest.mark.parametrize("make_model", MAKERS, ids=list(CONFIGS))
def test_one_rank_matches_native_and_keeps_documents_apart(make_model):
    check_one_rank(make_model)


def test_native_mixes_documents_wrapped_does_not():
    """The reason to wrap on one GPU too: given two packed documents the way transformers takes
    them (positions restarting per document), its Gated DeltaNet carries state from the first
    into the second; lasp's, given cu_seqlens, resets it."""
    torch.manual_seed(0)
    model = make_qwen3_5_text()
    ids = torch.randint(0, VOCAB, (1, 16))
    positions = torch.cat([torch.arange(6), torch.arange(10)])[None]
    second_alone = model(ids[:, 6:]).logits
    assert rel_err(model(ids, position_ids=positions).logits[:, 6:], second_alone) > 1e-3
    lasp.parallelize(model)
    packed = model(ids, cu_seqlens=random_cu_seqlens([6, 10])).logits
    assert rel_err(packed[:, 6:], model(ids[:, 6:]).logits) < 1e-6


def test_refuses_cache_and_padding_mask():
    """A wrapped layer is for training: no recurrent-state cache, no padding mask."""
    layer = lasp.parallelize(make_qwen3_next()).model.layers[0].linear_attn
    x = torch.randn(1, 4, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="Qwen3NextGatedDeltaNet.*no cache"):
        layer(x, cache=object())
    with pytest.raises(ValueError, match="Qwen3NextGatedDeltaNet.*no padding attention_mask"):
        layer(x, attention_mask=torch.ones(1, 4))


def _all_models(rank, W):
    for make_model in MAKERS:
        check_sequence_parallel(rank, W, make_model)


@pytest.mark.parametrize("W", [2, 3])
def test_sequence_parallel_matches_one_rank(W):
    run_distributed(_all_models, W)
