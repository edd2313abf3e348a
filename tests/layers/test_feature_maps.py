"""Feature maps: the kernels φ(q)·φ(k) they stand for (exactly, in float64), the key dims
they take, and a linear layer with a polynomial map against its kernel written without φ."""

import pytest
import torch
import torch.nn.functional as F

from lasp.layers import LinearAttention, build_feature_map
from lasp.layers.feature_maps import POINTWISE_MAPS, upper_products
from tests.utils import rel_err


def _dots(phi, q, k):
    return (phi(q) * phi(k)).sum(-1)


def test_upper_products_square_the_inner_product():
    x, y = torch.randn(2, 7, 9, dtype=torch.float64)
    assert upper_products(x).shape == (7, 45)
    assert rel_err(_dots(upper_products, x, y), (x * y).sum(-1) ** 2) < 1e-14


def test_based_is_the_second_order_taylor_series_of_exp():
    torch.manual_seed(0)
    d = 16
    phi = build_feature_map("based", d)
    q, k = torch.randn(2, 3, 5, d, dtype=torch.float64)
    assert phi(q).shape == (3, 5, 1 + d + d * (d + 1) // 2) and phi.expanded_dim == 153
    s = (q * k).sum(-1) / d ** 0.5
    assert rel_err(_dots(phi, q, k), 1 + s + s ** 2 / 2) < 1e-14
    assert phi.scale == 1.0  # the map is the whole kernel: no further query scale
    assert build_feature_map("based", 21).expanded_dim == build_feature_map("rebased", 22).expanded_dim == 253


def test_rebased_squares_the_normalised_affine_inner_product():
    torch.manual_seed(0)
    d = 8
    phi = build_feature_map("rebased", d).double()
    with torch.no_grad():  # a learned affine, not the identity it starts from
        phi.gamma.normal_()
        phi.beta.normal_()
    q, k = torch.randn(2, 4, 6, d, dtype=torch.float64)

    def affine(x):
        normalised = (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        return phi.gamma * normalised + phi.beta

    expected = ((affine(q) * affine(k)).sum(-1) / d ** 0.5) ** 2
    assert phi(q).shape == (4, 6, d * (d + 1) // 2)
    assert rel_err(_dots(phi, q, k), expected) < 1e-13
    gamma_grad, beta_grad = torch.autograd.grad(_dots(phi, q, k).sum(), (phi.gamma, phi.beta))
    assert gamma_grad.abs().sum() > 0 and beta_grad.abs().sum() > 0


def test_pointwise_maps_keep_the_key_dim():
    x = torch.randn(3, 5, dtype=torch.float64)
    for name in POINTWISE_MAPS:
        phi = build_feature_map(name, 5)
        assert phi.expanded_dim == 5 and phi.scale is None
    assert torch.equal(build_feature_map("elu+1", 5)(x), F.elu(x) + 1)


@pytest.mark.parametrize("name, dim, message", [
    ("based", 22, r"widens a key head dim of 22 to 276, outside the kernels' head dims 16..256; use a key head "
                  r"dim in 5..21 \(the value head dim is separate\)"),
    ("based", 4, r"to 15, outside .* in 5..21"),
    ("rebased", 23, r"to 276, outside .* in 6..22"),
    ("rebased", 5, r"to 15, outside .* in 6..22"),
    ("tanh", 8, r"feature_map must be one of \['identity', 'elu\+1', 'relu', 'silu', 'based', 'rebased'\]"),
    ("relu", 0, r"key head dim must be a positive int"),
])
def test_feature_maps_reject_what_the_kernels_cannot_take(name, dim, message):
    with pytest.raises(ValueError, match=message):
        build_feature_map(name, dim)


@pytest.mark.parametrize("name", ["based", "rebased"])
def test_linear_layer_with_a_polynomial_map_computes_its_kernel(name):
    """o_t = Σ_{s≤t} κ(q_t, k_s) v_s with κ written from q·k, not through φ; no decay, scale 1."""
    torch.manual_seed(1)
    H, Hkv, d, D, T = 4, 2, 6, 8, 11
    layer = LinearAttention(24, H, D, Hkv, key_dim=d, feature_map=name, decay="identity", output_norm=False,
                            output_gate=None).double()
    x = torch.randn(2, T, 24, dtype=torch.float64)
    q = layer.q_proj(x).view(2, T, H, d)
    k = layer.k_proj(x).view(2, T, Hkv, d).repeat_interleave(2, 2)
    v = layer.v_proj(x).view(2, T, Hkv, D).repeat_interleave(2, 2)
    if name == "rebased":
        q, k = (F.layer_norm(t, (d,), layer.feature_map.gamma, layer.feature_map.beta, 1e-5) for t in (q, k))
    s = torch.einsum("bthd,bshd->bhts", q, k) / d ** 0.5
    kernel = (1 + s + s ** 2 / 2 if name == "based" else s ** 2).tril()
    o = torch.einsum("bhts,bshv->bthv", kernel, v)
    assert rel_err(layer(x), layer.o_proj(o.reshape(2, T, H * D))) < 1e-12
