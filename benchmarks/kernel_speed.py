"""Single-GPU linear-attention kernels: lasp (Triton, torch) vs fla 0.6.0, fwd and fwd+bwd;
then the delta rule (DeltaNet, Gated DeltaNet, KDA).

    python benchmarks/kernel_speed.py [--shapes 8x4096,1x32768,1x131072] [--out DIR]

bf16, H=16, D=128. Rows: lasp-triton (plain, g_gamma, g, gk), fla `chunk_linear_attn`
(normalize=False), `chunk_simple_gla` (g_gamma) and `chunk_gla` (gk) when fla-core is importable, and
lasp's torch backend (the oracle; slow: only up to `--torch-max-tokens` B·T). fla's gated
backward (`chunk_simple_gla` with per-token g) refuses to run on triton 3.6 / Hopper, so
fla has no g row. Each row checks its forward against lasp-torch in fp32 first (rel err;
gk on the first two heads, where the torch oracle fits memory at every shape); a row off
by more than 1e-2 is reported as FAIL instead of a time. `variant` is the transition kind
(identity, scalar, diagonal; dense for the delta rule), `decay` the argument (plain,
g_gamma, g, gk; delta, g+beta, gk+beta). Delta rows: lasp-triton against fla's
`chunk_delta_rule`, `chunk_gated_delta_rule` and `chunk_kda`, with L2-normalised keys, each
checked against lasp's torch chunk form on the first two heads (`run_delta_rows`); lasp's
delta rows come twice, with the kernels' default walk operands (`WALK_OPERANDS`, bf16) and
with the other mode ("(fp32 walks)": TF32 products), timed in the same run. fla's
`chunk_gla` autotunes on its first call at each shape (once > 150 s at 8x4096 on an H100;
all three shapes with lasp's rows took 205 s in session 10, `TRITON_CACHE_AUTOTUNING=1`):
`--fla-gla-shapes` says at which shapes it runs.

Prints medians (ms), million tokens/s, peak memory, the ratio to fla's same variant, and
the memory floor: bytes that must move (read q,k,v, write o; backward: read q,k,v,do,
write dq,dk,dv) ÷ the device-to-device copy bandwidth measured in the same run.
Writes `kernels.json` to DIR (default $OUT, else benchmarks/results/), after every row.
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
from lasp.kernels.delta import chunk_linear_attention as delta_chunk
from lasp.kernels.delta import triton as delta_triton

H, D = 16, 128


def copy_bandwidth(nbytes=2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def memory_floor_ms(B, T, bandwidth) -> dict[str, float]:
    """Per mode, the ms to move the bytes that must move at `bandwidth` (bytes/s): read q, k, v,
    write o; backward: read q, k, v, do, write dq, dk, dv (bf16 [B, T, H, D] each)."""
    unit = B * T * H * D * 2
    return {"fwd": 4 * unit / bandwidth * 1e3, "fwd+bwd": 11 * unit / bandwidth * 1e3}


KIND = {"plain": "identity", "g_gamma": "scalar", "g": "scalar", "gk": "diagonal"}


def methods():
    """name -> (decay, fn(q, k, v, g, gg, gk) -> o)."""
    rows = {
        "lasp-triton plain": ("plain", lambda q, k, v, g, gg, gk: linear_attention(q, k, v, backend="triton")[0]),
        "lasp-triton g_gamma": ("g_gamma", lambda q, k, v, g, gg, gk: linear_attention(q, k, v, g_gamma=gg, backend="triton")[0]),
        "lasp-triton g": ("g", lambda q, k, v, g, gg, gk: linear_attention(q, k, v, g, backend="triton")[0]),
        "lasp-triton gk": ("gk", lambda q, k, v, g, gg, gk: linear_attention(q, k, v, gk=gk, backend="triton")[0]),
        "lasp-torch plain": ("plain", lambda q, k, v, g, gg, gk: linear_attention(q, k, v, backend="torch")[0]),
        "lasp-torch g": ("g", lambda q, k, v, g, gg, gk: linear_attention(q, k, v, g, backend="torch")[0]),
    }
    try:
        from fla.ops.gla import chunk_gla
        from fla.ops.linear_attn import chunk_linear_attn
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        print("fla-core not importable: no fla rows")
        return rows
    rows["fla plain"] = ("plain", lambda q, k, v, g, gg, gk: chunk_linear_attn(q, k, v, normalize=False)[0])
    rows["fla g_gamma"] = ("g_gamma", lambda q, k, v, g, gg, gk: chunk_simple_gla(q, k, v, g_gamma=gg)[0])
    rows["fla gk"] = ("gk", lambda q, k, v, g, gg, gk: chunk_gla(q, k, v, gk)[0])
    return rows


def seeded_randn(seed=0, device="cuda"):
    """rand(*shape): fp32 normal tensors (CUDA unless told) from one seeded generator."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return lambda *shape: torch.randn(*shape, device=device, generator=gen)


