"""Single-device layers: shapes, options, and each piece against a plain formula."""

import math

import pytest
import torch
import torch.nn.functional as F

from lasp.layers import LinearAttention, RMSNorm, ShortConv, SoftmaxAttention, SwiGLU
from lasp.layers.linear_attention import retnet_log_decay
from lasp.layers.ops import softmax_attention_op
from lasp.layers.rope import apply_rope
from tests.utils import random_cu_seqlens, rel_err

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 32, 4, 2, 8


@pytest.mark.parametrize("options", [
    dict(),
    dict(decay="data", conv_size=4, feature_map="elu+1", output_gate="sigmoid"),
    dict(decay="none", feature_map="silu", output_norm=False, output_gate=None),
    dict(decay="fixed", feature_map="relu", conv_size=2),
])
def test_linear_attention_layer_shapes_and_packing(options):
    torch.manual_seed(0)
    layer = LinearAttention(HIDDEN, HEADS, HEAD_DIM, KV_HEADS, **options).double()
    x = torch.randn(1, 23, HIDDEN, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    out.square().sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    # Packed documents are independent: each document alone gives its slice of the output.
    cu = random_cu_seqlens([9, 14])
    packed = layer(x, cu_seqlens=cu)
    for start, end in ((0, 9), (9, 23)):
        assert rel_err(packed[:, start:end], layer(x[:, start:end])) < 1e-12


def test_linear_attention_layer_rejects_unknown_options():
    with pytest.raises(ValueError, match="feature_map"):
        LinearAttention(HIDDEN, HEADS, HEAD_DIM, feature_map="tanh")
    with pytest.raises(ValueError, match="decay"):
        LinearAttention(HIDDEN, HEADS, HEAD_DIM, decay="vector")
    with pytest.raises(ValueError, match="multiple"):
        LinearAttention(HIDDEN, HEADS, HEAD_DIM, num_kv_heads=3)


def test_retnet_decays_are_log_decays():
    g = retnet_log_decay(32)
    assert (g <= 0).all() and (g[1:] >= g[:-1]).all()
    assert torch.allclose(g[0].exp(), torch.tensor(1 - 2 ** -5))


def test_short_conv_matches_causal_conv1d_and_masks_documents():
    torch.manual_seed(0)
    conv = ShortConv(6, 4).double()
    x = torch.randn(2, 17, 6, dtype=torch.float64)
    expected = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), conv.weight[:, None, :], groups=6)).transpose(1, 2)
    assert rel_err(conv(x), expected) < 1e-14
    cu = random_cu_seqlens([5, 1, 11])
    packed = conv(x[:1], cu_seqlens=cu)
    for start, end in ((0, 5), (5, 6), (6, 17)):
        assert rel_err(packed[:, start:end], conv(x[:1, start:end])) < 1e-14


def test_softmax_attention_layer_against_eager_attention():
    torch.manual_seed(0)
    layer = SoftmaxAttention(HIDDEN, HEADS, HEAD_DIM, KV_HEADS, rope_theta=10000.0).double()
    x = torch.randn(2, 13, HIDDEN, dtype=torch.float64)
    pos = torch.arange(13)
    q = apply_rope(layer.q_proj(x).view(2, 13, HEADS, HEAD_DIM), pos, 10000.0).transpose(1, 2)
    k = apply_rope(layer.k_proj(x).view(2, 13, KV_HEADS, HEAD_DIM), pos, 10000.0).transpose(1, 2)
    v = layer.v_proj(x).view(2, 13, KV_HEADS, HEAD_DIM).transpose(1, 2)
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = (q @ k.transpose(-1, -2)) / HEAD_DIM ** 0.5
    scores = scores.masked_fill(~torch.ones(13, 13, dtype=torch.bool).tril(), float("-inf"))
    o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 13, -1)
    assert rel_err(layer(x), layer.o_proj(o)) < 1e-13


def test_softmax_op_keeps_packed_documents_apart():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 12, 4, 8, dtype=torch.float64), *torch.randn(2, 1, 12, 2, 8, dtype=torch.float64)
    cu = random_cu_seqlens([5, 7])
    packed = softmax_attention_op(q, k, v, cu_seqlens=cu)
    for start, end in ((0, 5), (5, 12)):
        alone = softmax_attention_op(q[:, start:end], k[:, start:end], v[:, start:end])
        assert rel_err(packed[:, start:end], alone) < 1e-13


def test_rope_is_relative():
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 5, 1, 16, dtype=torch.float64)
    pos = torch.arange(5)
    dots = (apply_rope(q, pos, 500000.0) * apply_rope(k, pos, 500000.0)).sum(-1)
    shifted = (apply_rope(q, pos + 1000, 500000.0) * apply_rope(k, pos + 1000, 500000.0)).sum(-1)
    assert rel_err(shifted, dots) < 1e-12


def test_rmsnorm_matches_torch():
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    norm = RMSNorm(8).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    assert rel_err(norm(x), F.rms_norm(x, (8,), norm.weight, eps=1e-6)) < 1e-14
    half = x.bfloat16()
    assert norm.bfloat16()(half).dtype == torch.bfloat16


def test_swiglu_by_hand():
    """Identity projections leave silu(x)·x = x²/(1 + e^−x), here from the formula in Python floats."""
    mlp = SwiGLU(2, 2).double()
    with torch.no_grad():
        for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            proj.weight.copy_(torch.eye(2))
    x = [1.5, -2.0]
    expected = torch.tensor([t * t / (1 + math.exp(-t)) for t in x], dtype=torch.float64)
    assert rel_err(mlp(torch.tensor(x, dtype=torch.float64)), expected) < 1e-15


def test_swiglu_is_hugging_face_llamas_mlp():
    """Same parameter names and the same function as transformers' LlamaMLP."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    torch.manual_seed(0)
    mlp = SwiGLU(8, 16).double()
    config = LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, hidden_act="silu")
    theirs = LlamaMLP(config).double()
    theirs.load_state_dict(mlp.state_dict())              # strict: the names match one to one
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    assert rel_err(mlp(x), theirs(x)) < 1e-15
