"""Sequence-parallel softmax attention: LASP-2H vs a ring baseline vs one GPU, fwd+bwd.

    torchrun --nproc-per-node 1 benchmarks/sp_softmax.py --seqlens 32K,128K     # W = 1
    torchrun --nproc-per-node 2 benchmarks/sp_softmax.py --seqlens 32K,128K     # W = 2
    python benchmarks/sp_softmax.py --report W1.json W2.json                    # strong scaling
    torchrun --nproc-per-node 2 benchmarks/sp_softmax.py --device cpu --seqlens 512 \\
        --hq 4 --hkv 2 --dim 32                                                  # CPU smoke test

bf16 on CUDA (fp32 on CPU), B=1, H_q=32, H_kv=8, D=128 by default, causal. Rows:

- ``single``: `softmax_attention` on the whole sequence (torch's default SDPA kernel),
  and ``single-flash``: the same forced to SDPA's flash kernel, which is the kernel SDPA
  runs for LASP-2H's lower-right-aligned causal blocks (W = 1 only);
- ``lasp2h-contiguous``, ``lasp2h-zigzag``: `lasp2h_attention`, default local backend;
- ``lasp2h-zigzag-flex`` and ``ring-zigzag``: LASP-2H and the ring baseline
  (`ring_attention`) over the same local kernel (flex_attention; the ring needs its
  log-sum-exp).

Each rank times its own steps (CUDA events after warm-up; median). Reported: the slowest
rank's median, the spread max/min of the ranks' medians, for LASP-2H rows the spread of
each rank's compute alone (its local attention on pre-gathered keys, no collective: the
work balance), and the peak memory (max over ranks). JSON per run goes to $OUT, else
benchmarks/results/. NCCL runs with its defaults (no NVLS/multicast is enabled here).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist

from lasp.kernels.softmax_attention import flash_attn_available, softmax_attention
from lasp.parallel.lasp2h import lasp2h_attention, local_attention, ring_attention
from lasp.parallel.layout import SequenceLayout


def parse_len(text: str) -> int:
    text = text.strip().upper()
    return int(text[:-1]) * 1024 if text.endswith("K") else int(text)


def methods(W: int, cuda: bool):
    """name -> (layout kind or None, fn(q, k, v, layout) -> o, context factory)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    none = contextlib.nullcontext
    rows = {}
    if W == 1:
        rows["single"] = (None, lambda q, k, v, layout: softmax_attention(q, k, v), none)
        if cuda:
            rows["single-flash"] = (None, lambda q, k, v, layout: softmax_attention(q, k, v),
                                    lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION))
    rows["lasp2h-contiguous"] = ("contiguous", lambda q, k, v, layout: lasp2h_attention(q, k, v, layout=layout), none)
    rows["lasp2h-zigzag"] = ("zigzag", lambda q, k, v, layout: lasp2h_attention(q, k, v, layout=layout), none)
    if cuda:  # flex has no CPU backward
        rows["lasp2h-zigzag-flex"] = ("zigzag", lambda q, k, v, layout: lasp2h_attention(
            q, k, v, layout=layout, backend="flex"), none)
    rows["ring-zigzag"] = ("zigzag", lambda q, k, v, layout: ring_attention(q, k, v, layout=layout), none)
    return rows


