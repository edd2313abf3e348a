"""The MixtureOfMemories layer on one device: against its formula built from the oracle
(`mom_reference` for the routed memories, the torch linear attention for the shared one),
packed documents, the auxiliary loss, options (delta-rule memories included)."""

import pytest
import torch
import torch.nn.functional as F

from lasp.kernels import linear_attention, load_balancing_loss, mom_reference, mom_route
from lasp.layers import MixtureOfMemories
from lasp.layers.delta_rule import l2_normalize
from lasp.layers.feature_maps import POINTWISE_MAPS
from lasp.layers.linear_attention import DATA_DECAY_NORMALIZER, GATES, retnet_log_decay
from tests.utils import random_cu_seqlens, rel_err

HIDDEN, HEADS, HEAD_DIM = 16, 2, 4


def expected_forward(layer, x, cu_seqlens=None):
    """The layer's output and aux loss written out with the oracle, from its parameters."""
    B, T, _ = x.shape
    H, D, M = layer.num_heads, layer.head_dim, layer.num_memories
    phi = POINTWISE_MAPS[layer.feature_map]
    weights, indices, probs = mom_route(layer.router(x), layer.top_k)
    q = phi(layer.q_proj(x).view(B, T, H, D))
    k = phi(torch.einsum("bti,moi->btmo", x, layer.k_proj.weight).view(B, T, M, H, D))
    v = torch.einsum("bti,moi->btmo", x, layer.v_proj.weight).view(B, T, M, H, D)
    beta = beta_shared = None
    if layer.delta_rule:
        q, k = l2_normalize(q), l2_normalize(k)
        beta = layer.b_proj(x).sigmoid().view(B, T, M, H)
    g = g_gamma = g_shared = None
    if layer.decay == "fixed":
        g_gamma = retnet_log_decay(H, x.dtype)
    elif layer.decay == "data":
        g = F.logsigmoid(layer.g_proj(x)).view(B, T, M, H) / DATA_DECAY_NORMALIZER
        g_shared = F.logsigmoid(layer.shared_g_proj(x)) / DATA_DECAY_NORMALIZER if layer.shared_memory else None
    o, _ = mom_reference(q, k, v, weights, indices, g, g_gamma, beta=beta, cu_seqlens=cu_seqlens)
    if layer.shared_memory:
        k_s = phi(layer.shared_k_proj(x).view(B, T, H, D))
        if layer.delta_rule:
            k_s, beta_shared = l2_normalize(k_s), layer.shared_b_proj(x).sigmoid()
        o = o + linear_attention(q, k_s, layer.shared_v_proj(x).view(B, T, H, D), g_shared, g_gamma,
                                 beta=beta_shared, cu_seqlens=cu_seqlens, backend="torch")[0]
    if layer.o_norm is not None:
        o = layer.o_norm(o)
    if layer.gate_proj is not None:
        o = o * GATES[layer.output_gate](layer.gate_proj(x)).view(B, T, H, D)
    return layer.o_proj(o.reshape(B, T, H * D)), load_balancing_loss(probs, indices)


@pytest.mark.parametrize("options", [
    dict(),
    dict(decay="data", feature_map="elu+1", output_gate="sigmoid", num_memories=3, top_k=1),
    dict(decay="none", shared_memory=False, output_norm=False, output_gate=None, top_k=4),
    dict(decay="data", delta_rule=True, num_memories=3),
])
@pytest.mark.parametrize("packed", [False, True])
def test_layer_matches_its_formula(options, packed):
    torch.manual_seed(0)
    layer = MixtureOfMemories(HIDDEN, HEADS, HEAD_DIM, **options).double()
    B, T = (1, 29) if packed else (2, 17)
    cu = random_cu_seqlens([9, 0, 14, 6]) if packed else None
    x = torch.randn(B, T, HIDDEN, dtype=torch.float64, requires_grad=True)
    out, aux = layer(x, cu_seqlens=cu)
    want_out, want_aux = expected_forward(layer, x, cu)
    assert out.shape == x.shape and aux.dim() == 0
    assert rel_err(out, want_out) < 1e-12 and rel_err(aux, want_aux) < 1e-14
    dout = torch.randn_like(out)
    leaves = [x, *layer.parameters()]
    got = torch.autograd.grad((out * dout).sum() + aux, leaves)
    want = torch.autograd.grad((want_out * dout).sum() + want_aux, leaves)
    for (name, _), a, b in zip([("x", x), *layer.named_parameters()], got, want):
        assert rel_err(a, b) < 1e-11, name
        assert b.abs().sum() > 0 or name == "router.weight", f"{name} gets no gradient"


def test_packed_documents_are_independent():
    torch.manual_seed(1)
    layer = MixtureOfMemories(HIDDEN, HEADS, HEAD_DIM, decay="data").double()
    x = torch.randn(1, 23, HIDDEN, dtype=torch.float64)
    packed, _ = layer(x, cu_seqlens=random_cu_seqlens([9, 14]))
    for start, end in ((0, 9), (9, 23)):
        assert rel_err(packed[:, start:end], layer(x[:, start:end])[0]) < 1e-12


def test_options_are_checked():
    with pytest.raises(ValueError, match="top_k must be an int in"):
        MixtureOfMemories(HIDDEN, HEADS, HEAD_DIM, num_memories=2, top_k=3)
    with pytest.raises(ValueError, match="num_memories must be a positive int"):
        MixtureOfMemories(HIDDEN, HEADS, HEAD_DIM, num_memories=0)
    with pytest.raises(ValueError, match="decay"):
        MixtureOfMemories(HIDDEN, HEADS, HEAD_DIM, decay="vector")
    with pytest.raises(TypeError, match="delta_rule must be a bool"):
        MixtureOfMemories(HIDDEN, HEADS, HEAD_DIM, delta_rule="gated")
    layer = MixtureOfMemories(HIDDEN, HEADS, HEAD_DIM, num_memories=5)
    assert layer.k_proj.weight.shape == (5, HEADS * HEAD_DIM, HIDDEN)
    assert "num_memories=5" in repr(layer.k_proj)
