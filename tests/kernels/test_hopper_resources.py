"""The Triton launches fit a Hopper GPU's shared memory, checked on the CPU by compiling each
launch for sm_90 (`benchmarks/kernel_resources.py`). The cases are the widest: the delta
rule at K = 128 with a per-key decay (bf16 and fp32 inputs: three launches of these failed
on an H100 with OutOfResources on 2026-12-06), at K = 128 fp32 without one, and at K = 256
(wide-head chunks); LASP-2's affine run of the delta rule (its values widened to V + K = 256
columns at the 64-token chunks of V = 128); the scalar family at K = 256 and the per-key one at K = 128 with fp32
inputs (each had a launch over the limit before its fix, found by this check). The delta
rule's bf16 cases run with the default bf16 walk operands (`WALK_OPERANDS`: the walks'
`_bf16` launch rows); bf16 inputs with fp32 walk operands take the fp32 rows with the fp32
cases' operand tiles and narrower input tiles, so the fp32 cases bound them."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks.kernel_resources import HOPPER_SHARED_BYTES

pytest.importorskip("triton")


def test_triton_launches_fit_hopper_shared_memory():
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = os.path.join(repo, "benchmarks", "kernel_resources.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")])     # this checkout's lasp
    cases = [f"delta:{case}" for case in ("128:gk:bfloat16", "128:gk:float32", "128:none:float32",
                                          "256:none:bfloat16", "256:gk:float32")]
    cases += ["delta-affine:128:gk:bfloat16", "delta-affine:128:none:float32"]    # V + K = 256 at 64-token chunks
    cases += ["scalar:256:none:float32", "diagonal:128:gk:float32"]
    run = subprocess.run([sys.executable, script, *cases], env=env, cwd=repo, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(results) == len(cases)
    for case in results:
        kernels = case["kernels"]
        assert len(kernels) == (8 if case["family"].startswith("delta") else 5), case  # forward and backward compiled
        over = {name: r["shared"] for name, r in kernels.items() if r["shared"] > HOPPER_SHARED_BYTES}
        assert not over, f"{case['family']} D={case['D']} {case['decay']} {case['dtype']}: over the limit: {over}"
