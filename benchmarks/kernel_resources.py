"""What each Triton kernel of lasp asks of a Hopper GPU, found on any machine, GPU or not:
shared memory per block, registers per thread and the bytes spilled to local memory.

    python benchmarks/kernel_resources.py [--launch=ROW=w,s,b[;...]] FAMILY:D:DECAY:DTYPE ...
    e.g.  delta:128:gk:bfloat16  scalar:128:g:bfloat16  diagonal:256:gk:float32

FAMILY is delta (beta with DECAY none, g or gk), delta-affine (the same in LASP-2's affine run:
`lasp.kernels.delta.chunk`, the values widened to V + K columns at V's chunk size), scalar
(DECAY none, g_gamma or g) or diagonal (DECAY gk); K = V = D. The family's forward and
backward run on CPU tensors with every kernel launch replaced by a compile for sm_90
(Triton's own ptxas; registers and spills from its cuobjdump), so the outputs are never
computed. Prints one JSON line per case:
kernel name -> the largest {shared, registers, spill_bytes} over its launches. A launch
over HOPPER_SHARED_BYTES fails on the GPU with OutOfResources, which the CPU interpreter
never shows; spills are a first lead when a kernel is slow. It must run without
TRITON_INTERPRET (the interpreter compiles nothing). tests/kernels/test_hopper_resources.py
runs it on the delta rule's widest cases.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

# Shared memory per block on an H100 / H200 (227 KB): the limit an OutOfResources names.
HOPPER_SHARED_BYTES = 232448

_POINTER_TYPES = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16", "int64": "*i64", "int32": "*i32"}


def _registers_and_spills(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread) of a cubin, from Triton's cuobjdump."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1))


def _compile_instead_of_launch(record):
    """Replace `JITFunction.run` by a compile for sm_90 that calls `record(name, resources)`."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    def run(self, *args, grid, warmup, **kwargs):
        bound = dict(zip(self.arg_names, args))
        bound.update((k, v) for k, v in kwargs.items() if k in self.arg_names)
        options = {k: v for k, v in kwargs.items() if k not in self.arg_names}
        signature, constants, attrs = {}, {}, {}
        for p in self.params:
            value = bound.get(p.name, p.default)
            if p.is_constexpr:
                signature[p.name], constants[(p.num,)] = "constexpr", value
                continue
            if isinstance(value, torch.Tensor):
                signature[p.name] = _POINTER_TYPES[str(value.dtype).removeprefix("torch.")]
                aligned = value.data_ptr() % 16 == 0
            elif isinstance(value, float):
                signature[p.name], aligned = "fp32", False
            else:
                signature[p.name], aligned = "i32", int(value) % 16 == 0
            if aligned and not p.do_not_specialize:     # as the launcher specialises on the GPU
                attrs[(p.num,)] = [["tt.divisibility", 16]]
        compiled = triton.compile(ASTSource(self, signature, constants, attrs),
                                  target=GPUTarget("cuda", 90, 64), options=options)
        registers, spills = _registers_and_spills(compiled.asm["cubin"])
        record(self.fn.__name__, dict(shared=compiled.metadata.shared, registers=registers, spill_bytes=spills))

    JITFunction.run = run


def _run_family(family: str, D: int, decay: str, dtype: str) -> None:
    """Forward and backward of one family on small CPU inputs (bf16 or fp32, K = V = D)."""
    import torch
    import torch.nn.functional as F

    B, T, H = 1, 128, 2
    q, k, v = (torch.randn(B, T, H, D, dtype=getattr(torch, dtype)).requires_grad_() for _ in range(3))
    gate = {"none": None, "g": torch.randn(B, T, H), "g_gamma": torch.randn(B, T, H), "gk": torch.randn(B, T, H, D)}[decay]
    # g_gamma reaches the kernels as a g that needs no gradient (no dg work).
    gate = None if gate is None else F.logsigmoid(gate).requires_grad_(decay != "g_gamma")
    if family == "delta":
        from lasp.kernels.delta.triton import triton_linear_attention
        o, _ = triton_linear_attention(q, k, v, gate, torch.rand(B, T, H).requires_grad_(), scale=D ** -0.5)
    elif family == "delta-affine":          # LASP-2's affine run: the values widened to V + K columns
        from lasp.kernels.delta.triton import affine_phases
        phases, inputs = affine_phases(q, k, v, gate, torch.rand(B, T, H), scale=D ** -0.5)
        (states, matrices), saved = phases.summarize(*inputs[1:])
        o0, x = phases.output(*inputs, saved)
        partial = phases.output_grad(*inputs, saved, o0, x)
        phases.grad(*inputs, saved, partial, states, matrices)
        return
    elif family in ("scalar", "diagonal"):
        module = __import__(f"lasp.kernels.{family}.triton", fromlist=["triton_linear_attention"])
        o, _ = module.triton_linear_attention(q, k, v, gate, D ** -0.5, None, False, None)
    else:
        raise ValueError(f"family must be delta, delta-affine, scalar or diagonal, got {family!r}")
    o.float().sum().backward()


def kernel_resources(family: str, D: int, decay: str, dtype: str) -> dict[str, dict[str, int]]:
    """Kernel name -> the largest shared memory, registers and spill bytes over its launches."""
    found: dict[str, dict[str, int]] = {}

    def record(name, resources):
        mine = found.setdefault(name, dict.fromkeys(resources, 0))
        for key, value in resources.items():
            mine[key] = max(mine[key], value)
    _compile_instead_of_launch(record)
    _run_family(family, D, decay, dtype)
    return found


if __name__ == "__main__":
    cases = sys.argv[1:]
    if cases and cases[0].startswith("--launch="):         # as benchmarks/kernel_speed.py --launch
        try:                        # the repository root on sys.path (e.g. runpy, as the Hopper check runs it)
            from benchmarks.kernel_speed import override_launches
        except ModuleNotFoundError:     # run as a script: benchmarks/ is sys.path[0]
            from kernel_speed import override_launches
        override_launches(cases.pop(0).removeprefix("--launch="))
    for case in cases:
        family, dim, decay, dtype = case.split(":")
        kernels = kernel_resources(family, int(dim), decay, dtype)
        print(json.dumps(dict(family=family, D=int(dim), decay=decay, dtype=dtype, kernels=kernels)), flush=True)
