"""Sweep the launch parameters of lasp's Triton kernels on a GPU: one kernel's row of
`lasp.kernels.common.launch.LAUNCH` changed at a time, each change timed per kernel.

    python benchmarks/launch_sweep.py --rows g,gk,delta,g+beta [--shape 1x32768] [--out DIR]
    python benchmarks/launch_sweep.py --rows delta --walks bfloat16 --launch-rows delta.state_bf16

A row of the sweep is a decay of `benchmarks/kernel_speed.py` (lasp-triton, bf16, H=16,
D=128, fwd+bwd): plain, g_gamma, g, gk (the span families) or delta, g+beta, gk+beta (the
delta rule, keys L2-normalised). For each of the row's LAUNCH rows (`CANDIDATES`) every
candidate (warps, stages, block) runs in place of the default: fwd+bwd median ms, the CUDA
µs of the kernel that LAUNCH row sets (torch.profiler) and the largest relative difference
of the output and every gradient to the defaults' (a launch that miscompiles shows as
FAIL; one over the GPU's shared memory as "out of resources"). The defaults run first and
again last, so drift shows. Prints a table per row, best candidate of each kernel marked;
writes launch_sweep.json to DIR (default $OUT, else benchmarks/results/) after every
candidate. Chosen candidates go into LAUNCH by hand, with the run named beside them. The
scalar family's call knobs (span length, split dk/dv launch) are swept by
`benchmarks/check_triton_gpu.py --tune`, against the fp32 oracle.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
from triton.testing import do_bench

# benchmarks/ is on sys.path when run as a script
from kernel_speed import D, H, delta_gate, delta_inputs, kernel_times, methods, override_chunks, span_inputs
from lasp.kernels.common.launch import LAUNCH, Launch
from lasp.kernels.delta import triton as delta_triton

# LAUNCH row -> (the kernel it launches, candidates (warps, stages, block)).
CANDIDATES = {
    "scalar.output": ("_fwd_output_kernel", [(8, 2, 64), (4, 3, 64), (4, 2, 32)]),
    "scalar.dq": ("_bwd_dq_kernel", [(8, 2, 64), (8, 1, 64), (8, 2, 32), (4, 2, 32)]),
    "scalar.dq_dg": ("_bwd_dq_kernel", [(4, 2, 64), (8, 1, 64), (8, 2, 32), (16, 2, 64)]),
    "scalar.dkdv": ("_bwd_dkdv_kernel", [(8, 1, 64), (4, 2, 64)]),
    "scalar.dkdv_dg": ("_bwd_dkdv_kernel", [(8, 2, 64), (4, 1, 64), (16, 1, 64)]),
    "diagonal.summary": ("_summary_kernel", [(4, 2, 64), (4, 3, 128), (8, 2, 128)]),
    "diagonal.output": ("_output_kernel", [(4, 2, 64), (8, 3, 128), (8, 1, 128), (16, 2, 128)]),
    "diagonal.dq": ("_dq_kernel", [(4, 2, 64), (4, 3, 32), (4, 1, 32), (8, 2, 32), (4, 2, 16)]),
    "diagonal.dkdv": ("_dkdv_kernel", [(8, 1, 64), (8, 2, 64), (4, 2, 64), (4, 1, 32)]),
    "delta.inverse": ("_inverse_kernel", [(8, 1, 64), (4, 2, 64)]),
    "delta.wy": ("_wy_kernel", [(8, 1, 64), (4, 2, 64), (4, 1, 32), (8, 1, 32)]),
    "delta.state": ("_state_pass_kernel", [(4, 2, 32), (4, 1, 16), (8, 2, 16)]),
    "delta.state_bf16": ("_state_pass_kernel", [(4, 2, 32), (4, 4, 32), (4, 3, 16), (4, 3, 64), (8, 3, 64)]),
    "delta.output": ("_output_kernel", [(8, 2, 64), (4, 3, 64), (4, 2, 32)]),
    "delta.output_grad": ("_output_grad_kernel", [(8, 2, 64), (4, 2, 32)]),
    "delta.state_grad": ("_state_pass_grad_kernel", [(4, 2, 32), (4, 3, 16), (8, 2, 32)]),
    "delta.state_grad_bf16": ("_state_pass_grad_kernel", [(4, 3, 32), (4, 2, 16), (4, 2, 64), (8, 2, 64)]),
    "delta.key_grad": ("_key_grad_kernel", [(8, 2, 64), (4, 3, 64), (4, 1, 64), (4, 2, 32)]),
    "delta.wy_grad": ("_wy_grad_kernel", [(8, 2, 64), (4, 3, 64), (4, 1, 64), (4, 2, 32)]),
    "delta.state_grad_per_key": ("_state_pass_grad_kernel", [(4, 1, 32), (8, 1, 16)]),
    "delta.state_grad_per_key_bf16": ("_state_pass_grad_kernel", [(4, 3, 32), (4, 2, 16)]),
    "delta.key_grad_per_key": ("_key_grad_kernel", [(4, 2, 32), (8, 1, 32), (8, 2, 16)]),
    "delta.wy_grad_per_key": ("_wy_grad_kernel", [(4, 2, 16), (8, 1, 16), (8, 2, 32)]),
}

# Sweep row -> the LAUNCH rows its kernels read.
SPAN_ROWS = {"plain": ["scalar.output", "scalar.dq", "scalar.dkdv"],
             "g_gamma": ["scalar.output", "scalar.dq", "scalar.dkdv"],
             "g": ["scalar.output", "scalar.dq_dg", "scalar.dkdv_dg"],
             "gk": ["diagonal.summary", "diagonal.output", "diagonal.dq", "diagonal.dkdv"]}


def delta_launch_rows(decay: str, walks: str) -> list[str]:
    """The LAUNCH rows of the delta rule's kernels for `decay` and walk operands `walks`."""
    walk = "" if walks == "float32" else "_bf16"
    per_key = "_per_key" if decay == "gk+beta" else ""
    return ["delta.inverse", "delta.wy", f"delta.state{walk}", "delta.output", "delta.output_grad",
            f"delta.state_grad{per_key}{walk}", f"delta.key_grad{per_key}", f"delta.wy_grad{per_key}"]


