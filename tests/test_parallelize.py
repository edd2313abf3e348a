"""`lasp.parallelize`, `shard_batch` and the loss contract.

The equivalence tests run a model on the whole sequence in one process (the reference)
and the same model, parallelized, on W gloo processes in float64: the sum of the ranks'
losses and the SP-summed gradient of every parameter must match the reference.
"""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import lasp
from lasp.batch import next_token_labels
from lasp.layers import SPContext
from lasp.parallel import SequenceLayout
from tests.distributed import run_distributed
from tests.utils import random_cu_seqlens, rel_err

VOCAB = 128


def hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config)


def linear_llama(**overrides):
    from lasp.models import LinearLlamaForCausalLM, linear_llama_config
    return LinearLlamaForCausalLM(linear_llama_config("tiny", vocab_size=VOCAB, **overrides))


MODELS = {
    "hf-llama": hf_llama,
    "hybrid-LLN": lambda: linear_llama(layer_pattern="LLN", linear_conv_size=4, linear_decay="data"),
    "linear": lambda: linear_llama(layer_pattern="L", linear_conv_size=3, linear_decay="fixed",
                                   tie_word_embeddings=False, activation_checkpointing=True),
}


# ---------------------------------------------------------------------------- data side

def test_labels_are_shifted_before_sharding():
    T, W = 12, 3
    ids = torch.arange(100, 100 + T)[None]
    cu = random_cu_seqlens([5, 7])
    targets = next_token_labels(ids, cu)
    assert targets[0, :4].tolist() == [101, 102, 103, 104] and targets[0, 4] == -100 and targets[0, -1] == -100
    for kind in ("contiguous", "zigzag"):
        parts = [lasp.shard_batch(ids, layout=SequenceLayout(T, W, r, kind), cu_seqlens=cu) for r in range(W)]
        seen = torch.full_like(ids, -1)
        for r, batch in enumerate(parts):
            pos = SequenceLayout(T, W, r, kind).positions()
            assert torch.equal(batch.position_ids[0], pos) and torch.equal(batch.input_ids[0], ids[0, pos])
            seen[0, pos] = batch.shift_labels[0]
            assert batch.num_tokens == T - 2 and batch.cu_seqlens is cu
        assert torch.equal(seen, targets)  # no label lost at a shard boundary


@pytest.mark.parametrize("lengths", [[0, 7, 5], [7, 0, 5], [7, 5, 0], [0, 0, 3, 0, 9, 0]],
                         ids=["leading", "inner", "trailing", "several"])
def test_empty_documents_drop_no_label(lengths):
    ids = torch.arange(100, 112)[None]
    targets = next_token_labels(ids, random_cu_seqlens(lengths))
    nonempty = [n for n in lengths if n]
    assert torch.equal(targets, next_token_labels(ids, random_cu_seqlens(nonempty)))
    # Each document on its own: the next token inside it, nothing at its last token.
    start = 0
    for n in nonempty:
        assert targets[0, start:start + n - 1].tolist() == list(range(101 + start, 100 + start + n))
        assert targets[0, start + n - 1] == -100
        start += n


def test_given_labels_keep_their_ignored_tokens():
    ids = torch.arange(8)[None]
    labels = ids.clone()
    labels[0, :3] = -100                               # e.g. a prompt that is not learned
    batch = lasp.shard_batch(ids, labels, layout=SequenceLayout(8, 1, 0))
    assert batch.shift_labels[0].tolist() == [-100, -100, 3, 4, 5, 6, 7, -100]
    assert batch.num_tokens == 5


def test_sp_size_must_divide_the_sequence():
    with pytest.raises(ValueError, match="multiple of 3"):
        SPContext(3, 0).layout(10)
    with pytest.raises(ValueError, match="multiple of 4"):
        SPContext(2, 1, "zigzag").local_layout(5)
    with pytest.raises(ValueError, match="full 12 tokens"):
        lasp.shard_batch(torch.zeros(1, 10, dtype=torch.long), layout=SequenceLayout(12, 3, 0))


# ---------------------------------------------------------------------------- bad use

def test_unsupported_models_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=16))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel \(model_type 'gpt2'\).*'llama', 'qwen2', 'qwen3'"):
        lasp.parallelize(gpt2)
    with pytest.raises(ValueError, match="does not support Linear"):
        lasp.parallelize(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="kind"):
        lasp.parallelize(MODELS["linear"](), kind="ring")


