"""What every wrapped transformers model shares: masks that only the config conveys (sliding
windows, chunks) are refused when they matter, and MoE models keep their routers and their
load-balancing loss, that of the whole sequence under SP."""

import pytest
import torch
import torch.distributed as dist

import lasp
from lasp.integrations.hf.attention import attention_windows
from lasp.parallel import SequenceLayout
from tests.distributed import run_distributed
from tests.integrations.hf_checks import VOCAB, check_sequence_parallel, tiny_model
from tests.utils import rel_err

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
MOE = dict(SMALL, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5)


# ---------------------------------------------------------------------------- windows

def test_attention_windows_from_configs():
    """Which layers each config windows: layer_types, a model-wide sliding_window, or none."""
    from transformers import AutoConfig

    def windows(model_type, **config):
        return attention_windows(AutoConfig.for_model(model_type, num_hidden_layers=4, **config))

    assert windows("llama") == {} and windows("qwen3") == {} and windows("mixtral") == {}
    assert windows("mistral", sliding_window=8) == {i: ("sliding_attention", 8) for i in range(4)}
    assert windows("qwen3_moe", use_sliding_window=True, sliding_window=8) == {
        i: ("sliding_attention", 8) for i in range(4)}
    assert windows("qwen3", use_sliding_window=True, sliding_window=8, max_window_layers=2) == {
        2: ("sliding_attention", 8), 3: ("sliding_attention", 8)}
    assert windows("qwen3", use_sliding_window=True, sliding_window=8, max_window_layers=4) == {}  # all full
    assert windows("qwen2_moe", use_sliding_window=True, sliding_window=8, max_window_layers=4) == {
        0: ("sliding_attention", 8), 2: ("sliding_attention", 8)}
    assert windows("llama", layer_types=["full_attention", "chunked_attention"] * 2, attention_chunk_size=16) == {
        1: ("chunked_attention", 16), 3: ("chunked_attention", 16)}


@pytest.mark.parametrize("model_type,config", [
    ("qwen2_moe", dict(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                       num_experts_per_tok=2, use_sliding_window=True, max_window_layers=2)),  # window in the mask only
    ("mistral", {}),
], ids=["qwen2_moe", "mistral"])
def test_sliding_window_shorter_than_the_sequence_is_refused(model_type, config):
    """A sequence no longer than the window is plain causal attention (the model's own result);
    a longer one raises instead of silently attending beyond the window."""
    torch.manual_seed(0)
    model = tiny_model(model_type, sliding_window=8, **SMALL, **config)
    ids = torch.randint(0, VOCAB, (1, 16))
    expected = model(ids[:, :8]).logits
    lasp.parallelize(model)
    assert rel_err(model(ids[:, :8]).logits, expected) < 1e-10
    with pytest.raises(NotImplementedError, match=r"layer 0 is sliding_attention over 8 tokens.*\(16\)|window 8"):
        model(ids)


# ---------------------------------------------------------------------------- MoE

def qwen3_moe():
    return tiny_model("qwen3_moe", num_experts=4, moe_intermediate_size=16, **MOE)


def qwen2_moe():
    return tiny_model("qwen2_moe", num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                      **MOE)


def mixtral():
    return tiny_model("mixtral", num_local_experts=4, **MOE)


MOE_MODELS = (qwen3_moe, qwen2_moe, mixtral)


@pytest.mark.parametrize("make_model", MOE_MODELS, ids=lambda f: f.__name__)
def test_moe_loss_on_one_rank_is_the_models_own(make_model):
    """W = 1: lasp.causal_lm_loss = transformers' loss with labels (token loss + coef × its
    load-balancing loss, in fp32); without the aux loss it would differ."""
    torch.manual_seed(0)
    model = make_model()
    ids = torch.randint(0, VOCAB, (1, 12))
    own = model(ids, labels=ids)
    lasp.parallelize(model)
    loss = lasp.causal_lm_loss(model, lasp.shard_batch(ids, layout=SequenceLayout(12, 1, 0)))
    assert rel_err(loss, own.loss) < 1e-6
    assert model.config.router_aux_loss_coef * own.aux_loss > 1e-3 * own.loss   # the aux part matters


def _moe_body(rank, W):
    for make_model in MOE_MODELS if W == 2 else (qwen3_moe,):   # (the suite's time: one model at W = 3)
        check_sequence_parallel(rank, W, make_model)
    torch.manual_seed(0)       # the model's own labels path would balance each shard: refused
    model = lasp.parallelize(qwen3_moe(), kind="zigzag")
    batch = lasp.shard_batch(torch.randint(0, VOCAB, (1, 4 * W)), layout=SequenceLayout(4 * W, W, rank, "zigzag"))
    with pytest.raises(ValueError, match="load-balancing loss of this rank's shard.*causal_lm_loss"):
        model(batch.input_ids, labels=batch.shift_labels, shift_labels=batch.shift_labels,
              num_items_in_batch=batch.num_tokens)
    dist.barrier()


@pytest.mark.parametrize("W", [2, 3])
def test_moe_under_sequence_parallelism(W):
    """Qwen3-MoE, Qwen2-MoE, Mixtral (W = 2; Qwen3-MoE at W = 3): loss (with the load-balancing
    loss of the whole sequence) and every gradient at W ranks = W = 1, both layouts, packed and not."""
    run_distributed(_moe_body, W)


def test_hybrid_adapters_refuse_an_older_transformers(monkeypatch):
    """The adapters mirror transformers' module code of the release they were checked with."""
    from lasp.integrations.hf import wrap
    model = tiny_model("minimax", hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                       layer_types=["linear_attention"], num_attention_heads=4, num_key_value_heads=2,
                       num_local_experts=2, num_experts_per_tok=1)
    monkeypatch.setattr(wrap, "TRANSFORMERS_VERSION", "5.17.0")
    with pytest.raises(ValueError, match=r"transformers 5\.17\.0.*transformers>=5\.25"):
        wrap.parallelize_hf(model, lasp.layers.SPContext(1, 0))


def test_position_ids_must_be_the_global_positions():
    """transformers' padding-free packing (positions restarting per document) would mix the
    documents in lasp's linear layers: refused; the layout's own positions are accepted."""
    torch.manual_seed(0)
    model = lasp.parallelize(tiny_model("qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    ids = torch.randint(0, VOCAB, (1, 12))
    expected = model(ids).logits
    assert rel_err(model(ids, position_ids=torch.arange(12)[None]).logits, expected) < 1e-15
    with pytest.raises(ValueError, match="position_ids must be the global positions.*cu_seqlens"):
        model(ids, position_ids=torch.cat([torch.arange(5), torch.arange(7)])[None])
