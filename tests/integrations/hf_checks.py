"""The checks every wrapped transformers family passes, on tiny random float64 configs.

    def make_model():              # module level (the ranks import it), seeded by the caller
        return tiny_model("minimax", hidden_size=32, ...)
    check_one_rank(make_model)               # W = 1: the HF model's own result; packed = each document alone
    run_distributed(check_sequence_parallel, W, make_model)   # W ranks = W = 1, loss and every gradient

W = 1 is lasp-wrapped on one process: the same model with lasp's kernels, which compute in
the model's dtype, where transformers' linear layers compute in fp32 inside (hence the
looser bound against the native model).
"""

from __future__ import annotations

import copy
import re

import torch
import torch.distributed as dist

import lasp
from lasp.layers import SPContext
from lasp.parallel import SequenceLayout
from tests.utils import random_cu_seqlens, rel_err

VOCAB = 128
NATIVE_TOL = 2e-4     # transformers' fp32-inside linear layers against lasp's float64
PACKED_TOL = 1e-6     # packed against alone: RoPE angles are fp32 in transformers
SP_TOL = 1e-10        # W ranks against one, both lasp in float64
FP32_SUM_TOL = 1e-6   # gradients transformers sums over tokens in fp32 (`fp32_grads`)


def tiny_model(model_type: str, **config):
    """A float64 causal LM of `model_type` from a tiny config (eager MoE experts: the grouped-mm
    path refuses float64)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(model_type, vocab_size=VOCAB, **config)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager") if _has_experts(cfg) \
        else AutoModelForCausalLM.from_config(cfg)
    return model.double()


def _has_experts(config) -> bool:
    return any(getattr(config, name, 0) for name in ("num_experts", "num_local_experts", "n_routed_experts"))


def _documents(T: int) -> torch.Tensor:
    """Documents crossing every shard boundary of a T-token sequence, one of a single token."""
    return random_cu_seqlens([7, 1, T - 11, 3])


def check_one_rank(make_model, T: int = 24) -> None:
    """lasp-wrapped at W = 1 equals the native model (unpacked), and a packed row equals each
    document run alone."""
    torch.manual_seed(0)
    model = make_model()
    ids = torch.randint(0, VOCAB, (1, T))
    native = model(ids).logits
    lasp.parallelize(model)
    assert rel_err(model(ids).logits, native) < NATIVE_TOL
    cu = _documents(T)
    packed = model(ids, cu_seqlens=cu).logits
    alone = torch.cat([model(ids[:, a:b]).logits for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    assert rel_err(packed, alone) < PACKED_TOL


def _loss_and_grads(model, ids, layout, cu):
    batch = lasp.shard_batch(ids, layout=layout, cu_seqlens=cu)
    loss = lasp.causal_lm_loss(model, batch, chunk_size=8)
    loss.backward()
    return loss.detach()


def check_sequence_parallel(rank: int, W: int, make_model, segment_len: int = 5,
                            fp32_grads: str | None = None) -> None:
    """Run on W ranks: both layouts, unpacked and packed with documents crossing ranks; the
    summed loss and every SP-summed parameter gradient equal lasp-wrapped W = 1 (≤ SP_TOL).
    `fp32_grads`: a regex of parameter names whose gradients transformers sums over the
    tokens in fp32 (e.g. a norm that casts its weight to fp32), checked to FP32_SUM_TOL."""
    T = 2 * W * segment_len
    for kind in ("contiguous", "zigzag"):
        for cu in (None, _documents(T)):
            what = f"{kind}, W={W}, packed={cu is not None}"
            torch.manual_seed(0)
            model = make_model()
            ids = torch.randint(0, VOCAB, (1, T))
            reference = lasp.parallelize(copy.deepcopy(model), SPContext(1, 0))
            ref_loss = _loss_and_grads(reference, ids, SequenceLayout(T, 1, 0), cu)

            lasp.parallelize(model, kind=kind)
            loss = _loss_and_grads(model, ids, SequenceLayout(T, W, rank, kind), cu)
            lasp.sum_gradients(model)
            dist.all_reduce(loss)
            assert rel_err(loss, ref_loss) < SP_TOL, what
            for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
                if ref.grad is None:
                    assert p.grad is None or not p.grad.any(), f"{what}: {name} has a gradient only under SP"
                else:
                    tol = FP32_SUM_TOL if fp32_grads and re.search(fp32_grads, name) else SP_TOL
                    assert rel_err(p.grad, ref.grad) < tol, f"{what}: gradient of {name}"