def span_inputs(B, T):
    """(q, k, v, g, g_gamma, gk) bf16 q/k/v and fp32 decays, leaves that require grad
    (g_gamma a fixed per-head decay), and an output gradient do."""
    rand = seeded_randn()
    q, k, v = (rand(B, T, H, D).bfloat16().requires_grad_() for _ in range(3))
    g = F.logsigmoid(rand(B, T, H) + 4).requires_grad_()
    gk = F.logsigmoid(rand(B, T, H, D) + 4).requires_grad_()
    gg = F.logsigmoid(torch.linspace(3, 7, H, device="cuda"))
    return (q, k, v, g, gg, gk), rand(B, T, H, D).bfloat16()


def delta_inputs(B, T):
    """(q, k, v, beta, g, gk) for the delta rule (keys L2-normalised, beta in (0, 1)),
    leaves that require grad, and an output gradient do."""
    rand = seeded_randn()
    q, v = (rand(B, T, H, D).bfloat16().requires_grad_() for _ in range(2))
    k = F.normalize(rand(B, T, H, D), dim=-1).bfloat16().requires_grad_()
    beta = torch.sigmoid(rand(B, T, H)).requires_grad_()
    g = F.logsigmoid(rand(B, T, H) + 4).requires_grad_()
    gk = F.logsigmoid(rand(B, T, H, D) + 4).requires_grad_()
    return (q, k, v, beta, g, gk), rand(B, T, H, D).bfloat16()


def oracle(decay, q, k, v, g, gg, gk):
    """lasp-torch in fp32 (gk: the first two heads)."""
    if decay == "gk":
        q, k, v, gk = (x[:, :, :2] for x in (q, k, v, gk))
    kw = {"plain": {}, "g_gamma": dict(g_gamma=gg), "g": dict(g=g), "gk": dict(gk=gk)}[decay]
    return linear_attention(q.float(), k.float(), v.float(), backend="torch", **kw)[0]


def time_and_peak(step, warmup=25, rep=100):
    """(median ms, peak bytes above what was allocated before) of `step()`, after a first call."""
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return do_bench(step, warmup=warmup, rep=rep, return_mode="median"), peak


def measure(fn, inputs, do, backward, decay, profile=False):
    """(median ms, peak bytes, CUDA µs per kernel or None) of one row's step."""
    q, k, v, g, gg, gk = inputs
    leaves = [q, k, v] + ([g] if decay == "g" else []) + ([gk] if decay == "gk" else [])

    def step():
        o = fn(q, k, v, g, gg, gk)
        if backward:
            torch.autograd.grad(o, leaves, do)
    return *time_and_peak(step), kernel_times(step) if profile else None


def override_launches(specs: str) -> None:
    """Apply `ROW=warps,stages,block[;ROW=...]` to `lasp.kernels.common.launch.LAUNCH` (rows
    must exist): to time a launch change against the defaults of a run beside it."""
    from lasp.kernels.common.launch import LAUNCH, Launch
    for spec in filter(None, specs.split(";")):
        row, _, values = spec.partition("=")
        if row not in LAUNCH:
            raise ValueError(f"--launch: no LAUNCH row {row!r}; rows: {sorted(LAUNCH)}")
        try:
            LAUNCH[row] = Launch(*(int(x) for x in values.split(",")))
        except (TypeError, ValueError):
            raise ValueError(f"--launch: {spec!r} is not ROW=warps,stages,block") from None


