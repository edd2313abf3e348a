"""The FLOP count behind MFU, and the peak-FLOP table."""

import torch

from lasp.launch.metrics import flops_per_token, peak_flops
from lasp.models import LinearLlamaForCausalLM, linear_llama_config


def _meta_model(**overrides):
    with torch.device("meta"):
        return LinearLlamaForCausalLM(linear_llama_config("linear-llama3-1b", **overrides))


def test_flops_per_token():
    T = 32768
    linear, hybrid = _meta_model(layer_pattern="L"), _meta_model(layer_pattern="LLLN")
    # 6 FLOPs per matmul weight and token (counted here from the Linear layers, lm_head included)
    weights = sum(m.weight.numel() for m in linear.modules() if isinstance(m, torch.nn.Linear))
    H, D = 32, 64
    linear_attention = H * (6 * D * 64 + 12 * D * D)
    assert abs(flops_per_token(linear, T) - (6 * weights + 16 * linear_attention)) < 1e-4 * 6 * weights
    hybrid_weights = sum(m.weight.numel() for m in hybrid.modules() if isinstance(m, torch.nn.Linear))
    expected = 6 * hybrid_weights + 12 * linear_attention + 4 * 6 * H * D * T  # 4 softmax layers, causal
    assert abs(flops_per_token(hybrid, T) - expected) < 1e-4 * expected
    assert 7e9 < flops_per_token(linear, T) < 9e9  # ≈ 6 × 1.24B matmul weights


def test_peak_flops():
    assert peak_flops(torch.device("cpu"), None) is None  # MFU is n/a on CPU
    assert peak_flops(torch.device("cpu"), 100.0) == 100e12
