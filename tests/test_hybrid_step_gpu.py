"""A whole hybrid training step under sequence parallelism, on a GPU, without a host sync.

    python -m pytest tests/test_hybrid_step_gpu.py -q -s     # 2 GPUs: NCCL; one GPU: 2 ranks on it, gloo

Linear-Llama "tiny" with the layer pattern "LNM": a linear-attention layer with data-dependent
decay and a short convolution, a softmax layer (LASP-2H), a Mixture-of-Memories layer (with
the short convolution too). One packed sequence whose documents cross ranks (and an empty
one), zigzag layout, 2 ranks. The step (`shard_batch`, `causal_lm_loss`, backward,
`sum_gradients`, the summed loss; then gradient clipping and an AdamW step) runs inside
`lasp.no_host_sync()`.

Exempt are gloo's own collectives only, when the ranks share a GPU: gloo moves CUDA tensors
through host memory and its worker thread synchronises the copy streams. `lasp.parallel.comm`
exempts each such call for its own duration (every collective of the step goes through it),
and nothing is patched.

Before the strict run, the same step runs with CUDA's sync check set to "warn", and every sync
it reports is listed by its innermost lasp frame (file:line): one GPU run names them all.

Reference: the same model (same weights) on the whole sequence in one process on the same GPU,
fp32 on both sides. Triton computes fp32 dot products in tf32, so the two runs round
differently: the loss must agree to 1e-4 and every parameter gradient to 5e-3 (‖a−b‖/‖b‖);
a wiring error is off by O(1). Rank 0 prints the errors (and writes $OUT/hybrid_step_gpu.json).
"""

import copy
import os
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist

import lasp
from lasp.models import LinearLlamaForCausalLM, linear_llama_config
from lasp.parallel import SequenceLayout, comm
from tests.distributed import report, run_distributed
from tests.utils import random_cu_seqlens, rel_err

W, T, VOCAB = 2, 1024, 256
DOCUMENTS = [300, 1, 0, 500, 200, 23]   # 300..801 crosses both ranks under zigzag (segments of 256); one empty
LOSS_TOL, GRAD_TOL = 1e-4, 5e-3
LASP_DIR = os.path.dirname(os.path.abspath(lasp.__file__))


def _model():
    torch.manual_seed(0)
    config = linear_llama_config("tiny", vocab_size=VOCAB, layer_pattern="LNM", linear_decay="data",
                                 linear_conv_size=4)
    return LinearLlamaForCausalLM(config).cuda()


def _reference_step(model, ids, cu):
    """The whole sequence in this process alone: the loss, and the gradients in `.grad`."""
    loss = lasp.causal_lm_loss(model, lasp.shard_batch(ids, layout=SequenceLayout(T, 1, 0), cu_seqlens=cu))
    loss.backward()
    return loss.detach()


def _step(model, ids, cu, layout):
    """Forward, backward and the SP gradient sum; returns the loss summed over the ranks."""
    batch = lasp.shard_batch(ids, layout=layout, cu_seqlens=cu)
    loss = lasp.causal_lm_loss(model, batch)
    loss.backward()
    lasp.sum_gradients(model)
    return comm.sum_tensor(loss.detach())


def _lasp_frame(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frame in the lasp package (else the innermost frame), as path:line."""
    inside = [f for f in stack if os.path.abspath(f.filename).startswith(LASP_DIR + os.sep)]
    frame = (inside or stack)[-1]
    return f"{os.path.relpath(frame.filename, os.path.dirname(LASP_DIR))}:{frame.lineno}"


def _syncs_reported(run) -> list[str]:
    """Run `run()` with CUDA's sync check on "warn"; the lasp file:line of every sync it reports."""
    found = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            found.append(_lasp_frame(traceback.extract_stack()[:-1]))

    torch.cuda.synchronize()
    # The backward in this thread, so that its warnings come with their Python frames.
    with warnings.catch_warnings(), torch.autograd.set_multithreading_enabled(False):
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sorted(set(found))


def _body(rank, world_size):
    model = _model()
    reference = copy.deepcopy(model)
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, T), device="cuda", generator=g)
    cu = random_cu_seqlens(DOCUMENTS, "cuda")
    want_loss = _reference_step(reference, ids, cu)

    lasp.parallelize(model, None, kind="zigzag")
    layout = SequenceLayout(T, world_size, rank, "zigzag")
    _step(model, ids, cu, layout)                 # warm-up: compilation and autotuning may synchronise
    model.zero_grad(set_to_none=True)
    syncs = _syncs_reported(lambda: _step(model, ids, cu, layout))
    assert not syncs, f"rank {rank}: host syncs in the SP step (innermost lasp frame): {syncs}"
    model.zero_grad(set_to_none=True)
    with lasp.no_host_sync():
        loss = _step(model, ids, cu, layout)

    rows = [{"name": "loss", "rel_err": rel_err(loss, want_loss)}]
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        rows.append({"name": f"grad {name}", "rel_err": rel_err(p.grad, p_ref.grad)})
    if rank == 0:
        report("hybrid_step_gpu", rows)
    bad = [r for r in rows if r["rel_err"] > (LOSS_TOL if r["name"] == "loss" else GRAD_TOL)]
    assert not bad, f"rank {rank}: {bad}"

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with lasp.no_host_sync():                    # the rest of lasp-train's step
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    dist.barrier()


@pytest.mark.gpu
def test_hybrid_training_step_is_sync_free_and_matches_one_process():
    run_distributed(_body, W, cuda=True, timeout=900)
