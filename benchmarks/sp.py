"""Sequence-parallel linear attention, fwd+bwd: LASP-2 (both layouts, and with the gather
forced synchronous) vs the LASP-1 ring, at a fixed number of tokens per GPU.

    python benchmarks/sp.py                                   # W = 1: the weak-scaling baseline
    torchrun --nproc-per-node 2 benchmarks/sp.py              # W = 2
    python benchmarks/sp.py --report DIR/sp_w1.json DIR/sp_w2.json   # weak-scaling table
    torchrun --nproc-per-node 2 benchmarks/sp.py --device cpu --tokens 256,512 --heads 2 --dim 16
                                                              # gloo smoke test on CPU

bf16 on CUDA (fp32 on CPU), H=16, D=128, B=1, one unpacked sequence of W·N tokens
(N = --tokens, per GPU, default 32K..512K). At W = 1 every method is the plain kernel
call. Rows: median ms per step of the slowest rank (CUDA events after warm-up),
tokens/s/GPU, the most bytes one rank sent per step (counted from the tensors passed to
the collectives), and at --report the weak-scaling efficiency t(W=1, N) / t(W, N per GPU).
Writes sp_w{W}.json (device, versions, shapes, medians) to --out (default $OUT, else
benchmarks/results/). NVLink multicast (NVLS) stays off.
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

METHODS = {   # name -> (layout kind, op)
    "lasp2 zigzag": ("zigzag", lasp2_linear_attention),
    "lasp2 contiguous": ("contiguous", lasp2_linear_attention),
    "lasp2-sync contiguous": ("contiguous", functools.partial(
        sequence_parallel_linear_attention,
        exchange=functools.partial(scan.all_gather_scan, overlap=False))),
    "lasp1 contiguous": ("contiguous", lasp1_linear_attention),
    "lasp1 zigzag": ("zigzag", lasp1_linear_attention),
}


def init(device: str):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517")):
        os.environ.setdefault(key, value)
    if device == "cuda":
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


def measure(op, kind, N, args, rank, W):
    H, D, device = args.heads, args.dim, args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layout = SequenceLayout(N * W, W, rank, kind)
    gen = torch.Generator(device=device).manual_seed(rank)

    def rand(*shape):
        return torch.randn(*shape, device=device, generator=gen)
    q, k, v = (rand(1, N, H, D).to(dtype).requires_grad_() for _ in range(3))
    g = F.logsigmoid(rand(1, N, H) + 4).requires_grad_() if args.variant == "g" else None
    g_gamma = F.logsigmoid(torch.linspace(3, 7, H, device=device)) if args.variant == "g_gamma" else None
    do = rand(1, N, H, D).to(dtype)
    leaves = [x for x in (q, k, v, g) if x is not None]

    def step():
        o = op(q, k, v, g, g_gamma, layout=layout)
        torch.autograd.grad(o, leaves, do)
    for _ in range(args.warmup):
        step()
    scan.bytes_sent = 0
    step()
    sent = scan.bytes_sent
    start, stop = timer(device)
    times = []
    for _ in range(args.iters):
        dist.barrier()
        t0 = start()
        step()
        times.append(stop(t0))
    worst = torch.tensor([statistics.median(times), sent], dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst[0].item() * 1e3, int(worst[1].item())


def run(args):
    rank, W = init(args.device)
    results = []
    for N in [int(x) for x in args.tokens.split(",")]:
        for name, (kind, op) in METHODS.items():
            ms, sent = measure(op, kind, N, args, rank, W)
            results.append(dict(method=name, layout=kind, tokens_per_gpu=N, T=N * W, ms=ms,
                                tokens_per_s_per_gpu=N / ms * 1e3, bytes_sent=sent))
            if rank == 0:
                print(f"W={W} N={N:7d} {name:22s} {ms:9.3f} ms", flush=True)
    if rank == 0:
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        meta = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
                    torch=torch.__version__, triton=triton_version, world_size=W,
                    backend=dist.get_backend(), H=args.heads, D=args.dim, B=1, variant=args.variant,
                    dtype="bf16" if args.device == "cuda" else "fp32",
                    warmup=args.warmup, iters=args.iters, results=results)
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"sp_w{W}.json")
        with open(path, "w") as f:
            json.dump(meta, f, indent=1)
        print(f"\n{meta['device']}, torch {meta['torch']}, triton {triton_version}, W={W} -> {path}")
        print(f"{'method':22s} {'N/GPU':>8s} {'ms':>9s} {'Mtok/s/GPU':>10s} {'bytes sent':>11s} {'x lasp1':>8s}")
        for r in results:
            ring = next(x for x in results if x["method"] == "lasp1 " + r["layout"]
                        and x["tokens_per_gpu"] == r["tokens_per_gpu"])
            print(f"{r['method']:22s} {r['tokens_per_gpu']:8d} {r['ms']:9.3f} "
                  f"{r['tokens_per_s_per_gpu'] / 1e6:10.3f} {r['bytes_sent']:11d} {ring['ms'] / r['ms']:8.3f}")
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
    parser.add_argument("--variant", default="plain", choices=["plain", "g_gamma", "g"])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--report", nargs="+", metavar="JSON", help="print the weak-scaling table of these runs")
    args = parser.parse_args()
    if args.report:
        report(args.report)
    else:
        run(args)


if __name__ == "__main__":
    main()