def test_labels_need_shifting_before_sharding():
    model = MODELS["linear"]()
    model.model.lasp_sp = SPContext(2, 0)
    with pytest.raises(ValueError, match="shift_labels"):
        model(torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
def test_llama_family_on_one_rank(model_type):
    """W = 1 through the lasp attention function: the model's own result, for each family."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=8, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).double()
    ids = torch.randint(0, VOCAB, (1, 16))
    expected = model(ids).logits
    alone = [model(ids[:, :6]).logits, model(ids[:, 6:]).logits]
    lasp.parallelize(model, SequenceLayout(16, 1, 0, "zigzag"))   # two local segments
    assert model.config._attn_implementation == "lasp_sp"
    assert rel_err(model(ids).logits, expected) < 1e-12
    # Documents see only themselves; the second sits at positions 6.. instead of 0.., which RoPE
    # cancels up to the rounding of transformers' fp32 angles.
    packed = model(ids, cu_seqlens=random_cu_seqlens([6, 10])).logits
    assert rel_err(packed, torch.cat(alone, 1)) < 1e-7


# ---------------------------------------------------------------------------- equivalence

def _reference(model, ids, cu):
    """Whole-sequence loss (mean over valid targets) and parameter gradients, one process."""
    labels = next_token_labels(ids, cu)
    logits = model(ids).logits if cu is None else model(ids, cu_seqlens=cu).logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / (labels != -100).sum()
    return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))


def _check_equivalence(rank, W, name, kind, packed, group):
    what = f"{name}, {kind}, W={W}, packed={packed}"
    torch.manual_seed(0)
    model = MODELS[name]().double()
    T = 2 * W * 5
    ids = torch.randint(0, VOCAB, (1, T))
    cu = random_cu_seqlens([7, 1, T - 11, 3]) if packed else None
    ref_loss, ref_grads = _reference(copy.deepcopy(model), ids, cu)

    assert lasp.parallelize(model, group, kind=kind) is model
    batch = lasp.shard_batch(ids, layout=SequenceLayout(T, W, rank, kind), cu_seqlens=cu)
    loss = lasp.causal_lm_loss(model, batch, chunk_size=4)
    loss.backward()
    lasp.sum_gradients(model)
    total = loss.detach().clone()
    dist.all_reduce(total)
    assert rel_err(total, ref_loss) < 1e-10, what
    for (param, p), g in zip(model.named_parameters(), ref_grads):
        assert rel_err(p.grad, g) < 1e-9, f"{what}: gradient of {param}"
    if name != "hf-llama":  # the model's own forward computes the same loss share
        own = model(batch.input_ids, cu_seqlens=cu, shift_labels=batch.shift_labels,
                    num_items_in_batch=batch.num_tokens).loss
        assert rel_err(own, loss) < 1e-12, what


def _equivalence_body(rank, W):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (W,), mesh_dim_names=("sp",))
    for kind, group in (("contiguous", None), ("zigzag", mesh["sp"])):  # default group, or a mesh
        for name in MODELS:
            for packed in (False, True) if name != "hf-llama" else (False,):
                _check_equivalence(rank, W, name, kind, packed, group)


@pytest.mark.parametrize("W", [2, 3])
def test_parallelized_models_match_one_process(W):
    run_distributed(_equivalence_body, W)


def _hf_labels_body(rank, W):
    """transformers would shift `labels` inside each shard: refused on every rank, before any
    collective; with `shift_labels` from shard_batch the model's own loss is the right one."""
    torch.manual_seed(0)
    model = hf_llama().double()
    T = 4 * W
    ids = torch.randint(0, VOCAB, (1, T))
    lasp.parallelize(model, kind="zigzag")
    batch = lasp.shard_batch(ids, layout=SequenceLayout(T, W, rank, "zigzag"))
    for kwargs in (dict(labels=batch.input_ids), dict(labels=batch.input_ids, num_items_in_batch=batch.num_tokens)):
        with pytest.raises(ValueError, match=r"shards.*lasp\.causal_lm_loss"):
            model(input_ids=batch.input_ids, **kwargs)
    with pytest.raises(ValueError, match="causal_lm_loss"):
        model(batch.input_ids, None, None, None, None, batch.input_ids)          # labels given by position
    own = model(input_ids=batch.input_ids, labels=batch.shift_labels, shift_labels=batch.shift_labels,
                num_items_in_batch=batch.num_tokens).loss
    assert rel_err(own, lasp.causal_lm_loss(model, batch)) < 1e-6   # transformers' loss runs in fp32


def test_hf_model_refuses_labels_it_would_shift_inside_a_shard():
    run_distributed(_hf_labels_body, 2)


def test_hf_model_refuses_labels_across_packed_documents():
    torch.manual_seed(0)
    model = lasp.parallelize(hf_llama().double())
    ids = torch.randint(0, VOCAB, (1, 12))
    cu = random_cu_seqlens([5, 7])
    with pytest.raises(ValueError, match="across packed document boundaries.*causal_lm_loss"):
        model(input_ids=ids, labels=ids, cu_seqlens=cu)
    model(input_ids=ids, labels=ids)                  # one rank, one document: transformers' own loss is right


def _unused_parameter_body(rank, W):
    """A parameter only rank 1 uses (an expert no token of rank 0 chose): rank 0 joins the
    all-reduce with zeros instead of skipping it (which would pair the ranks' collectives wrongly)."""
    model = torch.nn.ModuleDict(dict(a=torch.nn.Linear(2, 1), b=torch.nn.Linear(2, 1))).double()
    x = torch.ones(1, 2, dtype=torch.float64)
    used = [model["a"], model["b"]] if rank == 1 else [model["b"]]
    sum(layer(x).sum() for layer in used).backward()
    lasp.sum_gradients(model)
    assert torch.equal(model["a"].weight.grad, torch.ones(1, 2, dtype=torch.float64))
    assert torch.equal(model["b"].weight.grad, torch.full((1, 2), 2.0, dtype=torch.float64))


def test_sum_gradients_with_a_parameter_unused_on_one_rank():
    run_distributed(_unused_parameter_body, 2, timeout=60)
