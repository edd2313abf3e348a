"""Tuning the Triton linear-attention backend on one GPU: launch variants and a profile.

    python benchmarks/tune_triton.py [--profile] [--out DIR]

(a) `triton.testing.do_bench` medians (ms) of forward and forward+backward, bf16, H=16,
    D=128, plain and with a per-token decay g: the defaults at (B, T) = (8, 4096),
    (1, 32768), (1, 131072), then variants at (1, 32768): split dk/dv launch, segment
    length, chunk size, and num_warps of single kernels (`NUM_WARPS`). The g/plain
    column is the decay's cost (target ≤ 1.15).
(b) `--profile`: CUDA time of each kernel in one fwd+bwd at (1, 32768), plain and decay.
Accuracy is the GPU test tier's job (`pytest -m gpu tests`); the benchmark against fla
is benchmarks/kernels.py. Writes tune_triton.json to DIR (default $OUT, else
benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
import triton

import lasp.kernels.triton_linear_attention as tla

H, D = 16, 128
# (name, kernel keyword arguments, NUM_WARPS entries set for plain and decay alike)
VARIANTS = [
    ("default", {}, {}),
    ("split dk/dv", dict(fuse_dkdv=False), {}),
    ("16-chunk segments", dict(segment_chunks=16), {}),
    ("64-chunk segments", dict(segment_chunks=64), {}),
    ("32-token chunks", dict(chunk_size=32), {}),
    ("output 4 warps", {}, dict(output=4)),
    ("output 8 warps", {}, dict(output=8)),
    ("summary 8 warps", {}, dict(summary=8)),
    ("dkdv 16 warps", {}, dict(dkdv=16)),
]


def make_inputs(B, T, decay):
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    g = F.logsigmoid(torch.randn(B, T, H, device="cuda") + 4).requires_grad_() if decay else None
    return q, k, v, g


def time_case(B, T, decay, kernel_kw, warps):
    q, k, v, g = make_inputs(B, T, decay)
    inputs = [x for x in (q, k, v, g) if x is not None]
    d_o = torch.randn_like(v)
    saved = dict(tla.NUM_WARPS)
    tla.NUM_WARPS.update({name: (n, n) for name, n in warps.items()})
    try:
        def fwd():
            return tla.triton_linear_attention(q, k, v, g, D ** -0.5, None, False, None, **kernel_kw)[0]
        with torch.no_grad():
            t_fwd = triton.testing.do_bench(fwd)
        t_fwd_bwd = triton.testing.do_bench(lambda: torch.autograd.grad(fwd(), inputs, d_o))
    finally:
        tla.NUM_WARPS.clear()
        tla.NUM_WARPS.update(saved)
    return t_fwd, t_fwd_bwd


def profile_kernels(B=1, T=32768):
    """Per-kernel CUDA time (µs) of one fwd+bwd, plain and with a decay."""
    from torch.profiler import ProfilerActivity, profile

    table = {}
    for decay in (False, True):
        q, k, v, g = make_inputs(B, T, decay)
        inputs = [x for x in (q, k, v, g) if x is not None]
        d_o = torch.randn_like(v)

        def step():
            o = tla.triton_linear_attention(q, k, v, g, D ** -0.5, None, False, None)[0]
            return torch.autograd.grad(o, inputs, d_o)
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        name = "decay" if decay else "plain"
        print(f"\n(b) {name} B={B} T={T}: CUDA time per fwd+bwd by kernel")
        rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:12]
        table[name] = {e.key[:90]: e.device_time_total / 5 for e in rows}
        for e in rows:
            print(f"  {e.device_time_total / 5:9.1f} us  x{e.count // 5:<3d} {e.key[:90]}")
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true", help="per-kernel CUDA times (b)")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, H=H, D=D, dtype="bf16", rows=[])
    print(f"{meta['device']}  torch {meta['torch']}  triton {meta['triton']}")
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "tune_triton.json")

    cases = [(8, 4096, *VARIANTS[0]), (1, 131072, *VARIANTS[0])] + [(1, 32768, *v) for v in VARIANTS]
    for B, T, name, kernel_kw, warps in cases:
        plain = time_case(B, T, False, kernel_kw, warps)
        gated = time_case(B, T, True, kernel_kw, warps)
        meta["rows"].append(dict(B=B, T=T, variant=name, plain_fwd=plain[0], plain_fwd_bwd=plain[1],
                                 g_fwd=gated[0], g_fwd_bwd=gated[1]))
        print(f"{B}x{T} {name}: plain {plain[1]:.3f} g {gated[1]:.3f} ms fwd+bwd", flush=True)
        with open(path, "w") as f:
            json.dump(meta, f, indent=1)
    if args.profile:
        meta["profile_us"] = profile_kernels()
        with open(path, "w") as f:
            json.dump(meta, f, indent=1)

    print(f"\n(a) median ms, H={H} D={D} bf16 -> {path}")
    print(f"{'B x T':>10} {'variant':18s} {'plain fwd':>9} {'plain f+b':>9} {'g fwd':>9} {'g f+b':>9} {'g/plain':>7}")
    for r in meta["rows"]:
        print(f"{r['B']:>2}x{r['T']:<7} {r['variant']:18s} {r['plain_fwd']:9.3f} {r['plain_fwd_bwd']:9.3f}"
              f" {r['g_fwd']:9.3f} {r['g_fwd_bwd']:9.3f} {r['g_fwd_bwd'] / r['plain_fwd_bwd']:7.2f}")


if __name__ == "__main__":
    main()
