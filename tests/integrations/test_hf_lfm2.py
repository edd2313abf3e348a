"""LFM2 (`lfm2`) under lasp.parallelize: gated short convolutions on lasp's `short_conv`
(SP halo, document masking), softmax layers on LASP-2H (`lasp/integrations/hf/lfm2.py`)."""

from __future__ import annotations

import pytest
import torch

import lasp
from tests.distributed import run_distributed
from tests.integrations.hf_checks import PACKED_TOL, VOCAB, check_one_rank, check_sequence_parallel, tiny_model
from tests.integrations.hf_gpu_checks import check_against_transformers_on_gpu
from tests.utils import random_cu_seqlens, rel_err


def make_lfm2(layer_types=("conv", "full_attention", "conv"), **config):
    """Two width-3 convolutions (LFM2's conv_L_cache) around a softmax layer, with biases."""
    return tiny_model("lfm2", hidden_size=32, intermediate_size=64, block_auto_adjust_ff_dim=False,
                      num_hidden_layers=len(layer_types), layer_types=list(layer_types), num_attention_heads=4,
                      num_key_value_heads=2, conv_L_cache=3, conv_bias=True, **config)


def test_one_rank_matches_transformers_and_keeps_documents_apart():
    check_one_rank(make_lfm2)


@pytest.mark.parametrize("W", [2, 3])
def test_sequence_parallel_matches_one_rank(W):
    run_distributed(check_sequence_parallel, W, make_lfm2)


def test_transformers_mixes_packed_documents_and_lasp_does_not():
    """Convolutions only: transformers' convolution reads across the document start (its torch
    path refuses cu_seqlens: only the causal_conv1d CUDA kernel takes them), lasp's does not."""
    torch.manual_seed(0)
    # no cache: transformers' cannot build masks for a model without attention; weights 5x
    # the default scale, so that the gated convolution (a product of two projections) shows
    model = make_lfm2(("conv", "conv"), use_cache=False, initializer_range=0.1)
    ids, cu = torch.randint(0, VOCAB, (1, 16)), random_cu_seqlens([9, 7])

    def second_document_error(**packing):
        packed = model(ids, **packing).logits[:, 9:]
        return rel_err(packed, model(ids[:, 9:]).logits)

    assert second_document_error() > 1e-3
    lasp.parallelize(model)
    assert second_document_error(cu_seqlens=cu) < PACKED_TOL


def test_cache_is_refused():
    torch.manual_seed(0)
    model = lasp.parallelize(make_lfm2())
    with pytest.raises(ValueError, match="Lfm2ShortConv.*no cache"):
        model(torch.randint(0, VOCAB, (1, 8)), use_cache=True)


@pytest.mark.gpu
def test_matches_transformers_on_gpu():
    """fp32 on one GPU (lasp's softmax kernel rounds in tf32): logits and every gradient against
    transformers' torch path; packed = each document alone. Writes $OUT/hf_lfm2_gpu.json."""
    torch.manual_seed(0)
    native = tiny_model("lfm2", hidden_size=256, intermediate_size=512, block_auto_adjust_ff_dim=False,
                        num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"], num_attention_heads=4,
                        num_key_value_heads=2, conv_L_cache=3, conv_bias=True).float().cuda()
    check_against_transformers_on_gpu("hf_lfm2_gpu", native, T=512)
