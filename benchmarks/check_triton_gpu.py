"""GPU check of the Triton linear-attention backend: accuracy, host syncs, and speed.

    python benchmarks/check_triton_gpu.py [--skip-accuracy] [--skip-timing] [--fla] [--profile]

(a) bf16 Triton against the fp32 torch oracle (`chunk_linear_attention`) with initial and
    final states, packed and batched input, plain and scalar decay: relative errors
    ‖a−b‖/‖b‖ of o, the final state and every gradient, PASS when outputs ≤ 3e-3 and
    gradients ≤ 5e-3. The Triton forward and backward run with
    `torch.cuda.set_sync_debug_mode("error")`, so a host synchronisation fails the check.
(b) `triton.testing.do_bench` medians (ms) of forward and forward+backward at
    H=16, D=128, bf16, plain and decay, plus tuning variants at B=1, T=32768: fused or
    split dk/dv launch (default at D=128: fused) and segment
    length. `--fla` also times fla's chunk_simple_gla if installed.
(c) `--profile`: CUDA time of each kernel in one fwd+bwd at B=1, T=32768, plain and decay
    (torch.profiler), to see where the decay variant's extra time goes.
Runs in well under three minutes on one H100 (most of it is Triton compilation).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton

from lasp.kernels.reference import chunk_linear_attention
from lasp.kernels.triton_linear_attention import triton_linear_attention
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


def time_case(B, T, H, D, decay, **kernel_kw):
    q, k, v, g, _ = make_inputs(B, T, H, D, D, decay, None)
    inputs = [x for x in (q, k, v, g) if x is not None]
    scale = D ** -0.5
    d_o = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)

    def fwd():
        return triton_linear_attention(q, k, v, g, scale, None, False, None, **kernel_kw)[0]

    def fwd_bwd():
        return torch.autograd.grad(fwd(), inputs, d_o)

    with torch.no_grad():
        t_fwd = triton.testing.do_bench(fwd)
    return t_fwd, triton.testing.do_bench(fwd_bwd)


def time_fla(B, T, H, D, decay):
    from fla.ops.simple_gla import chunk_simple_gla

    q, k, v, g, _ = make_inputs(B, T, H, D, D, decay, None)
    inputs = [x for x in (q, k, v, g) if x is not None]
    d_o = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)

    def fwd():
        return chunk_simple_gla(q, k, v, g=g, scale=D ** -0.5)[0]

    with torch.no_grad():
        t_fwd = triton.testing.do_bench(fwd)
    return t_fwd, triton.testing.do_bench(lambda: torch.autograd.grad(fwd(), inputs, d_o))


def profile_kernels(B=1, T=32768, H=16, D=128):
    """Per-kernel CUDA time (µs) of one fwd+bwd, plain and with a decay."""
    from torch.profiler import ProfilerActivity, profile

    for decay in (False, True):
        q, k, v, g, _ = make_inputs(B, T, H, D, D, decay, None)
        inputs = [x for x in (q, k, v, g) if x is not None]
        d_o = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)

        def step():
            o = triton_linear_attention(q, k, v, g, D ** -0.5, None, False, None)[0]
            return torch.autograd.grad(o, inputs, d_o)
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(f"\n(c) {'decay' if decay else 'plain'} B={B} T={T}: CUDA time per fwd+bwd by kernel")
        rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
        for e in rows[:12]:
            print(f"  {e.device_time_total / 5:9.1f} us  x{e.count // 5:<3d} {e.key[:90]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--fla", action="store_true", help="also time fla's chunk_simple_gla")
    parser.add_argument("--profile", action="store_true", help="per-kernel CUDA times (c)")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    torch.manual_seed(0)

    ok = True
    if not args.skip_accuracy:
        print("\n(a) bf16 triton vs fp32 oracle, initial + final states, no host sync")
        for decay in (False, True):
            ok &= check_accuracy(1, 4096, 4, 128, decay, [1000, 1, 2047, 1048])
            ok &= check_accuracy(1, 4096, 16, 64, decay, [3000, 63, 1033])
            ok &= check_accuracy(2, 2048, 16, 128, decay, None)
            ok &= check_accuracy(2, 2048, 8, 64, decay, None)
        print("ACCURACY:", "PASS" if ok else "FAIL")

    if not args.skip_timing:
        print("\n(b) median ms, H=16 D=128 bf16 (fwd / fwd+bwd)")
        rows = [(8, 4096, {}), (1, 32768, {}), (1, 131072, {}),
                (1, 32768, dict(fuse_dkdv=True)), (1, 32768, dict(fuse_dkdv=False)),
                (1, 32768, dict(segment_chunks=8)), (1, 32768, dict(segment_chunks=32))]
        header = ["plain fwd", "plain f+b", "g fwd", "g f+b"] + (["fla g f+b"] if args.fla else [])
        print(f"{'B':>2} {'T':>7} {'variant':22s} " + " ".join(f"{h:>10}" for h in header))
        for B, T, kw in rows:
            plain = time_case(B, T, 16, 128, False, **kw)
            gated = time_case(B, T, 16, 128, True, **kw)
            line = (f"{B:>2} {T:>7} {str(kw or 'default'):22s} {plain[0]:10.3f} {plain[1]:10.3f}"
                    f" {gated[0]:10.3f} {gated[1]:10.3f}")
            if args.fla and not kw:
                line += f" {time_fla(B, T, 16, 128, True)[1]:10.3f}"
            print(line, flush=True)
    if args.profile:
        profile_kernels()
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