def make_case(decay: str, B: int, T: int, walks: str):
    """(step() -> [output, *gradients], the LAUNCH rows to sweep) for one sweep row, on
    `benchmarks/kernel_speed.py`'s inputs."""
    if decay in SPAN_ROWS:
        (q, k, v, g, gg, gk), do = span_inputs(B, T)
        gate = {"plain": None, "g_gamma": None, "g": g, "gk": gk}[decay]
        leaves = [q, k, v] + ([] if gate is None else [gate])
        _, fn = methods()[f"lasp-triton {decay}"]

        def run():
            return fn(q, k, v, g, gg, gk)
        rows = SPAN_ROWS[decay]
    else:
        (q, k, v, beta, g, gk), do = delta_inputs(B, T)
        gate = delta_gate(decay, g, gk)
        leaves = [q, k, v, beta] + ([] if gate is None else [gate])

        def run():
            return delta_triton.triton_linear_attention(q, k, v, gate, beta, scale=D ** -0.5,
                                                        walk_operands=walks)[0]
        rows = delta_launch_rows(decay, walks)

    def step():
        o = run()
        return [o, *torch.autograd.grad(o, leaves, do)]
    return step, rows


def largest_difference(got, want) -> float:
    """Largest over tensors of max |got − want| / max |want|."""
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
               for a, b in zip(got, want))


def measure(step, kernel: str | None, reference):
    """dict(ms, kernel_us, difference) of one launch configuration."""
    result = step()
    torch.cuda.synchronize()
    difference = 0.0 if reference is None else largest_difference(result, reference)
    ms = do_bench(step, warmup=5, rep=40, return_mode="median")
    per_kernel = kernel_times(step)
    kernel_us = None if kernel is None else sum(us for name, us in per_kernel.items() if name == kernel)
    return dict(ms=ms, kernel_us=kernel_us, difference=difference), result


