"""Shared memory of the delta rule's Triton kernels on Hopper, without a GPU.

Run as a script (`python tests/kernels/hopper_resources.py D:DECAY:DTYPE ...`, DECAY one
of none, g, gk; DTYPE bfloat16 or float32) it runs the fused delta rule forward and backward on CPU tensors with every
kernel launch replaced by a compile for sm_90 (Triton's own ptxas), and prints one JSON
line per kernel with the shared memory the launch would ask for. A launch over the
limit fails on the GPU with OutOfResources, which the CPU interpreter never shows. It must
run without TRITON_INTERPRET (the interpreter does not compile), so tests spawn it.
"""

from __future__ import annotations

import json
import sys

# Shared memory per block on an H100 / H200 (227 KB): the limit an OutOfResources names.
HOPPER_SHARED_BYTES = 232448

_POINTER_TYPES = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16", "int64": "*i64", "int32": "*i32"}


def _compile_instead_of_launch(record):
    """Replace `JITFunction.run` by a compile for sm_90 that calls `record(name, shared)`."""
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
        record(self.fn.__name__, compiled.metadata.shared)

    JITFunction.run = run


def delta_rule_shared_memory(D: int, decay: str, dtype: str) -> dict[str, int]:
    """Kernel name -> the most shared memory its launches ask for, forward and backward of
    the delta rule at head dim D (K = V = D) with `decay` none, g or gk, inputs in `dtype`
    (bfloat16, float32)."""
    import torch
    import torch.nn.functional as F

    from lasp.kernels.delta.triton import triton_linear_attention

    shared: dict[str, int] = {}
    _compile_instead_of_launch(lambda name, size: shared.__setitem__(name, max(size, shared.get(name, 0))))
    B, T, H = 1, 128, 2
    q, k, v = (torch.randn(B, T, H, D, dtype=getattr(torch, dtype)).requires_grad_() for _ in range(3))
    gate = {"none": None, "g": torch.randn(B, T, H), "gk": torch.randn(B, T, H, D)}[decay]
    gate = None if gate is None else F.logsigmoid(gate).requires_grad_()
    beta = torch.rand(B, T, H).requires_grad_()
    o, _ = triton_linear_attention(q, k, v, gate, beta, scale=D ** -0.5)
    o.float().sum().backward()      # outputs are never computed: only their launches matter
    return shared


if __name__ == "__main__":
    for case in sys.argv[1:]:
        dim, decay, dtype = case.split(":")
        shared = delta_rule_shared_memory(int(dim), decay, dtype)
        print(json.dumps(dict(D=int(dim), decay=decay, dtype=dtype, shared=shared)), flush=True)
