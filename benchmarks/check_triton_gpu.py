"""GPU check of the Triton linear-attention backend: accuracy, host syncs, speed, tuning.

    python benchmarks/check_triton_gpu.py [--skip-accuracy] [--skip-timing] [--fla]
        [--profile] [--tune plain,g_gamma,g [--tune-shape 1x32768]] [--out FILE.json]

(a) bf16 Triton against the fp32 torch oracle (`chunk_linear_attention`) with initial and
    final states, packed and batched input, plain and scalar decay: relative errors
    ‖a−b‖/‖b‖ of o, the final state and every gradient, PASS when outputs ≤ 3e-3 and
    gradients ≤ 5e-3. The Triton forward and backward run under `no_host_sync`, so a
    host synchronisation fails the check.
(b) `triton.testing.do_bench` medians (ms) of forward and forward+backward at H=16,
    D=128, bf16, plain / fixed decay (g_gamma, no dg) / data-dependent decay (g, with
    dg) at (8,4096), (1,32768), (1,131072). `--fla` adds fla's chunk_simple_gla.
(c) `--profile`: CUDA time of each kernel in one fwd+bwd at B=1, T=32768 per variant.
(d) `--tune`: fwd+bwd of one-change-at-a-time rows against the defaults: each kernel's
    `LAUNCH` row (warps, stages, tile), the span length, the split dk/dv launch.
    Every row's output and gradients are checked against the fp32 oracle, so a launch
    that miscompiles (triton 3.6 on Hopper does, for some gated backward kernels) shows
    as FAIL ('!') instead of as a fast time.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton

from lasp.kernels.common.launch import LAUNCH, Launch
from lasp.kernels.scalar.chunk import chunk_linear_attention
from lasp.kernels.scalar.triton import triton_linear_attention
from lasp.sync import no_host_sync

OUT_TOL, GRAD_TOL = 3e-3, 5e-3


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    if torch.isnan(a).any():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_inputs(B, T, H, K, V, decay, n_states, requires_grad=True, dtype=torch.bfloat16):
    q, k = (torch.randn(B, T, H, K, device="cuda", dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, device="cuda", dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, H, device="cuda") + 2.0) if decay else None
    h0 = None if n_states is None else torch.randn(n_states, H, K, V, device="cuda")
    tensors = [q, k, v, g, h0]
    for x in tensors:
        if x is not None:
            x.requires_grad_(requires_grad)
    return tensors


def check_accuracy(B, T, H, D, decay, lengths) -> bool:
    cu = None if lengths is None else torch.tensor([0, *lengths], device="cuda").cumsum(0).to(torch.int32)
    n = B if cu is None else len(lengths)
    q, k, v, g, h0 = make_inputs(B, T, H, D, D, decay, n)
    inputs = [x for x in (q, k, v, g, h0) if x is not None]
    scale = D ** -0.5
    d_o = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    d_s = torch.randn(n, H, D, D, device="cuda")
    with no_host_sync():
        o, s = triton_linear_attention(q, k, v, g, scale, h0, True, cu)
        got = torch.autograd.grad([o, s], inputs, [d_o, d_s])
    ref_inputs = [x.detach().float().requires_grad_(True) for x in inputs]
    rq, rk, rv = ref_inputs[:3]
    rg = ref_inputs[3] if decay else None
    o_ref, s_ref = chunk_linear_attention(rq, rk, rv, rg, scale=scale, initial_state=ref_inputs[-1],
                                          output_final_state=True, cu_seqlens=cu)
    want = torch.autograd.grad([o_ref, s_ref], ref_inputs, [d_o.float(), d_s])
    names = ["dq", "dk", "dv"] + (["dg"] if decay else []) + ["dh0"]
    errors = {"o": rel_err(o, o_ref), "final": rel_err(s, s_ref)}
    errors.update({name: rel_err(a, b) for name, a, b in zip(names, got, want)})
    ok = all(err <= (OUT_TOL if name in ("o", "final") else GRAD_TOL) for name, err in errors.items())
    shape = f"B={B} T={T} H={H} D={D} {'g' if decay else 'plain'} {'packed' if cu is not None else ''}"
    print(f"{shape:42s} " + " ".join(f"{k}={v:.1e}" for k, v in errors.items())
          + ("  PASS" if ok else "  FAIL"), flush=True)
    return ok


VARIANTS = ("plain", "g_gamma", "g")


def timing_inputs(B, T, variant, H=16, D=128):
    """bf16 inputs of one variant: (q, k, v, g, g_gamma, the leaves that need grads, do)."""
    q, k, v, g, _ = make_inputs(B, T, H, D, D, variant == "g", None)
    g_gamma = -torch.rand(H, device="cuda") * 0.1 - 1e-3 if variant == "g_gamma" else None
    leaves = [x for x in (q, k, v, g) if x is not None]
    return q, k, v, g, g_gamma, leaves, torch.randn_like(v)


def kernel_decay(g, g_gamma, q):
    """The Triton kernels' per-token decay: g, or g_gamma expanded as `linear_attention`
    does (no grad, so the kernels plan without dg)."""
    if g_gamma is None:
        return g
    return g_gamma[None, None, :].expand(*q.shape[:3]).float().contiguous()


def time_variant(B, T, variant, **kernel_kw):
    """Median ms of fwd and fwd+bwd, and the fwd+bwd result (o, *grads) for a check."""
    q, k, v, g, g_gamma, leaves, d_o = timing_inputs(B, T, variant)
    g = kernel_decay(g, g_gamma, q)

    def fwd():
        return triton_linear_attention(q, k, v, g, q.shape[-1] ** -0.5, None, False, None, **kernel_kw)[0]

    def fwd_bwd():
        o = fwd()
        return (o, *torch.autograd.grad(o, leaves, d_o))

    with torch.no_grad():
        t_fwd = triton.testing.do_bench(fwd)
    return t_fwd, triton.testing.do_bench(fwd_bwd), fwd_bwd(), (q, k, v, g, leaves, d_o)


def oracle(inputs):
    """fp32 torch reference (o, *grads) of `time_variant`'s inputs."""
    q, k, v, g, leaves, d_o = inputs
    ref = [x.detach().float().requires_grad_(x.requires_grad) for x in (q, k, v)]
    rg = None if g is None else g.detach().float().requires_grad_(g.requires_grad)
    o = chunk_linear_attention(*ref, rg, scale=q.shape[-1] ** -0.5)[0]
    ref_leaves = [x for x in (*ref, rg) if x is not None and x.requires_grad]
    return (o, *torch.autograd.grad(o, ref_leaves, d_o.float()))


