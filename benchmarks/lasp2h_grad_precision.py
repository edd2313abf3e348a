"""LASP-2H key/value gradient precision against W: summed in fp32 vs in bf16 (issue #22).

    LASP_SHARED_GPU=1 python benchmarks/lasp2h_grad_precision.py       # W = 2, 4 ranks on ONE GPU, gloo
    python benchmarks/lasp2h_grad_precision.py                         # W GPUs, NCCL
    python benchmarks/lasp2h_grad_precision.py --device cpu --seqlen 256 --dim 32   # CPU smoke test

bf16 inputs, 12K tokens by default, packed documents crossing ranks, zigzag, GQA 8/2 heads,
D = 128, causal. Each W runs LASP-2H twice: with its
key/value gradients summed in fp32 (`lasp.parallel.lasp2h.KV_GRAD_ACCUMULATION`, the
default) and in bf16 (the sum over the local query segments and the reduce-scatter both in
bf16, as before the fix). Each row gives ‖a−b‖/‖b‖ over the whole sequence for o, dq, dk, dv
against the fp32 result on one device (the `math` backend on the bf16 values, computed on
rank 0 and broadcast); the row "single" is the one-device bf16 result (default backend):
the floor. Checks precision only, not speed. Prints a table; writes JSON to $OUT (else
benchmarks/results/) as lasp2h_grad_precision_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SHARED_GPU = os.environ.get("LASP_SHARED_GPU") == "1"
NAMES = ("o", "dq", "dk", "dv")


def documents(T: int) -> list[int]:
    """Offsets of packed documents that cross ranks at every W up to 8 (fractions of T)."""
    return sorted({0, 1000 * T // 12288, 5000 * T // 12288, 9000 * T // 12288, 9001 * T // 12288, T})


def attention_and_grads(q, k, v, do, fn):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = fn(*leaves)
    return [o.detach(), *torch.autograd.grad(o, leaves, do)]


def whole_rel_err(a_local, b_local) -> float:
    """‖a − b‖ / ‖b‖ over the whole sequence, from each rank's shard."""
    a, b = a_local.double(), b_local.double()
    squares = torch.stack([(a - b).square().sum(), b.square().sum()])
    dist.all_reduce(squares)
    return (squares[0] / squares[1]).sqrt().item()


def run_rank(rank, W, port, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from lasp.kernels.softmax_attention import softmax_attention
    from lasp.parallel import SequenceLayout, lasp2h
    cuda = args.device == "cuda"
    if cuda and not SHARED_GPU:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=W, device_id=torch.device("cuda", rank))
    else:
        if cuda:
            torch.cuda.set_device(0)
        dist.init_process_group("gloo", rank=rank, world_size=W)
    device, T = args.device, args.seqlen
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(1, T, H, args.dim, device=device, generator=g).bfloat16()
                   for H in (args.hq, args.hkv, args.hkv, args.hq))
    cu = torch.tensor(documents(T), dtype=torch.int32, device=device)
    mask = dict(cu_seqlens_q=cu, cu_seqlens_k=cu)
    want = [torch.empty(x.shape, device=device) for x in (q, q, k, v)]
    rows = []
    if rank == 0:
        want = attention_and_grads(*(x.float() for x in (q, k, v, do)),
                                   lambda *x: softmax_attention(*x, backend="math", **mask))
        want = [x.contiguous() for x in want]    # broadcast sends the memory as it lies
        single = attention_and_grads(q, k, v, do, lambda *x: softmax_attention(*x, **mask))
        rows.append({"W": 1, "sums": "single", **{n: ((a.double() - b).norm() / b.norm()).item()
                                                   for n, a, b in zip(NAMES, single, want)}})
    for x in want:
        dist.broadcast(x, 0)
    layout = SequenceLayout(T, W, rank, "zigzag")
    for accumulation in (torch.float32, torch.bfloat16):
        lasp2h.KV_GRAD_ACCUMULATION = accumulation
        got = attention_and_grads(*(layout.shard(x) for x in (q, k, v, do)),
                                  lambda *x: lasp2h.lasp2h_attention(*x, layout=layout, cu_seqlens=cu))
        errors = {n: whole_rel_err(a, layout.shard(b)) for n, a, b in zip(NAMES, got, want)}
        rows.append({"W": W, "sums": str(accumulation).removeprefix("torch."), **errors})
    if rank == 0:
        results.put(rows)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-sizes", default="2,4", help="comma-separated W (default 2,4)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--seqlen", type=int, default=12288, help="tokens of the whole sequence (a multiple of 2W)")
    p.add_argument("--hq", type=int, default=8, help="query heads")
    p.add_argument("--hkv", type=int, default=2, help="key/value heads")
    p.add_argument("--dim", type=int, default=128, help="head dim")
    p.add_argument("--out", default=None, help="JSON folder (default $OUT, else benchmarks/results/)")
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for W in (int(w) for w in args.world_sizes.split(",")):
        if args.device == "cuda" and not SHARED_GPU and torch.cuda.device_count() < W:
            print(f"W={W}: needs {W} GPUs, or LASP_SHARED_GPU=1 (ranks sharing one GPU over gloo); skipped")
            continue
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        results = ctx.Queue()
        procs = [ctx.Process(target=run_rank, args=(r, W, port, args, results)) for r in range(W)]
        for proc in procs:
            proc.start()
        found = results.get(timeout=1800)
        for proc in procs:
            proc.join()
        if any(proc.exitcode for proc in procs):
            raise SystemExit(f"W={W}: a rank failed")
        single_done = any(r["sums"] == "single" for r in rows)
        rows += [r for r in found if not (single_done and r["sums"] == "single")]
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"LASP-2H ‖a−b‖/‖b‖ vs fp32 on one device; {device}, T={args.seqlen}, H={args.hq}/{args.hkv}, "
          f"D={args.dim}, zigzag, packed, shared GPU={SHARED_GPU}")
    print(f"{'W':>3} {'sums':>9} " + " ".join(f"{n:>9}" for n in NAMES))
    for r in rows:
        print(f"{r['W']:>3} {r['sums']:>9} " + " ".join(f"{r[n]:9.2e}" for n in NAMES))
    out = args.out or os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out, exist_ok=True)
    record = {"device": device, "torch": torch.__version__, "shared_gpu": SHARED_GPU, "seqlen": args.seqlen,
              "hq": args.hq, "hkv": args.hkv, "dim": args.dim, "documents": documents(args.seqlen), "rows": rows}
    slug = "shared_gpu" if SHARED_GPU and args.device == "cuda" else args.device
    path = os.path.join(out, f"lasp2h_grad_precision_{slug}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
