"""The one-GPU check of a wrapped transformers family: lasp's Triton kernels against the HF
model's own torch path, in fp32 (Triton's dot products round in tf32, hence the bound).

    python -m pytest tests/integrations -q -s -m gpu      # prints a table per family, JSON in $OUT
"""

from __future__ import annotations

import copy
import json
import os

import torch

import lasp
from tests.integrations.hf_checks import VOCAB
from tests.utils import random_cu_seqlens, rel_err

GPU_TOL = 5e-3


def check_against_transformers_on_gpu(name: str, native, T: int) -> None:
    """`native` (fp32, on the GPU) against its lasp-wrapped copy on T tokens: logits and every
    parameter gradient; and the wrapped model's packed row against each document alone.
    Prints the errors and writes them to $OUT/<name>.json when $OUT is set."""
    ids = torch.randint(0, VOCAB, (1, T), device="cuda")
    cotangent = torch.randn(1, T, VOCAB, device="cuda")
    wrapped = lasp.parallelize(copy.deepcopy(native))
    logits = []
    for model in (wrapped, native):
        logits.append(model(ids).logits)
        (logits[-1] * cotangent).sum().backward()
    errors = {"logits": rel_err(*logits)}
    cu = random_cu_seqlens([T // 3, 1, T - T // 3 - 1], device="cuda")
    with torch.no_grad():
        alone = [wrapped(ids[:, a:b]).logits for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
        errors["packed vs alone"] = rel_err(wrapped(ids, cu_seqlens=cu).logits, torch.cat(alone, 1))
    grads = {param: rel_err(p.grad, ref.grad)
             for (param, p), ref in zip(wrapped.named_parameters(), native.parameters())}
    worst = max(grads, key=grads.get)
    errors[f"gradients (worst: {worst})"] = grads[worst]
    print(f"\n{name} ({torch.cuda.get_device_name()}, fp32, T={T}): ‖lasp − transformers‖/‖transformers‖")
    for what, err in errors.items():
        print(f"  {err:.2e}  {what}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"{name}.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "T": T,
                       "tol": GPU_TOL, "rel_err": errors, "gradients": grads}, f, indent=1)
    assert max(errors.values()) < GPU_TOL, errors