def override_chunks(specs: str) -> None:
    """Apply `FAMILY=tokens[,FAMILY=tokens]` to `lasp.kernels.common.launch.FAMILY_CHUNK`
    (families must exist; powers of two from 16): to time a family's chunk size against
    its default in a run beside it."""
    from lasp.kernels.common.launch import FAMILY_CHUNK
    for spec in filter(None, specs.split(",")):
        family, _, value = spec.partition("=")
        if family not in FAMILY_CHUNK:
            raise ValueError(f"--chunk: no family {family!r}; families: {sorted(FAMILY_CHUNK)}")
        if not value.isdigit() or int(value) < 16 or int(value) & (int(value) - 1):
            raise ValueError(f"--chunk: {spec!r} is not FAMILY=tokens with tokens a power of two >= 16")
        FAMILY_CHUNK[family] = int(value)


def kernel_times(step, reps=3) -> dict[str, float]:
    """CUDA time per kernel (µs per step, largest first) of `step`, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    return {e.key[:80]: e.device_time_total / reps for e in events if e.device_time_total > 0}


def print_kernel_times(per_kernel, top=8):
    for kernel, us in list((per_kernel or {}).items())[:top]:
        print(f"    {us:9.1f} us  {kernel}", flush=True)


def _add_speedups(results):
    """speedup_vs_fla: fla's time for the same decay, shape and mode ÷ this row's;
    vs_plain: this row's time ÷ lasp-triton plain's (None for FAIL rows)."""
    def same(x, r):
        return (x["decay"], x["B"], x["T"], x["mode"]) == (r["decay"], r["B"], r["T"], r["mode"])
    for r in results:
        fla = next((x for x in results if x["method"].startswith("fla") and same(x, r) and x["ms"]), None)
        plain = next((x for x in results if x["method"] == "lasp-triton plain" and x["ms"] and
                      (x["B"], x["T"], x["mode"]) == (r["B"], r["T"], r["mode"])), None)
        r["speedup_vs_fla"] = fla["ms"] / r["ms"] if fla and r["ms"] else None
        r["vs_plain"] = r["ms"] / plain["ms"] if plain and r["ms"] else None


# -- The delta rule (beta): DeltaNet, Gated DeltaNet (g), KDA (gk) --------------------------------
# Own rows, inputs and oracle: keys arrive L2-normalised (as the layers feed them), beta in (0, 1).

DELTA_DECAYS = ("delta", "g+beta", "gk+beta")


def delta_gate(decay, g, gk):
    """The decay the delta rule's `decay` row takes: none, per token (g) or per key (gk)."""
    return {"delta": None, "g+beta": g, "gk+beta": gk}[decay]


def delta_methods():
    """name -> (decay, fn(q, k, v, beta, g, gk) -> o) for the delta rule; lasp's rows:
    "lasp-triton <decay>" with the kernels' default walk operands (`WALK_OPERANDS`), and
    "lasp-triton <decay> (bf16 walks)" or "(fp32 walks)" with the other mode, to time both
    in one run."""
    def lasp_row(decay, walk_operands=None):
        def fn(q, k, v, beta, g, gk):
            return delta_triton.triton_linear_attention(q, k, v, delta_gate(decay, g, gk), beta, scale=D ** -0.5,
                                                        walk_operands=walk_operands)[0]
        return decay, fn
    other = "float32" if delta_triton.WALK_OPERANDS == "bfloat16" else "bfloat16"
    label = {"bfloat16": "bf16 walks", "float32": "fp32 walks"}[other]
    rows = {}
    for decay in DELTA_DECAYS:
        rows[f"lasp-triton {decay}"] = lasp_row(decay)
        rows[f"lasp-triton {decay} ({label})"] = lasp_row(decay, other)
    try:
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.kda import chunk_kda
    except ImportError:
        print("fla-core not importable: no fla delta rows")
        return rows
    rows["fla delta"] = ("delta", lambda q, k, v, beta, g, gk: chunk_delta_rule(q, k, v, beta.to(q.dtype))[0])
    rows["fla g+beta"] = ("g+beta",
                          lambda q, k, v, beta, g, gk: chunk_gated_delta_rule(q, k, v, g, beta.to(q.dtype))[0])
    rows["fla gk+beta"] = ("gk+beta", lambda q, k, v, beta, g, gk: chunk_kda(q, k, v, gk, beta.to(q.dtype))[0])
    return rows