def sweep(decay, B, T, walks, limit, only, records, save):
    """Time every candidate of every LAUNCH row of `decay` (those in `only` when given),
    one change at a time."""
    step, rows = make_case(decay, B, T, walks)
    rows = [row for row in rows if not only or row in only]
    default, reference = measure(step, None, None)
    walk_note = "" if decay in SPAN_ROWS else f", {walks} walk operands"
    print(f"\n{decay} B={B} T={T}{walk_note}: defaults {default['ms']:.3f} ms", flush=True)
    print(f"{'LAUNCH row':30s} {'w,s,b':>9s} {'kernel us':>10s} {'fwd+bwd ms':>11s} {'diff':>8s}")
    for row in rows:
        kernel, candidates = CANDIDATES[row]
        saved = LAUNCH[row]
        lines = []
        for config in [(saved.num_warps, saved.num_stages, saved.block), *candidates]:
            LAUNCH[row] = Launch(*config)
            try:
                result, _ = measure(step, kernel, reference)
                status = "ok" if result["difference"] <= limit else "FAIL"
            except triton.runtime.errors.OutOfResources:
                result, status = dict(ms=None, kernel_us=None, difference=None), "out of resources"
                torch.cuda.empty_cache()
            records.append(dict(decay=decay, B=B, T=T, walks=walks, row=row, kernel=kernel,
                                launch=list(config), default=config == (saved.num_warps, saved.num_stages, saved.block),
                                status=status, **result))
            save()
            lines.append((config, result, status))
        LAUNCH[row] = saved
        ok = [r["kernel_us"] for _, r, s in lines if s == "ok"]
        for config, result, status in lines:
            if status != "ok":
                print(f"{row:30s} {','.join(map(str, config)):>9s} {status:>31s}", flush=True)
                continue
            mark = " best" if result["kernel_us"] == min(ok) else ""
            print(f"{row:30s} {','.join(map(str, config)):>9s} {result['kernel_us']:10.1f} {result['ms']:11.3f} "
                  f"{result['difference']:8.1e}{mark}", flush=True)
    again, _ = measure(step, None, reference)
    print(f"{decay}: defaults again {again['ms']:.3f} ms (first {default['ms']:.3f})", flush=True)
    records.append(dict(decay=decay, B=B, T=T, walks=walks, row="defaults", first_ms=default["ms"],
                        last_ms=again["ms"], difference=again["difference"]))
    save()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="g,gk", help="comma-separated: plain, g_gamma, g, gk, delta, g+beta, gk+beta")
    parser.add_argument("--shape", default="1x32768", help="BxT")
    parser.add_argument("--walks", default=delta_triton.WALK_OPERANDS, choices=sorted(delta_triton.WALK_OPERAND_DTYPES),
                        help="the delta rule's walk operands")
    parser.add_argument("--limit", type=float, default=2e-2,
                        help="largest relative difference to the defaults' results still counted as correct")
    parser.add_argument("--launch-rows", default="",
                        help="comma-separated LAUNCH rows to sweep (default: all of each row's)")
    parser.add_argument("--chunk", default="", help="FAMILY_CHUNK overrides for the whole sweep, e.g. diagonal=64")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()
    decays = args.rows.split(",")
    unknown = [d for d in decays if d not in SPAN_ROWS and d not in ("delta", "g+beta", "gk+beta")]
    if unknown:
        raise ValueError(f"--rows: unknown {unknown}; use plain, g_gamma, g, gk, delta, g+beta, gk+beta")
    override_chunks(args.chunk)
    B, T = (int(x) for x in args.shape.split("x"))
    records = []
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                H=H, D=D, dtype="bf16", chunk_overrides=args.chunk or None, records=records)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "launch_sweep.json")

    def save():
        with open(path, "w") as f:
            json.dump(meta, f, indent=1)
    for decay in decays:
        sweep(decay, B, T, args.walks, args.limit, set(filter(None, args.launch_rows.split(","))), records, save)
    print(f"\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']} -> {path}")


if __name__ == "__main__":
    main()
