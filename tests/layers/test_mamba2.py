"""The Mamba-2 layer against a token-by-token recurrence of its own parameters (no kernel),
packed documents, sequence parallelism, bad arguments, and the ``S`` layer kind."""

import math

import pytest
import torch
import torch.nn.functional as F

from lasp.layers import Mamba2, SoftmaxAttention
from lasp.models import LinearLlamaForCausalLM, linear_llama_config
from lasp.parallel import SequenceLayout
from tests.distributed import assert_layer_shards_match, run_distributed
from tests.utils import assert_bf16_gpu_layer_matches_fp64, assert_layer_matches_recurrence, random_cu_seqlens

HIDDEN, HEADS, HEAD_DIM, STATE, GROUPS = 24, 4, 6, 5, 2


def random_layer(seed=0, **options):
    """A float64 layer with every parameter drawn fresh (decays spread over (0, 1))."""
    torch.manual_seed(seed)
    layer = Mamba2(HIDDEN, HEADS, HEAD_DIM, state_size=STATE, n_groups=GROUPS, conv_size=3, **options).double()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name == "A_log":
                p.copy_(torch.randn_like(p) * 0.5 - 0.5)
            elif name == "norm_weight":
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 if p.dim() < 2 else 1 / math.sqrt(p.shape[-1])))
    return layer