def delta_oracle(decay, q, k, v, beta, g, gk):
    """lasp's torch chunk form in fp32 on the first two heads."""
    gate = delta_gate(decay, g, gk)
    q, k, v, beta = (x[:, :, :2].float() for x in (q, k, v, beta))
    return delta_chunk(q, k, v, None if gate is None else gate[:, :, :2], beta, scale=D ** -0.5)[0]


def run_delta_rows(B, T, rows, results, meta, path, bandwidth, profile=False):
    """Time the delta rows at one shape (same run, same GPU); a row that misses the oracle
    by > 1e-2, runs out of memory or refuses (fla's gated backward on triton 3.6 /
    Hopper) is recorded with ms None and its reason in `note`. `profile`: each timed
    row also records (and prints) its CUDA time per kernel."""
    inputs, do = delta_inputs(B, T)
    q, k, v, beta, g, gk = inputs
    floor_ms = memory_floor_ms(B, T, bandwidth)
    refs = {}
    for name, (decay, fn) in rows.items():
        gate = delta_gate(decay, g, gk)
        leaves = [q, k, v, beta] + ([] if gate is None else [gate])
        err, note = None, None
        try:
            with torch.no_grad():
                if decay not in refs:
                    refs[decay] = delta_oracle(decay, *inputs)
                o = fn(*inputs)[:, :, :2].float()
                err = ((o - refs[decay]).norm() / refs[decay].norm()).item()
        except Exception as e:          # noqa: BLE001 - recorded, the run goes on
            note = f"{type(e).__name__}: {e}"[:200]
        if err is not None and not err <= 1e-2:
            note = "forward off the oracle by more than 1e-2"
        for mode in ("fwd", "fwd+bwd"):
            ms = peak = per_kernel = None
            if err is not None and err <= 1e-2:
                def step():
                    o = fn(*inputs)
                    if mode == "fwd+bwd":
                        torch.autograd.grad(o, leaves, do)
                try:
                    ms, peak = time_and_peak(step, warmup=10, rep=50)
                    per_kernel = kernel_times(step) if profile else None
                except Exception as e:  # noqa: BLE001
                    note = f"{type(e).__name__}: {e}"[:200]
                    torch.cuda.empty_cache()
            results.append(dict(method=name, variant="dense", decay=decay, B=B, T=T, mode=mode, ms=ms,
                                mtok_s=ms and B * T / ms / 1e3, peak_gb=peak and peak / 1e9,
                                rel_err=float("nan") if err is None else err, floor_ms=floor_ms[mode],
                                note=None if ms else note, kernels_us=per_kernel))
            shown = f"{ms:8.3f} ms" if ms else f"FAIL ({note})"
            print(f"{name:22s} B={B} T={T:6d} {mode:7s} {shown}  err={err}", flush=True)
            print_kernel_times(per_kernel)
            _add_speedups(results)
            with open(path, "w") as f:
                json.dump(meta, f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="8x4096,1x32768,1x131072")
    parser.add_argument("--torch-max-tokens", type=int, default=32768,
                        help="skip the slow torch backend above this many tokens")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--only", default=None,
                        help="comma-separated method names to run (default: all)")
    parser.add_argument("--launch", default="",
                        help="LAUNCH overrides, ROW=warps,stages,block[;...], e.g. delta.key_grad=8,1,16")
    parser.add_argument("--chunk", default="",
                        help="FAMILY_CHUNK overrides, FAMILY=tokens[,...], e.g. diagonal=64,delta=32")
    parser.add_argument("--profile", action="store_true",
                        help="also record each row's CUDA time per kernel")
    parser.add_argument("--fla-gla-shapes", default="8x4096,1x32768,1x131072",
                        help="shapes BxT at which fla chunk_gla runs (its autotune is long)")
    args = parser.parse_args()
    override_launches(args.launch)
    override_chunks(args.chunk)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    bandwidth = copy_bandwidth()
    rows = methods()
    if args.only:
        rows = {name: row for name, row in rows.items() if name in args.only.split(",")}
    fla_gla_shapes = {tuple(int(x) for x in s.split("x")) for s in args.fla_gla_shapes.split(",") if s}
    results = []
    try:
        import fla
        fla_version = fla.__version__
    except ImportError:
        fla_version = None
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, fla=fla_version,
                launch_overrides=args.launch or None, chunk_overrides=args.chunk or None,
                delta_walk_operands=delta_triton.WALK_OPERANDS,
                python=platform.python_version(), H=H, D=D, dtype="bf16",
                copy_bandwidth_gb_s=bandwidth / 1e9, results=results)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "kernels.json")
    for B, T in shapes:
        inputs, do = span_inputs(B, T)
        floor_ms = memory_floor_ms(B, T, bandwidth)
        refs = {}
        for name, (decay, fn) in rows.items():
            if name.startswith("lasp-torch") and B * T > args.torch_max_tokens:
                continue
            if name == "fla gk" and (B, T) not in fla_gla_shapes:
                print(f"{name:22s} B={B} T={T:6d} skipped (--fla-gla-shapes)", flush=True)
                continue
            with torch.no_grad():
                if decay not in refs:
                    refs[decay] = oracle(decay, *inputs)
                o = fn(*inputs).float()
                if decay == "gk":
                    o = o[:, :, :2]
                err = ((o - refs[decay]).norm() / refs[decay].norm()).item()
            for mode in ("fwd", "fwd+bwd"):
                ms = peak = per_kernel = None
                if err <= 1e-2:
                    ms, peak, per_kernel = measure(fn, inputs, do, mode == "fwd+bwd", decay, args.profile)
                results.append(dict(method=name, variant=KIND[decay], decay=decay, B=B, T=T, mode=mode, ms=ms,
                                    mtok_s=ms and B * T / ms / 1e3, peak_gb=peak and peak / 1e9, rel_err=err,
                                    floor_ms=floor_ms[mode], kernels_us=per_kernel))
                shown = "FAIL" if ms is None else f"{ms:8.3f} ms"
                print(f"{name:22s} B={B} T={T:6d} {mode:7s} {shown}  err={err:.1e}", flush=True)
                print_kernel_times(per_kernel)
                _add_speedups(results)
                with open(path, "w") as f:      # after every row: a run cut short keeps its rows
                    json.dump(meta, f, indent=1)
    delta_rows = {name: row for name, row in delta_methods().items()
                  if not args.only or name in args.only.split(",")}
    for B, T in shapes if delta_rows else ():
        run_delta_rows(B, T, delta_rows, results, meta, path, bandwidth, args.profile)
    print(f"\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
          f"copy {bandwidth / 1e9:.0f} GB/s -> {path}")
    print(f"{'method':22s} {'B x T':>10s} {'mode':7s} {'ms':>8s} {'Mtok/s':>7s} {'peakGB':>7s} "
          f"{'x fla':>6s} {'/plain':>6s} {'floor':>6s} {'err':>8s}")
    for r in results:
        sp = f"{r['speedup_vs_fla']:.2f}" if r["speedup_vs_fla"] else "-"
        vp = f"{r['vs_plain']:.2f}" if r["vs_plain"] else "-"
        if r["ms"] is None:
            print(f"{r['method']:22s} {r['B']:>2d}x{r['T']:<7d} {r['mode']:7s} {'FAIL':>8s} "
                  f"{'-':>7s} {'-':>7s} {sp:>6s} {vp:>6s} {r['floor_ms']:6.3f} {r['rel_err']:8.1e}")
            continue
        print(f"{r['method']:22s} {r['B']:>2d}x{r['T']:<7d} {r['mode']:7s} {r['ms']:8.3f} "
              f"{r['mtok_s']:7.1f} {r['peak_gb']:7.2f} {sp:>6s} {vp:>6s} {r['floor_ms']:6.3f} {r['rel_err']:8.1e}")


if __name__ == "__main__":
    main()
