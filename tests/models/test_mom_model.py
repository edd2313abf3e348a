"""Linear-Llama with Mixture-of-Memories layers (pattern letter ``M``): the load-balancing
loss in the model's loss, a training step, activation checkpointing, save/load."""

import torch
import torch.nn.functional as F

from lasp.batch import next_token_labels
from lasp.layers import MixtureOfMemories
from lasp.models import LinearLlamaForCausalLM, linear_llama_config
from tests.utils import random_cu_seqlens, rel_err


def tiny_mom_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = linear_llama_config("tiny", **{"layer_pattern": "LMN", "mom_num_memories": 3, **overrides})
    return LinearLlamaForCausalLM(config).double()


def test_mom_layers_and_aux_loss_in_the_loss():
    model = tiny_mom_model(num_hidden_layers=4, router_aux_loss_coef=0.3)     # L M N L
    layers = [layer.self_attn for layer in model.model.layers]
    assert [isinstance(layer, MixtureOfMemories) for layer in layers] == [False, True, False, False]
    assert (layers[1].num_memories, layers[1].top_k, layers[1].shared_memory) == (3, 2, True)
    ids = torch.randint(0, 256, (1, 24))
    cu = random_cu_seqlens([10, 14])
    out = model(ids, cu_seqlens=cu, labels=ids)
    # The CE part by hand, and the aux loss as the MoM layer reports it.
    hidden = model.model(ids, cu_seqlens=cu)
    labels = next_token_labels(ids, cu)
    ce = F.cross_entropy(model.lm_head(hidden.last_hidden_state).flatten(0, 1), labels.flatten(),
                         reduction="sum") / (labels != -100).sum()
    assert rel_err(out.aux_loss, hidden.aux_loss) < 1e-14 and out.aux_loss > 0
    assert rel_err(out.loss, ce + 0.3 * out.aux_loss) < 1e-13
    assert model(ids).aux_loss is not None
    assert tiny_mom_model(layer_pattern="LN").model(ids).aux_loss is None


def test_training_step_lowers_the_loss():
    model = tiny_mom_model().float()
    ids = torch.randint(0, 256, (2, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_activation_checkpointing_gives_identical_gradients():
    model = tiny_mom_model(linear_decay="data")
    ids = torch.randint(0, 256, (2, 20))
    grads = torch.autograd.grad(model(ids, labels=ids).loss, list(model.parameters()))
    model.config.activation_checkpointing = True
    loss = model(ids, labels=ids).loss
    for a, b in zip(torch.autograd.grad(loss, list(model.parameters())), grads):
        assert torch.equal(a, b)


def test_save_and_load_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM
    model = tiny_mom_model(mom_top_k=1, mom_shared_memory=False, linear_decay="data")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert loaded.config.mom_top_k == 1 and loaded.config.mom_shared_memory is False
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 256, (1, 12))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_memory_projections_are_initialised_like_linear_layers():
    model = tiny_mom_model(initializer_range=0.5)
    mom = model.model.layers[1].self_attn
    std = mom.k_proj.weight.std().item()
    assert 0.4 < std < 0.6, std                         # HF init (normal, initializer_range), not Kaiming
