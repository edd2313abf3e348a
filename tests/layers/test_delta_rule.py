"""The delta-rule layers (Gated DeltaNet, KDA) against a token-by-token recurrence of their
own parameters (no kernel), packed documents, sequence parallelism, and bad arguments."""

import math

import pytest
import torch
import torch.nn.functional as F

from lasp.layers import GatedDeltaNet, KimiDeltaAttention
from lasp.parallel import SequenceLayout
from tests.distributed import assert_layer_shards_match, run_distributed
from tests.utils import assert_layer_matches_recurrence, random_cu_seqlens

HIDDEN, HEADS, HEAD_DIM, HEAD_V_DIM = 24, 2, 8, 6
LAYERS = {"gdn": GatedDeltaNet, "kda": KimiDeltaAttention}


def random_layer(kind, seed=0, **options):
    """A float64 layer with every parameter drawn fresh (decays spread over (0, 1))."""
    torch.manual_seed(seed)
    layer = LAYERS[kind](HIDDEN, HEADS, HEAD_DIM, head_v_dim=HEAD_V_DIM, **options).double()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name == "A_log":
                p.copy_(torch.randn_like(p) * 0.5 - 1.0)
            else:
                p.copy_(torch.randn_like(p) * (1.0 if p.dim() < 2 else 1 / math.sqrt(p.shape[-1])))
    return layer


def delta_rule_by_recurrence(layer, x, lengths):
    """The layer written out token by token, each packed document alone:
    S_t = A_t(S_{t-1}),  S_t += β_t k_t (v_t − k_tᵀ S_t)ᵀ,  o_t = K^-½ q_tᵀ S_t,
    with A_t = exp(g_t) (Gated DeltaNet) or diag(exp(gk_t)) (KDA), q, k L2-normalised,
    out = o_proj(RMSNorm_head(o) ⊙ act(gate x))."""
    Hk, K, Hv, V = layer.num_heads, layer.head_dim, layer.num_v_heads, layer.head_v_dim
    kda = isinstance(layer, KimiDeltaAttention)
    outs = []
    for doc in x.split(lengths, dim=1):
        B, T, _ = doc.shape
        qkv = torch.cat([doc @ layer.q_proj.weight.T, doc @ layer.k_proj.weight.T, doc @ layer.v_proj.weight.T], -1)
        if layer.conv is not None:  # causal depthwise conv inside the document
            w = layer.conv.weight
            qkv = F.conv1d(F.pad(qkv.transpose(1, 2), (w.shape[1] - 1, 0)), w[:, None], groups=w.shape[0])
            qkv = qkv.transpose(1, 2)
        q, k, v = F.silu(qkv).split([Hk * K, Hk * K, Hv * V], -1)
        q, k, v = q.view(B, T, Hk, K), k.view(B, T, Hk, K), v.view(B, T, Hv, V)
        q = q / (q.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()
        k = k / (k.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()
        beta = torch.sigmoid(doc @ layer.b_proj.weight.T)                               # [B, T, Hv]
        A = layer.A_log.exp()
        if kda:
            low_rank, full = layer.f_proj
            a = (doc @ low_rank.weight.T @ full.weight.T + layer.dt_bias).view(B, T, Hv, K)
            decay = (-A[:, None] * F.softplus(a)).exp()                                # [B, T, Hv, K]
            low_rank, full = layer.gate_proj
            gate = torch.sigmoid(doc @ low_rank.weight.T @ full.weight.T + full.bias)
        else:
            decay = (-A * F.softplus(doc @ layer.a_proj.weight.T + layer.dt_bias)).exp()[..., None]  # [B, T, Hv, 1]
            gate = F.silu(doc @ layer.gate_proj.weight.T)
        key_head = [h * Hk // Hv for h in range(Hv)]       # consecutive value heads share a key head
        state = doc.new_zeros(B, Hv, K, V)
        o = []
        for t in range(T):
            q_t, k_t, v_t, b_t = q[:, t, key_head], k[:, t, key_head], v[:, t], beta[:, t]
            state = decay[:, t, :, :, None] * state
            error = v_t - torch.einsum("bhk,bhkv->bhv", k_t, state)
            state = state + b_t[..., None, None] * k_t[..., None] * error[..., None, :]
            o.append(K ** -0.5 * torch.einsum("bhk,bhkv->bhv", q_t, state))
        o = torch.stack(o, 1)
        o = o / (o.pow(2).mean(-1, keepdim=True) + layer.o_norm.eps).sqrt() * layer.o_norm.weight
        o = o * gate.view(B, T, Hv, V)
        outs.append(o.reshape(B, T, Hv * V) @ layer.o_proj.weight.T)
    return torch.cat(outs, 1)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("B, lengths, num_v_heads, conv_size", [(2, [13], None, 0), (1, [9, 1, 12], 4, 3)])
def test_delta_layer_matches_its_recurrence(kind, B, lengths, num_v_heads, conv_size):
    layer = random_layer(kind, num_v_heads=num_v_heads, conv_size=conv_size)
    x = torch.randn(B, sum(lengths), HIDDEN, dtype=torch.float64, requires_grad=True)
    assert_layer_matches_recurrence(layer, x, lengths, delta_rule_by_recurrence(layer, x, lengths))

def _sp_body(rank, W):
    lengths = [7, 1, 10, 6]                                       # documents across segment boundaries
    T = sum(lengths)
    for kind in LAYERS:
        for layout_kind in ("contiguous", "zigzag"):
            layer = random_layer(kind, seed=2, num_v_heads=4, conv_size=3)
            torch.manual_seed(3)
            x, cot = (torch.randn(1, T, HIDDEN, dtype=torch.float64) for _ in range(2))
            assert_layer_shards_match(layer, x, cot, SequenceLayout(T, W, rank, layout_kind),
                                      random_cu_seqlens(lengths), (kind, layout_kind))


def test_delta_layers_under_sequence_parallelism_equal_one_process():
    run_distributed(_sp_body, 2)


@pytest.mark.parametrize("kind", LAYERS)
def test_delta_layer_rejects_bad_arguments(kind):
    cls = LAYERS[kind]
    for options, argument in [(dict(num_heads=0), "num_heads"), (dict(head_dim=2.5), "head_dim"),
                              (dict(num_v_heads=3), "num_v_heads"), (dict(num_v_heads=1), "num_v_heads"),
                              (dict(head_v_dim=0), "head_v_dim"), (dict(conv_size=-1), "conv_size")]:
        arguments = dict(hidden_size=HIDDEN, num_heads=HEADS, head_dim=HEAD_DIM) | options
        with pytest.raises(ValueError, match=argument):
            cls(**arguments)
    if kind == "kda":
        with pytest.raises(ValueError, match="decay_rank"):
            cls(HIDDEN, HEADS, HEAD_DIM, decay_rank=0)
