"""Single-GPU linear-attention kernels: lasp (Triton, torch) vs fla 0.6.0, fwd and fwd+bwd.

    python benchmarks/kernels.py [--shapes 8x4096,1x32768,1x131072] [--out DIR]

bf16, H=16, D=128. Rows: lasp-triton (plain, g_gamma, g), fla `chunk_linear_attn`
(normalize=False) and `chunk_simple_gla` (g_gamma) when fla-core is importable, and
lasp's torch backend (the oracle; only at the smallest shape, it is slow). fla's gated
backward (`chunk_simple_gla` with per-token g) refuses to run on triton 3.6 / Hopper, so
fla has no g row. Each row checks its forward against lasp-torch in fp32 first (rel err).

Prints medians (ms), million tokens/s, peak memory, the ratio to fla's same variant, and
the memory floor: bytes that must move (read q,k,v, write o; backward: read q,k,v,do,
write dq,dk,dv) ÷ the device-to-device copy bandwidth measured in the same run.
Writes JSON to DIR (default $OUT, else benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from lasp.kernels import linear_attention

H, D = 16, 128


def copy_bandwidth(nbytes=2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def methods():
    """name -> (variant, fn(q, k, v, g, g_gamma) -> o)."""
    rows = {
        "lasp-triton plain": ("plain", lambda q, k, v, g, gg: linear_attention(q, k, v, backend="triton")[0]),
        "lasp-triton g_gamma": ("g_gamma", lambda q, k, v, g, gg: linear_attention(q, k, v, g_gamma=gg, backend="triton")[0]),
        "lasp-triton g": ("g", lambda q, k, v, g, gg: linear_attention(q, k, v, g, backend="triton")[0]),
        "lasp-torch plain": ("plain", lambda q, k, v, g, gg: linear_attention(q, k, v, backend="torch")[0]),
        "lasp-torch g": ("g", lambda q, k, v, g, gg: linear_attention(q, k, v, g, backend="torch")[0]),
    }
    try:
        from fla.ops.linear_attn import chunk_linear_attn
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        print("fla-core not importable: no fla rows")
        return rows
    rows["fla plain"] = ("plain", lambda q, k, v, g, gg: chunk_linear_attn(q, k, v, normalize=False)[0])
    rows["fla g_gamma"] = ("g_gamma", lambda q, k, v, g, gg: chunk_simple_gla(q, k, v, g_gamma=gg)[0])
    return rows


def measure(fn, inputs, do, backward, variant):
    q, k, v, g, gg = inputs
    leaves = [q, k, v] + ([g] if variant == "g" else [])

    def step():
        o = fn(q, k, v, g, gg)
        if backward:
            torch.autograd.grad(o, leaves, do)
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = do_bench(step, warmup=25, rep=100, return_mode="median")
    return ms, peak


def _add_speedups(results):
    """speedup_vs_fla: fla's time for the same variant, shape and mode ÷ this row's."""
    for r in results:
        fla = next((x for x in results if x["method"].startswith("fla") and
                    (x["variant"], x["B"], x["T"], x["mode"]) == (r["variant"], r["B"], r["T"], r["mode"])),
                   None)
        r["speedup_vs_fla"] = fla["ms"] / r["ms"] if fla else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="8x4096,1x32768,1x131072")
    parser.add_argument("--torch-max-tokens", type=int, default=32768,
                        help="skip the slow torch backend above this many tokens")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    bandwidth = copy_bandwidth()
    rows = methods()
    results = []
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), H=H, D=D, dtype="bf16",
                copy_bandwidth_gb_s=bandwidth / 1e9, results=results)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "kernels.json")
    for B, T in shapes:
        gen = torch.Generator(device="cuda").manual_seed(0)

        def rand(*shape):
            return torch.randn(*shape, device="cuda", generator=gen)
        q, k, v = (rand(B, T, H, D).bfloat16().requires_grad_() for _ in range(3))
        g = F.logsigmoid(rand(B, T, H) + 4).requires_grad_()
        gg = F.logsigmoid(torch.linspace(3, 7, H, device="cuda"))
        do = rand(B, T, H, D).bfloat16()
        unit = B * T * H * D * 2                      # one bf16 [B,T,H,D] tensor
        floor_ms = {"fwd": 4 * unit / bandwidth * 1e3, "fwd+bwd": 11 * unit / bandwidth * 1e3}
        refs = {}
        for name, (variant, fn) in rows.items():
            if name.startswith("lasp-torch") and B * T > args.torch_max_tokens:
                continue
            with torch.no_grad():
                if variant not in refs:
                    refs[variant] = linear_attention(
                        q.float(), k.float(), v.float(), g if variant == "g" else None,
                        gg if variant == "g_gamma" else None, backend="torch")[0]
                o = fn(q, k, v, g, gg).float()
                err = ((o - refs[variant]).norm() / refs[variant].norm()).item()
            for mode in ("fwd", "fwd+bwd"):
                ms, peak = measure(fn, (q, k, v, g, gg), do, mode == "fwd+bwd", variant)
                results.append(dict(method=name, variant=variant, B=B, T=T, mode=mode, ms=ms,
                                    mtok_s=B * T / ms / 1e3, peak_gb=peak / 1e9, rel_err=err,
                                    floor_ms=floor_ms[mode]))
                print(f"{name:22s} B={B} T={T:6d} {mode:7s} {ms:8.3f} ms  err={err:.1e}", flush=True)
                _add_speedups(results)
                with open(path, "w") as f:      # after every row: a run cut short keeps its rows
                    json.dump(meta, f, indent=1)
    print(f"\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
          f"copy {bandwidth / 1e9:.0f} GB/s -> {path}")
    print(f"{'method':22s} {'B x T':>10s} {'mode':7s} {'ms':>8s} {'Mtok/s':>7s} {'peakGB':>7s} "
          f"{'x fla':>6s} {'floor':>6s} {'err':>8s}")
    for r in results:
        sp = f"{r['speedup_vs_fla']:.2f}" if r["speedup_vs_fla"] else "-"
        print(f"{r['method']:22s} {r['B']:>2d}x{r['T']:<7d} {r['mode']:7s} {r['ms']:8.3f} "
              f"{r['mtok_s']:7.1f} {r['peak_gb']:7.2f} {sp:>6s} {r['floor_ms']:6.3f} {r['rel_err']:8.1e}")


if __name__ == "__main__":
    main()
