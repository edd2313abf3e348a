"""Linear-Llama on one device: configs, layer patterns, loss, checkpointing, save/load."""

import pytest
import torch
import torch.nn.functional as F

from lasp.batch import next_token_labels
from lasp.layers import LinearAttention, SoftmaxAttention
from lasp.models import LinearLlamaConfig, LinearLlamaForCausalLM, linear_llama_config, parse_layer_pattern
from tests.utils import random_cu_seqlens, rel_err


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return LinearLlamaForCausalLM(linear_llama_config("tiny", **overrides)).double()


def full_loss(model, input_ids, cu_seqlens=None):
    """The reference: whole-sequence logits and cross-entropy, mean over valid targets."""
    labels = next_token_labels(input_ids, cu_seqlens)
    logits = model(input_ids, cu_seqlens=cu_seqlens).logits
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / (labels != -100).sum()


def test_presets():
    cfg = linear_llama_config("linear-llama3-1b")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta, cfg.tie_word_embeddings) == \
        (16, 2048, 32, 8, 64, 8192, 128256, 500000.0, True)
    with torch.device("meta"):
        model = LinearLlamaForCausalLM(linear_llama_config("linear-llama3-1b", layer_pattern="LLLN"))
    kinds = [type(layer.self_attn) for layer in model.model.layers]
    assert kinds == [LinearAttention, LinearAttention, LinearAttention, SoftmaxAttention] * 4
    with pytest.raises(ValueError, match="unknown preset"):
        linear_llama_config("llama-70b")


def test_layer_patterns():
    assert parse_layer_pattern("LLN", 7) == list("LLNLLNL")
    assert parse_layer_pattern("LMN", 4) == list("LMNL")
    with pytest.raises(ValueError, match="unknown layer kind 'X'"):
        LinearLlamaConfig(layer_pattern="LXN")
    with pytest.raises(ValueError, match="non-empty"):
        parse_layer_pattern("", 3)


@pytest.mark.parametrize("overrides", [
    dict(layer_pattern="LLN"),
    dict(layer_pattern="L", linear_decay="data", linear_conv_size=4, linear_feature_map="elu+1"),
    dict(layer_pattern="NL", linear_decay="none", tie_word_embeddings=False, linear_output_gate="sigmoid"),
])
def test_loss_is_chunked_cross_entropy(overrides):
    model = tiny_model(loss_chunk_size=7, **overrides)
    ids = torch.randint(0, 256, (1, 30))
    cu = random_cu_seqlens([11, 4, 15])
    expected = full_loss(model, ids, cu)
    ref_grads = torch.autograd.grad(expected, list(model.parameters()))
    loss = model(ids, cu_seqlens=cu, labels=ids).loss
    assert rel_err(loss, expected) < 1e-13
    for a, b in zip(torch.autograd.grad(loss, list(model.parameters())), ref_grads):
        assert rel_err(a, b) < 1e-12
    assert model(ids, cu_seqlens=cu, labels=ids).logits is None  # no whole-sequence logits


def test_activation_checkpointing_gives_identical_gradients():
    model = tiny_model(layer_pattern="LLN", linear_conv_size=3)
    ids = torch.randint(0, 256, (2, 20))
    grads = torch.autograd.grad(model(ids, labels=ids).loss, list(model.parameters()))
    model.config.activation_checkpointing = True
    loss = model(ids, labels=ids).loss
    for a, b in zip(torch.autograd.grad(loss, list(model.parameters())), grads):
        assert torch.equal(a, b)


def test_tied_embeddings():
    model = tiny_model()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tiny_model(tie_word_embeddings=False).lm_head.weight is not None


def test_save_and_load_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM
    model = tiny_model(layer_pattern="LN", linear_conv_size=4, linear_decay="data")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert type(loaded) is LinearLlamaForCausalLM
    assert loaded.config.to_diff_dict() | {"_name_or_path": ""} == model.config.to_diff_dict() | {"_name_or_path": ""}
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 256, (1, 12))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
