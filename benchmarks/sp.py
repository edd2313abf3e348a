"""Sequence-parallel linear attention, fwd+bwd: LASP-2 (both layouts, with its collectives
overlapped and forced synchronous) vs the LASP-1 ring, at a fixed number of tokens per GPU.

    python benchmarks/sp.py                                   # W = 1: the weak-scaling baseline
    torchrun --nproc-per-node 2 benchmarks/sp.py              # W = 2
    torchrun --nproc-per-node 2 benchmarks/sp.py --tokens 32768 --profile
                                                              # + traces, NCCL/compute concurrency
    python benchmarks/sp.py --report DIR/sp_w1.json DIR/sp_w2.json   # weak-scaling table
    torchrun --nproc-per-node 2 benchmarks/sp.py --device cpu --tokens 256,512 --heads 2 --dim 16
                                                              # gloo smoke test on CPU
    torchrun --nproc-per-node 2 benchmarks/sp.py --shared-gpu --variant gated-deltanet --tokens 16384
                                                              # 2 ranks on one GPU over gloo

--variant picks the recurrence: plain, g_gamma, g, gk, or the delta rule (deltanet,
gated-deltanet, kda), whose LASP-2 summaries carry dense K×K transitions.

bf16 on CUDA (fp32 on CPU), H=16, D=128, B=1, one unpacked sequence of W·N tokens
(N = --tokens, per GPU, default 32K..512K). At W = 1 every method is the plain kernel
call. Rows: median ms per step of the slowest rank (CUDA events after warm-up),
tokens/s/GPU, the most bytes one rank sent per step (counted from the tensors passed to
the collectives), `x sync`: the time of LASP-2 with its all-gathers forced synchronous
(issued on the compute stream, host waits) over its time with them overlapped (on a side
stream, running while the zero-state outputs and the dq pass compute), and at --report
the weak-scaling efficiency t(W=1, N) / t(W, N per GPU).

--profile (CUDA) also records a few steps of LASP-2 contiguous, overlapped and
synchronous, at the first N with torch.profiler: a Chrome trace per rank and method, and
per step the NCCL kernels' time and how much of it ran while a compute kernel ran (kernels
of one stream never overlap, so that time is concurrency across streams).

Writes sp_w{W}.json (device, versions, shapes, medians, overlap gains, profile) and the
traces to --out (default $OUT, else benchmarks/results/). NVLink multicast (NVLS) stays off.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lasp.parallel import SequenceLayout, lasp1_linear_attention, lasp2_linear_attention, scan
from lasp.parallel.lasp2 import sequence_parallel_linear_attention

LASP2_SYNC = functools.partial(sequence_parallel_linear_attention,
                               exchange=functools.partial(scan.AllGatherScan, overlap=False))
METHODS = {   # name -> (layout kind, op)
    "lasp2 zigzag": ("zigzag", lasp2_linear_attention),
    "lasp2 contiguous": ("contiguous", lasp2_linear_attention),
    "lasp2-sync zigzag": ("zigzag", LASP2_SYNC),
    "lasp2-sync contiguous": ("contiguous", LASP2_SYNC),
    "lasp1 contiguous": ("contiguous", lasp1_linear_attention),
    "lasp1 zigzag": ("zigzag", lasp1_linear_attention),
}
PROFILED = ("lasp2 contiguous", "lasp2-sync contiguous")
VARIANTS = {   # --variant -> (decay argument, delta rule)
    "plain": (None, False), "g_gamma": ("g_gamma", False), "g": ("g", False), "gk": ("gk", False),
    "deltanet": (None, True), "gated-deltanet": ("g", True), "kda": ("gk", True),
}
PROFILE_STEPS = 5


def init(device: str, shared_gpu: bool = False):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517")):
        os.environ.setdefault(key, value)
    if device == "cuda" and shared_gpu:     # NCCL refuses two ranks on one device
        torch.cuda.set_device(0)
        dist.init_process_group("gloo")
    elif device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl", device_id=torch.device("cuda", int(os.environ["LOCAL_RANK"])))
    else:
        torch.set_num_threads(1)          # as under torchrun: one core per rank
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def timer(device):
    """(start, stop) -> seconds of one step; CUDA events on GPU, wall clock on CPU."""
    if device == "cuda":
        def start():
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev

        def stop(ev):
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return ev.elapsed_time(end) / 1e3
        return start, stop
    return time.perf_counter, lambda t0: time.perf_counter() - t0


def make_step(op, kind, N, args, rank, W):
    """One fwd+bwd step of `op` on fresh inputs of N local tokens."""
    H, D, device = args.heads, args.dim, args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layout = SequenceLayout(N * W, W, rank, kind)
    gen = torch.Generator(device=device).manual_seed(rank)

    def rand(*shape):
        return torch.randn(*shape, device=device, generator=gen)
    decay, delta = VARIANTS[args.variant]
    q, k, v = (rand(1, N, H, D).to(dtype).requires_grad_() for _ in range(3))
    if delta:  # the delta rule wants unit keys (the layers normalise them)
        k = F.normalize(k.detach().float(), dim=-1).to(dtype).requires_grad_()
    g = F.logsigmoid(rand(1, N, H) + 4).requires_grad_() if decay == "g" else None
    gk = F.logsigmoid(rand(1, N, H, D) + 4).requires_grad_() if decay == "gk" else None
    g_gamma = F.logsigmoid(torch.linspace(3, 7, H, device=device)) if decay == "g_gamma" else None
    beta = torch.sigmoid(rand(1, N, H)).requires_grad_() if delta else None
    do = rand(1, N, H, D).to(dtype)
    leaves = [x for x in (q, k, v, g, gk, beta) if x is not None]

    def step():
        o = op(q, k, v, g, g_gamma, gk=gk, beta=beta, layout=layout)
        torch.autograd.grad(o, leaves, do)
    return step


def measure(step, args):
    """(median ms of the slowest rank, most bytes sent by one rank) per step."""
    for _ in range(args.warmup):
        step()
    scan.bytes_sent = 0
    step()
    sent = scan.bytes_sent
    start, stop = timer(args.device)
    times = []
    for _ in range(args.iters):
        dist.barrier()
        t0 = start()
        step()
        times.append(stop(t0))
    worst = torch.tensor([statistics.median(times), sent], dtype=torch.float64, device=args.device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst[0].item() * 1e3, int(worst[1].item())


def lasp2_bytes_per_layer(W: int, H: int, D: int, segments: int, variant: str = "plain") -> dict:
    """What one rank sends per layer and step in LASP-2 (B = 1, causal), in fp32. Forward:
    each segment's summary, its K×V state and its transition per head (none without a
    decay, 1 log-decay for `g` or `g_gamma`, K for `gk`, a K×K matrix for the delta rule).
    Backward: the incoming states' gradients, one K×V per segment and head, whatever the
    transition (each rank forms its summaries' gradients from them locally). The
    all-gathers bring in W times that. Nothing at W = 1."""
    if W == 1:
        return dict(forward=0, backward=0, gathered=0)
    decay, delta = VARIANTS[variant]
    transition = D * D if delta else {None: 0, "g_gamma": 1, "g": 1, "gk": D}[decay]
    forward = segments * H * (D * D + transition) * 4
    backward = segments * H * D * D * 4
    return dict(forward=forward, backward=backward, gathered=W * (forward + backward))


def concurrency(kernels):
    """(NCCL kernel µs, of which µs ran while another kernel ran) from (name, start, end)
    intervals of the device's kernels."""
    busy = []                                   # union of the other kernels' intervals
    for start, end in sorted((s, e) for name, s, e in kernels if "nccl" not in name.lower()):
        if busy and start <= busy[-1][1]:
            busy[-1][1] = max(busy[-1][1], end)
        else:
            busy.append([start, end])
    total = concurrent = 0.0
    for name, start, end in kernels:
        if "nccl" in name.lower():
            total += end - start
            concurrent += sum(max(0.0, min(end, e) - max(start, s)) for s, e in busy)
    return total, concurrent


def profile(step, name, N, args, rank, W):
    """Trace PROFILE_STEPS warm steps; per step, the NCCL time and its concurrent part (this rank)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    step()
    torch.cuda.synchronize()
    dist.barrier()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILE_STEPS):
            step()
        torch.cuda.synchronize()
    trace = os.path.join(args.out, f"sp_trace_w{W}_n{N}_{name.replace(' ', '_')}_rank{rank}.json")
    prof.export_chrome_trace(trace)
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    nccl, concurrent = concurrency(kernels)
    return dict(method=name, tokens_per_gpu=N, rank=rank, trace=trace, steps=PROFILE_STEPS,
                nccl_us_per_step=nccl / PROFILE_STEPS, concurrent_us_per_step=concurrent / PROFILE_STEPS,
                concurrent_fraction=concurrent / nccl if nccl else None)


def overlap_gains(results):
    """Per layout and N: LASP-2 overlapped vs forced synchronous."""
    gains = []
    for r in results:
        sync = next((x for x in results if x["method"] == r["method"].replace("lasp2 ", "lasp2-sync ")
                     and x["tokens_per_gpu"] == r["tokens_per_gpu"]), None)
        if r["method"].startswith("lasp2 ") and sync:
            gains.append(dict(layout=r["layout"], tokens_per_gpu=r["tokens_per_gpu"], ms_overlap=r["ms"],
                              ms_sync=sync["ms"], saved_ms=sync["ms"] - r["ms"],
                              speedup=sync["ms"] / r["ms"]))
    return gains


def run(args):
    rank, W = init(args.device, args.shared_gpu)
    if args.profile and args.device != "cuda":
        raise SystemExit("--profile traces CUDA kernels: it needs --device cuda")
    os.makedirs(args.out, exist_ok=True)
    results, profiles = [], []
    sizes = [int(x) for x in args.tokens.split(",")]
    for N in sizes:
        for name, (kind, op) in METHODS.items():
            step = make_step(op, kind, N, args, rank, W)
            ms, sent = measure(step, args)
            results.append(dict(method=name, layout=kind, tokens_per_gpu=N, T=N * W, ms=ms,
                                tokens_per_s_per_gpu=N / ms * 1e3, bytes_sent=sent))
            if args.profile and N == sizes[0] and name in PROFILED:
                profiles.append(profile(step, name, N, args, rank, W))
            if rank == 0:
                print(f"W={W} N={N:7d} {name:22s} {ms:9.3f} ms", flush=True)
    if rank == 0:
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        gains = overlap_gains(results)
        meta = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
                    torch=torch.__version__, triton=triton_version, world_size=W,
                    backend=dist.get_backend(), shared_gpu=args.shared_gpu, H=args.heads, D=args.dim, B=1,
                    variant=args.variant,
                    dtype="bf16" if args.device == "cuda" else "fp32",
                    warmup=args.warmup, iters=args.iters, results=results, overlap=gains,
                    profile=profiles,
                    lasp2_bytes_per_layer={kind: lasp2_bytes_per_layer(W, args.heads, args.dim, segments, args.variant)
                                           for kind, segments in (("contiguous", 1), ("zigzag", 2))})
        path = os.path.join(args.out, f"sp_w{W}.json")
        with open(path, "w") as f:
            json.dump(meta, f, indent=1)
        print(f"\n{meta['device']}, torch {meta['torch']}, triton {triton_version}, W={W} -> {path}")
        print(f"{'method':22s} {'N/GPU':>8s} {'ms':>9s} {'Mtok/s/GPU':>10s} {'bytes sent':>11s} "
              f"{'x lasp1':>8s} {'x sync':>7s}")
        for r in results:
            ring = next(x for x in results if x["method"] == "lasp1 " + r["layout"]
                        and x["tokens_per_gpu"] == r["tokens_per_gpu"])
            gain = next((x["speedup"] for x in gains if r["method"] == "lasp2 " + x["layout"]
                         and x["tokens_per_gpu"] == r["tokens_per_gpu"]), None)
            print(f"{r['method']:22s} {r['tokens_per_gpu']:8d} {r['ms']:9.3f} "
                  f"{r['tokens_per_s_per_gpu'] / 1e6:10.3f} {r['bytes_sent']:11d} {ring['ms'] / r['ms']:8.3f} "
                  + (f"{gain:7.3f}" if gain else f"{'':7s}"))
        print("\nLASP-2 bytes per layer and step, one rank (the op is one layer; measured from "
              "lasp.parallel.scan.bytes_sent in the table's 'bytes sent'):")
        for kind, segments in (("contiguous", 1), ("zigzag", 2)):
            model = lasp2_bytes_per_layer(W, args.heads, args.dim, segments, args.variant)
            measured = next(r["bytes_sent"] for r in results if r["method"] == f"lasp2 {kind}")
            print(f"  {kind:10s} sent {measured:,} B (expected {model['forward'] + model['backward']:,}: forward "
                  f"{model['forward']:,} + backward {model['backward']:,}); all-gathers receive {model['gathered']:,} B"
                  + ("  (W = 1: no exchange)" if W == 1 else ""))
            if W == 1:
                any_w = lasp2_bytes_per_layer(2, args.heads, args.dim, segments, args.variant)
                print(f"  {'':10s} at any W >= 2 it sends {any_w['forward']:,} + {any_w['backward']:,} B "
                      f"and receives W times that")
        for p in profiles:
            fraction = "n/a" if p["concurrent_fraction"] is None else f"{p['concurrent_fraction']:.0%}"
            print(f"profile {p['method']:22s} N={p['tokens_per_gpu']}: NCCL {p['nccl_us_per_step']:.1f} us/step, "
                  f"{p['concurrent_us_per_step']:.1f} us ({fraction}) concurrent with compute -> {p['trace']}")
    dist.destroy_process_group()


def report(paths):
    """Weak-scaling table: each method's time at W=1 with N tokens over its time at W with N per GPU."""
    runs = sorted((json.load(open(p)) for p in paths), key=lambda m: m["world_size"])
    base = {(r["method"], r["tokens_per_gpu"]): r["ms"] for r in runs[0]["results"]}
    print(f"{runs[0]['device']}: weak scaling, t(W={runs[0]['world_size']}) / t(W)")
    print(f"{'method':22s} {'N/GPU':>8s} {'W':>3s} {'ms':>9s} {'ms W=1':>9s} {'efficiency':>10s} {'x lasp1':>8s}")
    for run_ in runs[1:]:
        for r in run_["results"]:
            ring = next(x for x in run_["results"] if x["method"] == "lasp1 " + r["layout"]
                        and x["tokens_per_gpu"] == r["tokens_per_gpu"])
            t1 = base.get((r["method"], r["tokens_per_gpu"]))
            eff = f"{t1 / r['ms']:10.1%}" if t1 else f"{'-':>10s}"
            print(f"{r['method']:22s} {r['tokens_per_gpu']:8d} {run_['world_size']:3d} {r['ms']:9.3f} "
                  f"{t1 or float('nan'):9.3f} {eff} {ring['ms'] / r['ms']:8.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="32768,131072,262144,524288", help="tokens per GPU, comma-separated")
    parser.add_argument("--variant", default="plain", choices=list(VARIANTS))
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--shared-gpu", action="store_true",
                        help="every rank on GPU 0 over gloo: the ranks' kernels share one GPU and gloo copies "
                             "through the host (relative cost of methods, not NCCL speed)")
    parser.add_argument("--profile", action="store_true",
                        help="trace LASP-2 overlapped vs synchronous at the first N (CUDA)")
    parser.add_argument("--report", nargs="+", metavar="JSON", help="print the weak-scaling table of these runs")
    args = parser.parse_args()
    if args.report:
        report(args.report)
    else:
        run(args)


if __name__ == "__main__":
    main()
