"""MiniMax (`minimax`) under lasp.parallelize: lightning layers on lasp's fixed-decay kernels,
softmax layers on LASP-2H, sparse MoE untouched (`lasp/integrations/hf/minimax.py`)."""

from __future__ import annotations

import pytest
import torch

import lasp
from tests.distributed import run_distributed
from tests.integrations.hf_checks import PACKED_TOL, VOCAB, check_one_rank, check_sequence_parallel, tiny_model
from tests.integrations.hf_gpu_checks import check_against_transformers_on_gpu
from tests.utils import random_cu_seqlens, rel_err


def make_minimax(layer_types=("linear_attention", "full_attention", "linear_attention")):
    """Two lightning layers (different layer indices, so different decays) around a softmax
    layer, top-2 of 4 experts; blocks of 4 tokens so transformers' loop crosses blocks."""
    return tiny_model("minimax", hidden_size=32, intermediate_size=32, num_hidden_layers=len(layer_types),
                      layer_types=list(layer_types), num_attention_heads=4, num_key_value_heads=2,
                      num_local_experts=4, num_experts_per_tok=2, block_size=4)


def test_one_rank_matches_transformers_and_keeps_documents_apart():
    check_one_rank(make_minimax)


@pytest.mark.parametrize("W", [2, 3])
def test_sequence_parallel_matches_one_rank(W):
    run_distributed(check_sequence_parallel, W, make_minimax)


def test_transformers_mixes_packed_documents_and_lasp_does_not():
    """Lightning layers only: transformers' own forward ignores cu_seqlens, lasp's resets the state."""
    torch.manual_seed(0)
    model = make_minimax(("linear_attention", "linear_attention"))
    ids, cu = torch.randint(0, VOCAB, (1, 16)), random_cu_seqlens([9, 7])

    def second_document_error():
        packed = model(ids, cu_seqlens=cu).logits[:, 9:]
        return rel_err(packed, model(ids[:, 9:]).logits)

    assert second_document_error() > 1e-3
    lasp.parallelize(model)
    assert second_document_error() < PACKED_TOL


def test_cache_is_refused():
    torch.manual_seed(0)
    model = lasp.parallelize(make_minimax())
    with pytest.raises(ValueError, match="MiniMaxLightningAttention.*no cache"):
        model(torch.randint(0, VOCAB, (1, 8)), use_cache=True)


@pytest.mark.gpu
def test_triton_kernels_match_transformers_on_gpu():
    """fp32 on one GPU: lasp's Triton kernels (tf32 dot products) against transformers' torch
    loop, logits and every gradient, over many chunks and blocks; packed = each document alone.
    One expert: a tf32 rounding could flip a top-k choice. Writes $OUT/hf_minimax_gpu.json."""
    torch.manual_seed(0)
    native = tiny_model("minimax", hidden_size=256, intermediate_size=256, num_hidden_layers=3,
                        layer_types=["linear_attention", "full_attention", "linear_attention"],
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=1,
                        num_experts_per_tok=1).float().cuda()
    check_against_transformers_on_gpu("hf_minimax_gpu", native, T=512)