class Timer:
    """Per-step wall time: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, cuda):
        self.cuda = cuda

    def __call__(self, step, warmup, iters):
        for _ in range(warmup):
            step()
        times = []
        for _ in range(iters):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def measure(name, spec, T, args, device, dtype, timer):
    kind, fn, context = spec
    W, rank = dist.get_world_size(), dist.get_rank()
    layout = SequenceLayout(T, W, rank, kind or "contiguous")
    n = layout.local_len if kind else T
    make = lambda H: torch.randn(1, n, H, args.dim, device=device, dtype=dtype, requires_grad=True)  # noqa: E731
    q, k, v = make(args.hq), make(args.hkv), make(args.hkv)
    do = torch.randn_like(q)

    def step():
        with context():
            o = fn(q, k, v, layout)
            torch.autograd.grad(o, (q, k, v), do)

    if device.type == "cuda":
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    ms = timer(step, args.warmup, args.iters)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    compute = None
    if name.startswith("lasp2h") and kind:
        # Each rank's local attention alone, on keys/values as if already gathered.
        k_full, v_full = (torch.randn(1, T, args.hkv, args.dim, device=device, dtype=dtype, requires_grad=True)
                          for _ in range(2))
        backend = "flex" if name.endswith("flex") else None

        def local_step():
            o = local_attention(q, k_full, v_full, layout=layout, backend=backend)
            torch.autograd.grad(o, (q, k_full, v_full), do)

        compute = timer(local_step, 1, args.iters)
    ranks = [None] * W
    dist.all_gather_object(ranks, (ms, compute, peak))
    row = {"method": name, "seq_len": T, "world_size": W,
           "median_ms": max(r[0] for r in ranks), "rank_median_ms": [r[0] for r in ranks],
           "rank_spread": max(r[0] for r in ranks) / min(r[0] for r in ranks),
           "peak_gib": max(r[2] for r in ranks)}
    if compute is not None:
        row["compute_rank_ms"] = [r[1] for r in ranks]
        row["compute_spread"] = max(r[1] for r in ranks) / min(r[1] for r in ranks)
    return row


def print_rows(rows):
    print(f"{'method':<20} {'W':>2} {'T':>8} {'ms':>10} {'rank spread':>12} {'compute spread':>15} {'peak GiB':>9}")
    for r in rows:
        cs = f"{r['compute_spread']:.3f}" if "compute_spread" in r else "-"
        print(f"{r['method']:<20} {r['world_size']:>2} {r['seq_len']:>8} {r['median_ms']:>10.2f} "
              f"{r['rank_spread']:>12.3f} {cs:>15} {r['peak_gib']:>9.2f}")


def report(paths):
    """Strong scaling: each W > 1 row ÷ the W = 1 `single` (and `single-flash`) time at that T."""
    rows = [r for p in paths for r in json.load(open(p))["rows"]]
    base = {(r["method"], r["seq_len"]): r["median_ms"] for r in rows if r["world_size"] == 1}
    ring = {(r["world_size"], r["seq_len"]): r["median_ms"] for r in rows if r["method"] == "ring-zigzag"}
    print(f"{'method':<20} {'W':>2} {'T':>8} {'ms':>10} {'÷ single':>9} {'÷ single-flash':>15} "
          f"{'÷ ring':>7} {'compute spread':>15} {'peak GiB':>9}")
    for r in sorted(rows, key=lambda r: (r["seq_len"], r["world_size"], r["method"])):
        if r["world_size"] == 1:
            continue
        ratio = lambda key: (f"{r['median_ms'] / base[key]:.3f}" if key in base else "-")  # noqa: E731
        vs_ring = ring.get((r["world_size"], r["seq_len"]))
        cs = f"{r['compute_spread']:.3f}" if "compute_spread" in r else "-"
        print(f"{r['method']:<20} {r['world_size']:>2} {r['seq_len']:>8} {r['median_ms']:>10.2f} "
              f"{ratio(('single', r['seq_len'])):>9} {ratio(('single-flash', r['seq_len'])):>15} "
              f"{(r['median_ms'] / vs_ring if vs_ring else float('nan')):>7.3f} {cs:>15} {r['peak_gib']:>9.2f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", default="32K,128K", help="total sequence lengths, e.g. 32K,128K,512K")
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--methods", default=None, help="comma-separated subset of the rows")
    p.add_argument("--out", default=None, help="JSON folder (default $OUT, else benchmarks/results/)")
    p.add_argument("--report", nargs="+", default=None, help="JSON files of W=1 and W>1 runs to combine")
    args = p.parse_args()
    if args.report:
        report(args.report)
        return

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        # flex compiles once per shape and mask; allow this run's many shapes to stay compiled.
        torch._dynamo.config.cache_size_limit = 64
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    W, rank = dist.get_world_size(), dist.get_rank()
    specs = methods(W, cuda)
    if args.methods:
        specs = {name: specs[name] for name in args.methods.split(",") if name in specs}
    timer = Timer(cuda)
    rows = []
    for T in (parse_len(t) for t in args.seqlens.split(",")):
        for name, spec in specs.items():
            rows.append(measure(name, spec, T, args, device, dtype, timer))
            if rank == 0:
                print(f"  {name} T={T}: {rows[-1]['median_ms']:.2f} ms", flush=True)
    if rank == 0:
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        record = {
            "benchmark": "sp_softmax", "world_size": W,
            "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
            "torch": torch.__version__, "triton": triton_version, "flash_attn": flash_attn_available(),
            "dtype": str(dtype).removeprefix("torch."), "causal": True,
            "shape": {"B": 1, "H_q": args.hq, "H_kv": args.hkv, "D": args.dim},
            "warmup": args.warmup, "iters": args.iters, "rows": rows,
        }
        out = args.out or os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
        os.makedirs(out, exist_ok=True)
        slug = record["device"].replace(" ", "-").replace("/", "-")
        path = os.path.join(out, f"sp_softmax_W{W}_{args.device}_{slug}.json")
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {path}\n")
        print_rows(rows)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