def result_ok(got, want) -> tuple[bool, float]:
    """(within the GPU tolerances, worst relative error) of (o, *grads) against the oracle."""
    errors = [rel_err(a, b) for a, b in zip(got, want)]
    ok = errors[0] <= OUT_TOL and all(e <= GRAD_TOL for e in errors[1:])
    return ok, max(errors)


def time_fla(B, T, variant):
    from fla.ops.simple_gla import chunk_simple_gla

    q, k, v, g, g_gamma, leaves, d_o = timing_inputs(B, T, variant)

    def fwd():
        return chunk_simple_gla(q, k, v, g=g, g_gamma=g_gamma, scale=q.shape[-1] ** -0.5)[0]

    with torch.no_grad():
        t_fwd = triton.testing.do_bench(fwd)
    return t_fwd, triton.testing.do_bench(lambda: torch.autograd.grad(fwd(), leaves, d_o))


def profile_kernels(B=1, T=32768):
    """Per-kernel CUDA time (µs) of one fwd+bwd of each variant."""
    from torch.profiler import ProfilerActivity, profile

    table = {}
    for variant in VARIANTS:
        q, k, v, g, g_gamma, leaves, d_o = timing_inputs(B, T, variant)
        g = kernel_decay(g, g_gamma, q)

        def step():
            o = triton_linear_attention(q, k, v, g, q.shape[-1] ** -0.5, None, False, None)[0]
            return torch.autograd.grad(o, leaves, d_o)
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(f"\n(c) {variant} B={B} T={T}: CUDA time per fwd+bwd by kernel")
        rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
        table[variant] = {}
        for e in rows[:10]:
            if e.device_time_total > 0:
                table[variant][e.key[:90]] = e.device_time_total / 5
                print(f"  {e.device_time_total / 5:9.1f} us  x{e.count // 5:<3d} {e.key[:90]}")
    return table