def mamba2_by_recurrence(layer, x, lengths):
    """The layer written out token by token, each packed document alone:
    x, B, C = silu(conv(xBC) + bias),  Δ = clamp(softplus(dt + dt_bias)),
    h_t = exp(Δ_t A) h_{t−1} + (Δ_t x_t) B_tᵀ,  y_t = h_t C_t + D x_t  (head h reads group h // (H/G)),
    out = out_proj(weight · groupRMS(y ⊙ silu(z)))."""
    H, P, N, G = layer.num_heads, layer.head_dim, layer.state_size, layer.n_groups
    low, high = layer.time_step_limit
    outs = []
    for doc in x.split(lengths, dim=1):
        batch, T, _ = doc.shape
        z, xBC, dt = (doc @ layer.in_proj.weight.T).split([H * P, H * P + 2 * G * N, H], -1)
        K = layer.conv_weight.shape[1]
        xBC = F.conv1d(F.pad(xBC.transpose(1, 2), (K - 1, 0)), layer.conv_weight[:, None], layer.conv_bias,
                       groups=xBC.shape[-1])
        xs, Bs, Cs = F.silu(xBC.transpose(1, 2)).split([H * P, G * N, G * N], -1)
        xs, Bs, Cs = xs.view(batch, T, H, P), Bs.view(batch, T, G, N), Cs.view(batch, T, G, N)
        delta = F.softplus(dt + layer.dt_bias).clamp(low, high)                        # [batch, T, H]
        A = -layer.A_log.exp()
        group_of = [h * G // H for h in range(H)]
        state = doc.new_zeros(batch, H, P, N)
        ys = []
        for t in range(T):
            B_t, C_t = Bs[:, t, group_of], Cs[:, t, group_of]                        # [batch, H, N]
            state = (delta[:, t] * A).exp()[..., None, None] * state \
                + (delta[:, t, :, None] * xs[:, t])[..., None] * B_t[:, :, None, :]
            ys.append(torch.einsum("bhpn,bhn->bhp", state, C_t) + layer.D[:, None] * xs[:, t])
        y = torch.stack(ys, 1).reshape(batch, T, H * P) * F.silu(z)
        y = y.view(batch, T, G, -1)
        y = (y / (y.pow(2).mean(-1, keepdim=True) + layer.norm_eps).sqrt()).reshape(batch, T, H * P)
        outs.append((y * layer.norm_weight) @ layer.out_proj.weight.T)
    return torch.cat(outs, 1)


@pytest.mark.parametrize("B, lengths, time_step_limit", [(2, [13], (0.0, math.inf)), (1, [9, 1, 12], (0.3, 0.9))])
def test_mamba2_matches_its_recurrence(B, lengths, time_step_limit):
    layer = random_layer(time_step_limit=time_step_limit)
    x = torch.randn(B, sum(lengths), HIDDEN, dtype=torch.float64, requires_grad=True)
    assert_layer_matches_recurrence(layer, x, lengths, mamba2_by_recurrence(layer, x, lengths))

def _sp_body(rank, W):
    lengths = [7, 1, 10, 6]                                       # documents across segment boundaries
    T = sum(lengths)
    for layout_kind in ("contiguous", "zigzag"):
        layer = random_layer(seed=2)
        torch.manual_seed(3)
        x, cot = (torch.randn(1, T, HIDDEN, dtype=torch.float64) for _ in range(2))
        assert_layer_shards_match(layer, x, cot, SequenceLayout(T, W, rank, layout_kind), random_cu_seqlens(lengths),
                                  layout_kind)


def test_mamba2_under_sequence_parallelism_equals_one_process():
    run_distributed(_sp_body, 2)


@pytest.mark.gpu
def test_mamba2_in_bf16_on_gpu_matches_the_float64_layer_without_host_sync():
    """Real widths (Bamba's: state 128, heads 64 wide, 2 groups) through the Triton kernel."""
    torch.manual_seed(0)
    layer = Mamba2(256, 8, 64, state_size=128, n_groups=2, time_step_limit=(0.0, 2.0))
    assert_bf16_gpu_layer_matches_fp64(layer, 256, [300, 1, 723])

def test_mamba2_rejects_bad_arguments():
    for options, argument in [(dict(num_heads=0), "num_heads"), (dict(head_dim=2.5), "head_dim"),
                              (dict(state_size=0), "state_size"), (dict(n_groups=0), "n_groups"),
                              (dict(n_groups=3), "n_groups=3 must divide num_heads=4"),
                              (dict(conv_size=0), "conv_size"), (dict(time_step_limit=(0.5, 0.1)), "time_step_limit"),
                              (dict(time_step_limit=(-1, 1)), "time_step_limit"),
                              (dict(time_step_limit="fast"), "time_step_limit")]:
        arguments = dict(hidden_size=HIDDEN, num_heads=HEADS, head_dim=HEAD_DIM) | options
        with pytest.raises(ValueError, match=argument):
            Mamba2(**arguments)


def test_pattern_letter_S_builds_mamba2_layers_that_train():
    """"SN": a Mamba-2 layer (2 · num_attention_heads heads by default) and a softmax layer,
    forward + backward on packed documents; every parameter gets a gradient."""
    torch.manual_seed(0)
    model = LinearLlamaForCausalLM(linear_llama_config("tiny", layer_pattern="SN", mamba_state_size=16,
                                                       mamba_num_groups=2)).double()
    assert [type(layer.self_attn) for layer in model.model.layers] == [Mamba2, SoftmaxAttention, Mamba2]
    mamba = model.model.layers[0].self_attn
    assert (mamba.num_heads, mamba.head_dim, mamba.state_size, mamba.n_groups, mamba.conv_size) == (8, 16, 16, 2, 4)
    assert ((mamba.A_log.exp() >= 1) & (mamba.A_log.exp() <= 16)).all()   # mamba_ssm's init, not HF's Linear init
    ids = torch.randint(0, 256, (1, 24))
    loss = model(ids, cu_seqlens=random_cu_seqlens([10, 14]), labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("overrides, message", [
    (dict(mamba_num_groups=3), "mamba_num_groups=3 must divide the Mamba-2 heads"),
    (dict(mamba_state_size=0), "mamba_state_size must be a positive int"),
    (dict(mamba_num_heads=0), "mamba_num_heads must be a positive int"),
])
def test_mamba_options_are_checked_with_the_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        linear_llama_config("tiny", layer_pattern="SN", **overrides)
