"""The GLA layer against a token-by-token recurrence of its own parameters (no kernel),
under sequence parallelism against one process, and the linear layer's decay options."""

import math

import pytest
import torch
import torch.nn.functional as F

from lasp.layers import GatedLinearAttention, LinearAttention
from lasp.layers.linear_attention import lightning_log_decay
from lasp.parallel import SequenceLayout
from tests.distributed import assert_layer_shards_match, run_distributed
from tests.utils import assert_bf16_gpu_layer_matches_fp64, assert_layer_gradients_match, random_cu_seqlens, rel_err

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 24, 4, 2, 8


def random_gla(seed=0, **options):
    """A float64 GLA layer with every parameter drawn fresh (decays spread over (0, 1))."""
    torch.manual_seed(seed)
    layer = GatedLinearAttention(HIDDEN, HEADS, HEAD_DIM, KV_HEADS, **options).double()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn_like(p) * (2.0 if name == "gk_proj.1.bias" else 1 / math.sqrt(p.shape[-1])))
    return layer


def gla_by_recurrence(layer, x, lengths):
    """The GLA paper's layer written out token by token, each packed document alone:
    S_t = diag(exp(gk_t)) S_{t-1} + k_t v_tᵀ,  o_t = K^-½ q_tᵀ S_t,
    out = o_proj(swish(W_r x) ⊙ RMSNorm_head(o))."""
    H, Hkv, K, D = layer.num_heads, layer.num_kv_heads, layer.key_dim, layer.head_dim
    outs = []
    for doc in x.split(lengths, dim=1):
        B, T, _ = doc.shape
        qkv = torch.cat([doc @ layer.q_proj.weight.T, doc @ layer.k_proj.weight.T, doc @ layer.v_proj.weight.T], -1)
        if layer.conv is not None:  # causal depthwise conv inside the document, then SiLU
            w = layer.conv.weight
            qkv = F.silu(F.conv1d(F.pad(qkv.transpose(1, 2), (w.shape[1] - 1, 0)), w[:, None], groups=w.shape[0])
                         .transpose(1, 2))
        q, k, v = qkv.split([H * K, Hkv * K, Hkv * D], -1)
        low_rank, full = layer.gk_proj
        gk = F.logsigmoid(doc @ low_rank.weight.T @ full.weight.T + full.bias) / 16
        q, k, v, gk = q.view(B, T, H, K), k.view(B, T, Hkv, K), v.view(B, T, Hkv, D), gk.view(B, T, Hkv, K)
        kv_head = [h * Hkv // H for h in range(H)]
        state = doc.new_zeros(B, H, K, D)
        o = []
        for t in range(T):
            k_t, v_t, gk_t = k[:, t, kv_head], v[:, t, kv_head], gk[:, t, kv_head]
            state = gk_t.exp()[..., None] * state + k_t[..., None] * v_t[..., None, :]
            o.append(K ** -0.5 * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
        o = torch.stack(o, 1)
        o = o / (o.pow(2).mean(-1, keepdim=True) + layer.o_norm.eps).sqrt() * layer.o_norm.weight
        o = o * F.silu(doc @ layer.gate_proj.weight.T).view(B, T, H, D)
        outs.append(o.reshape(B, T, H * D) @ layer.o_proj.weight.T)
    return torch.cat(outs, 1)


@pytest.mark.parametrize("B, lengths, conv_size", [(2, [19], 0), (1, [9, 1, 13], 3)])
def test_gla_layer_matches_its_recurrence(B, lengths, conv_size):
    layer = random_gla(conv_size=conv_size)
    assert (layer.key_dim, layer.decay) == (HEAD_DIM // 2, "diagonal")
    x = torch.randn(B, sum(lengths), HIDDEN, dtype=torch.float64, requires_grad=True)
    cu = random_cu_seqlens(lengths) if len(lengths) > 1 else None
    out, expected = layer(x, cu_seqlens=cu), gla_by_recurrence(layer, x, lengths)
    assert rel_err(out, expected) < 1e-12
    assert_layer_gradients_match(layer, x, out, expected)


def _sp_body(rank, W):
    lengths = [7, 1, 10, 6]                                       # documents across segment boundaries
    T = sum(lengths)
    for kind in ("contiguous", "zigzag"):
        layer = random_gla(seed=2, conv_size=3)
        torch.manual_seed(3)
        x, cot = (torch.randn(1, T, HIDDEN, dtype=torch.float64) for _ in range(2))
        assert_layer_shards_match(layer, x, cot, SequenceLayout(T, W, rank, kind), random_cu_seqlens(lengths), kind)


def test_gla_layer_under_sequence_parallelism_equals_one_process():
    run_distributed(_sp_body, 2)


def test_decay_options_follow_the_transition_kinds():
    for decay, kind in [("identity", "identity"), ("none", "identity"), ("fixed", "fixed"), ("scalar", "scalar"),
                        ("data", "scalar"), ("diagonal", "diagonal")]:
        layer = LinearAttention(HIDDEN, HEADS, HEAD_DIM, decay=decay)
        assert layer.decay == kind
        assert (layer.g_proj is not None, layer.gk_proj is not None) == (kind == "scalar", kind == "diagonal")
    x = torch.randn(2, 5, HIDDEN)
    g, g_gamma, gk = LinearAttention(HIDDEN, HEADS, HEAD_DIM, KV_HEADS, decay="diagonal", key_dim=6).log_decays(x)
    assert g is None and g_gamma is None and gk.shape == (2, 5, HEADS, 6) and (gk <= 0).all()


def test_lightning_decays_are_alibi_slopes():
    def alibi(n):  # ALiBi's recursive rule, as TransNormerLLM builds its slopes
        if math.log2(n).is_integer():
            return [2 ** (-8 * (i + 1) / n) for i in range(n)]
        c = 2 ** math.floor(math.log2(n))
        return alibi(c) + alibi(2 * c)[0::2][:n - c]

    for n in (8, 6, 12):
        expected = -torch.tensor(alibi(n), dtype=torch.float64)
        assert rel_err(lightning_log_decay(n, torch.float64), expected) < 1e-15


@pytest.mark.parametrize("options, message", [
    (dict(decay="vector"), r"decay must be one of \['identity', 'fixed', 'scalar', 'diagonal'\] \(or the earlier "
                           r"none=identity / data=scalar\), got 'vector'"),
    (dict(fixed_decays="alibi"), r"fixed_decays must be one of \['retnet', 'lightning'\]"),
    (dict(decay="diagonal", decay_rank=0), "decay_rank must be a positive int"),
    (dict(key_dim=0), "key_dim must be a positive int"),
    (dict(feature_map="based", key_dim=32), r"use a key head dim in 5..21"),
    (dict(num_kv_heads=3), "must be a multiple of num_kv_heads=3"),
])
def test_linear_layer_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        LinearAttention(HIDDEN, HEADS, HEAD_DIM, **options)
    with pytest.raises(ValueError, match="decay_rank"):
        GatedLinearAttention(HIDDEN, HEADS, HEAD_DIM, decay_rank=-1)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["gla", "based", "rebased", "lightning"])
def test_linear_layers_in_bf16_on_gpu_match_the_float64_oracle_without_host_sync(variant):
    """Real widths (head dims 64, Based/ReBased keys 153/136) through the Triton kernels."""
    torch.manual_seed(0)
    hidden, H, Hkv, D = 256, 4, 2, 64
    options = {"based": dict(feature_map="based", key_dim=16, decay="identity"),
               "rebased": dict(feature_map="rebased", key_dim=16, decay="identity"),
               "lightning": dict(decay="fixed", fixed_decays="lightning")}
    layer = (GatedLinearAttention(hidden, H, D, Hkv, conv_size=4) if variant == "gla"
             else LinearAttention(hidden, H, D, Hkv, **options[variant]))
    assert_bf16_gpu_layer_matches_fp64(layer, hidden, [300, 1, 723])
