"""Linear-Llama on one device: configs, layer patterns, loss, checkpointing, save/load."""

import functools

import pytest
import torch
import torch.nn.functional as F

from lasp.batch import next_token_labels
from lasp.layers import GatedDeltaNet, GatedLinearAttention, KimiDeltaAttention, LinearAttention, SoftmaxAttention
from lasp.models import (VARIANTS, LinearLlamaConfig, LinearLlamaForCausalLM, linear_llama_config,
                         parse_layer_pattern)
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
    assert parse_layer_pattern("GGN", 4) == list("GGNG")
    assert parse_layer_pattern("DKN", 4) == list("DKND")
    with pytest.raises(ValueError, match="unknown layer kind 'X'"):
        LinearLlamaConfig(layer_pattern="LXN")
    with pytest.raises(ValueError, match="non-empty"):
        parse_layer_pattern("", 3)


DELTA_VARIANTS = {"qwen3-next": GatedDeltaNet, "kimi-linear": KimiDeltaAttention}


@pytest.mark.parametrize("variant", sorted(set(VARIANTS) - set(DELTA_VARIANTS)))
def test_variants_build_their_layers_and_train(variant):
    """Each of the LASP-2 paper's linear-attention models in a hybrid: forward + backward."""
    pattern = "GGN" if variant == "gla" else "LLN"
    model = tiny_model(variant=variant, layer_pattern=pattern)
    attn = model.model.layers[0].self_attn
    assert type(attn) is (GatedLinearAttention if variant == "gla" else LinearAttention)
    expected = {"linear": ("elu+1", "identity", 16), "lightning": ("identity", "fixed", 16),
                "retention": ("identity", "fixed", 16), "gla": ("identity", "diagonal", 8),
                "based": ("based", "identity", 153), "rebased": ("rebased", "identity", 136)}[variant]
    assert (attn.feature_map.name, attn.decay, attn.feature_map.expanded_dim) == expected
    if attn.decay == "fixed":
        assert attn.fixed_decays == ("lightning" if variant == "lightning" else "retnet")
    ids = torch.randint(0, 256, (1, 24))
    loss = model(ids, cu_seqlens=random_cu_seqlens([10, 14]), labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("variant", sorted(DELTA_VARIANTS))
def test_delta_rule_variants_build_their_layers_and_train(variant):
    """Three delta-rule layers per softmax layer, twice as many value heads as query/key
    heads (Qwen3-Next's ratio): forward + backward on packed documents."""
    model = tiny_model(variant=variant, num_hidden_layers=4, delta_num_v_heads=8)
    assert [type(layer.self_attn) for layer in model.model.layers] == [DELTA_VARIANTS[variant]] * 3 + [SoftmaxAttention]
    attn = model.model.layers[0].self_attn
    assert (attn.num_heads, attn.num_v_heads, attn.head_dim, attn.conv.kernel_size) == (4, 8, 16, 4)
    assert ((attn.A_log.exp() >= 1) & (attn.A_log.exp() <= 16)).all()   # the reference models' init
    ids = torch.randint(0, 256, (1, 24))
    loss = model(ids, cu_seqlens=random_cu_seqlens([10, 14]), labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("overrides, message", [
    (dict(variant="gla", layer_pattern="LLN"), "variant 'gla' builds G layers"),
    (dict(layer_pattern="DN", delta_num_v_heads=6), "delta_num_v_heads must be a positive multiple"),
    (dict(layer_pattern="K", kda_decay_rank=0), "kda_decay_rank must be a positive int"),
    (dict(variant="mamba"), "unknown variant 'mamba'"),
    (dict(linear_decay="vector"), "linear_decay must be one of"),
    (dict(linear_fixed_decays="alibi"), "linear_fixed_decays must be one of"),
    (dict(linear_feature_map="based", linear_key_dim=22), r"use a key head dim in 5..21"),
    (dict(layer_pattern="LM", linear_feature_map="rebased", linear_key_dim=8), "Mixture-of-Memories layers"),
    (dict(layer_pattern="M", linear_decay="diagonal"), "Mixture-of-Memories layers"),
])
def test_linear_options_are_checked_with_the_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        linear_llama_config("tiny", **overrides)


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


@pytest.mark.parametrize("blocks, recomputed", [(None, [0, 1, 2, 3]), (3, [0, 1, 2]), (1, [0]), (0, [])])
def test_activation_checkpointing_gives_identical_gradients(blocks, recomputed):
    """Checkpointing every block, or only the first `blocks`, recomputes those alone: the
    same gradients."""
    model = tiny_model(layer_pattern="LLN", num_hidden_layers=4, linear_conv_size=3)
    ids = torch.randint(0, 256, (2, 20))
    grads = torch.autograd.grad(model(ids, labels=ids).loss, list(model.parameters()))
    model.config.activation_checkpointing, model.config.activation_checkpointing_blocks = True, blocks
    loss = model(ids, labels=ids).loss
    calls = []
    for i, layer in enumerate(model.model.layers):  # (a recompute runs no module hooks)
        layer.forward = functools.partial(lambda forward, i, *args: (calls.append(i), forward(*args))[1],
                                          layer.forward, i)
    for a, b in zip(torch.autograd.grad(loss, list(model.parameters())), grads):
        assert torch.equal(a, b)
    assert sorted(calls) == recomputed


def test_tied_embeddings():
    model = tiny_model()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tiny_model(tie_word_embeddings=False).lm_head.weight is not None


@pytest.mark.parametrize("overrides", [
    dict(layer_pattern="LN", linear_conv_size=4, linear_decay="data"),
    dict(layer_pattern="GLN", linear_feature_map="rebased", linear_key_dim=6, linear_decay="diagonal"),
    dict(layer_pattern="DKN", delta_num_v_heads=8),   # A_log and dt_bias are loaded, not drawn again
])
def test_save_and_load_round_trip(tmp_path, overrides):
    from transformers import AutoModelForCausalLM
    model = tiny_model(**overrides)
    with torch.no_grad():  # a trained ReBased affine must survive the round trip
        for name, p in model.named_parameters():
            if name.endswith(("feature_map.gamma", "feature_map.beta")):
                p.normal_()
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
