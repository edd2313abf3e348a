"""Long-sequence memory options of Linear-Llama: activation offload to host memory and
tiled norms, MLP and linear-attention output path give the same loss and gradients; their config and lasp-train checks."""

import pytest
import torch

import lasp.models.linear_llama as linear_llama
from lasp.launch.config import load_config, validate
from lasp.layers import LinearAttention
from lasp.layers.mlp import token_tiles
from lasp.models import LinearLlamaForCausalLM, linear_llama_config
from tests.utils import random_cu_seqlens

T = 24


def loss_and_grads(seed=0, tokens_seen=None, **overrides):
    """Loss and gradients of the tiny model on two packed documents; `tokens_seen` collects
    the number of tokens each MLP, norm and linear-attention output projection call gets."""
    torch.manual_seed(seed)
    model = LinearLlamaForCausalLM(linear_llama_config("tiny", **overrides)).double()
    if tokens_seen is not None:
        for name, module in model.named_modules():
            tiled = [module.o_proj] if isinstance(module, LinearAttention) else []
            if name.endswith(("mlp", "layernorm")) or name == "model.norm":
                tiled.append(module)
            for part in tiled:
                part.register_forward_pre_hook(lambda _, args: tokens_seen.append(args[0].shape[1]))
    ids = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(1))
    loss = model(ids, cu_seqlens=random_cu_seqlens([10, 14]), labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def assert_same(result, reference, tol):
    (loss, grads), (ref_loss, ref_grads) = result, reference
    assert (loss - ref_loss).abs() <= tol * ref_loss.abs()
    for name, grad in ref_grads.items():
        assert (grads[name] - grad).abs().max() <= tol * grad.abs().max(), name


@pytest.fixture
def recorded_offloads(monkeypatch):
    """Offload every saved tensor (tiny shapes are under the real size floor) and record the
    shapes that went to the host."""
    shapes = []

    class RecordingOffload(linear_llama.HostOffload):
        def __init__(self):
            super().__init__()
            pack = self.pack_hook

            def recording_pack(tensor):
                packed = pack(tensor)
                if packed is not tensor:
                    shapes.append(tuple(tensor.shape))
                return packed
            self.pack_hook = recording_pack
    monkeypatch.setattr(linear_llama, "OFFLOAD_MIN_BYTES", 0)
    monkeypatch.setattr(linear_llama, "HostOffload", RecordingOffload)
    return shapes


def test_offload_gives_the_same_loss_and_gradients_and_offloads_only_outside_the_blocks(recorded_offloads):
    reference = loss_and_grads(activation_checkpointing=True)
    assert not recorded_offloads
    assert_same(loss_and_grads(activation_checkpointing=True, offload_activations=True), reference, 0.0)
    config = linear_llama_config("tiny")
    block_input = (1, T, config.hidden_size)
    # every block's input went to the host; nothing from inside a block (the MLP's [T, intermediate]
    # tensors, the attention's heads) and no parameter (the loss chunks' lm_head weight)
    assert recorded_offloads.count(block_input) >= config.num_hidden_layers
    assert all(shape[-1] != config.intermediate_size and len(shape) < 4 for shape in recorded_offloads)
    assert (config.vocab_size, config.hidden_size) not in recorded_offloads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_norms_mlp_and_attention_output_give_the_same_loss_and_gradients(checkpointing):
    """Tiles of 7 tokens (the last one shorter) over two packed documents."""
    reference = loss_and_grads(activation_checkpointing=checkpointing)
    tokens_seen = []
    tiled = loss_and_grads(activation_checkpointing=checkpointing, tile_tokens=7, tokens_seen=tokens_seen)
    assert_same(tiled, reference, 1e-12)
    # 3 blocks × (2 norms + MLP), the final norm, and the linear layers' output path
    assert max(tokens_seen) == 7 and sum(tokens_seen) >= (3 * 3 + 1 + 1) * T
    if checkpointing:
        both = loss_and_grads(activation_checkpointing=True, offload_activations=True, tile_tokens=7)
        assert_same(both, reference, 1e-12)


def test_token_tiles_match_the_whole_sequence_with_and_without_autograd():
    x = torch.randn(2, 10, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)

    def fn(part):
        return torch.tanh(part @ weight)
    whole = fn(x)
    tiled = token_tiles(fn, x, 4)
    assert torch.equal(tiled, whole)
    dy = torch.randn_like(whole)
    assert all(torch.allclose(a, b, rtol=1e-13, atol=0)
               for a, b in zip(torch.autograd.grad(tiled, (x, weight), dy), torch.autograd.grad(whole, (x, weight), dy)))
    with torch.no_grad():
        assert torch.equal(token_tiles(fn, x, 3), whole)


def test_config_checks_the_memory_options():
    with pytest.raises(ValueError, match="offload_activations=True needs activation_checkpointing=True"):
        linear_llama_config("tiny", offload_activations=True)
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="tile_tokens must be an int >= 0"):
            linear_llama_config("tiny", tile_tokens=bad)
    for bad in (-1, True, 1.5, 99):
        with pytest.raises(ValueError, match="activation_checkpointing_blocks must be None"):
            linear_llama_config("tiny", activation_checkpointing_blocks=bad)
    with pytest.raises(ValueError, match="offload_activations=True needs every block checkpointed"):
        linear_llama_config("tiny", activation_checkpointing=True, offload_activations=True,
                            activation_checkpointing_blocks=1)


def test_lasp_train_options(tmp_path):
    config = load_config(["--model", "linear-llama3-1b", "--activation-checkpointing", "--offload-activations",
                          "--tile-tokens", "16384", "--output-dir", str(tmp_path)])
    assert (config.model.offload_activations, config.model.tile_tokens) == (True, 16384)
    with pytest.raises(ValueError, match="--offload-activations needs --activation-checkpointing"):
        validate(load_config(["--offload-activations", "--output-dir", str(tmp_path)]), None)
    with pytest.raises(ValueError, match="--tile-tokens must be >= 0"):
        validate(load_config(["--tile-tokens", "-1", "--output-dir", str(tmp_path)]), None)
    with pytest.raises(ValueError, match="--activation-checkpointing-blocks must be >= 0"):
        validate(load_config(["--activation-checkpointing-blocks", "-1", "--output-dir", str(tmp_path)]), None)
    with pytest.raises(ValueError, match="--offload-activations needs every block checkpointed"):
        validate(load_config(["--activation-checkpointing", "--offload-activations", "--activation-checkpointing-blocks",
                              "2", "--output-dir", str(tmp_path)]), None)