def tune_rows():
    """(label, LAUNCH overrides, kernel kwargs): each row changes one kernel's launch
    (or the span length) from the defaults."""
    rows = [("warm-up (default)", {}, {}), ("default", {}, {})]
    for kernel, launches in {
        "scalar.summary": [(4, 3, 64), (4, 2, 128), (8, 2, 128)],
        "scalar.output": [(4, 3, 64), (8, 2, 64)],
        "scalar.dq": [(8, 2, 64), (4, 1, 64), (4, 3, 64), (4, 2, 32)],
        "scalar.dkdv": [(8, 1, 64), (4, 1, 64)],
        "scalar.dkdv_dg": [(8, 2, 64)],
        "scan": [(4, 3, 256)],
    }.items():
        for warps, stages, block in launches:
            rows.append((f"{kernel} w{warps} s{stages} b{block}", {kernel: Launch(warps, stages, block)}, {}))
    rows += [(f"span_chunks={n}", {}, dict(span_chunks=n)) for n in (32, 128)]
    rows.append(("split dk/dv", {}, dict(fuse_dkdv=False)))
    return rows


def tune(B, T, variants):
    """fwd+bwd median of each `tune_rows` row and variant, each result checked against
    the fp32 oracle (a launch that miscompiles shows as FAIL)."""
    defaults = dict(LAUNCH)
    results = []
    print(f"\n(d) tuning B={B} T={T}: fwd+bwd ms (worst rel err)")
    print(f"{'row':31s} " + " ".join(f"{v:>18}" for v in variants))
    want = {}
    for label, launch, kernel_kw in tune_rows():
        LAUNCH.update(launch)
        line = f"{label:31s} "
        for variant in variants:
            torch.manual_seed(1)
            try:
                _, ms, got, inputs = time_variant(B, T, variant, **kernel_kw)
            except triton.runtime.errors.OutOfResources as err:
                results.append(dict(row=label, variant=variant, B=B, T=T, error=str(err)))
                line += f" {'out of resources':>18}"
                continue
            if variant not in want:
                want[variant] = oracle(inputs)
            ok, err = result_ok(got, want[variant])
            results.append(dict(row=label, variant=variant, B=B, T=T, fwd_bwd_ms=ms, max_rel_err=err, ok=ok))
            line += f" {ms:8.3f} ({err:.1e}){'' if ok else '!'}"
            del got, inputs
        LAUNCH.clear()
        LAUNCH.update(defaults)
        print(line, flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--fla", action="store_true", help="also time fla's chunk_simple_gla")
    parser.add_argument("--profile", action="store_true", help="per-kernel CUDA times (c)")
    parser.add_argument("--tune", default="", help="(d) for these variants, e.g. plain,g_gamma")
    parser.add_argument("--tune-shape", default="1x32768", help="BxT of the tuning rows")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    torch.manual_seed(0)
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)

    ok = True
    if not args.skip_accuracy:
        print("\n(a) bf16 triton vs fp32 oracle, initial + final states, no host sync")
        for decay in (False, True):
            ok &= check_accuracy(1, 4096, 4, 128, decay, [1000, 1, 2047, 1048])
            ok &= check_accuracy(1, 4096, 16, 64, decay, [3000, 63, 1033])
            ok &= check_accuracy(2, 2048, 16, 128, decay, None)
            ok &= check_accuracy(2, 2048, 8, 64, decay, None)
        print("ACCURACY:", "PASS" if ok else "FAIL")
        report["accuracy_pass"] = bool(ok)

    if not args.skip_timing:
        print("\n(b) median ms, H=16 D=128 bf16, fwd / fwd+bwd" + (" (fla: fwd+bwd)" if args.fla else ""))
        print(f"{'B':>2} {'T':>7} " + " ".join(f"{v + ' fwd':>11} {v + ' f+b':>11}" for v in VARIANTS))
        report["timing"] = []
        for B, T in ((8, 4096), (1, 32768), (1, 131072)):
            line = f"{B:>2} {T:>7} "
            for variant in VARIANTS:
                t_fwd, t_fb, *_ = time_variant(B, T, variant)
                report["timing"].append(dict(B=B, T=T, variant=variant, fwd_ms=t_fwd, fwd_bwd_ms=t_fb))
                line += f" {t_fwd:11.3f} {t_fb:11.3f}"
            if args.fla:
                for variant in ("plain", "g_gamma"):
                    t_fwd, t_fb = time_fla(B, T, variant)
                    report["timing"].append(dict(B=B, T=T, variant="fla " + variant, fwd_ms=t_fwd, fwd_bwd_ms=t_fb))
                    line += f"  fla {variant} {t_fb:.3f}"
            print(line, flush=True)
    if args.profile:
        report["profile_us"] = profile_kernels()
    if args.tune:
        B, T = (int(x) for x in args.tune_shape.split("x"))
        report["tune"] = tune(B, T, args.tune.split(","))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
