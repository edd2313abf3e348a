"""Mixture-of-Memories layer, fwd+bwd on one GPU: lasp's MoM vs k runs of a plain
linear-attention layer of the same width, vs fla's MoM layer, and a CUDA-graph step.

    python benchmarks/mom.py [--tokens 8192,32768,131072] [--profile] [--out DIR]

bf16, hidden 2048, 16 heads of 128, M = 4 memories, top k = 2, B = 1, fixed (RetNet)
decay. Rows, per sequence length T (median ms of forward + backward of the layer, its
input and every parameter, after warm-up; peak memory above the inputs):

- `lasp MoM`: the layer as shipped (shared memory on; routed keys/values projected by a
  grouped matmul on sm90/sm100); `lasp MoM no-shared` (shared memory off);
  `lasp MoM all-M projections` (every memory's key/value projection for every token
  and the routed rows selected: the path off sm90/sm100, M/k times the key/value FLOPs).
- `plain LinearAttention`: `lasp.layers.LinearAttention` of the same width on the T
  tokens (one run). The baseline "k runs" is k times its time; the MoM rows report
  `x plain·k` = ms ÷ (k · plain ms) (target ≤ 1.25) and `x plain·(k+1)` (the shared
  memory is one more full recurrence: with it MoM runs k + 1 recurrences per token).
- `... CUDA graph`: the plain and the MoM layer rows' fwd+bwd steps captured in one CUDA
  graph each and replayed: the GPU time without the host's launch overhead, which
  bounds an eager MoM layer at short T (MoM launches many more small kernels). Their
  `x plain·k` compares the two graphed rows.
- `lasp MoM op` and `linear_attention op ×k`: the same comparison without projections:
  route + dispatch + ONE varlen Triton call over all (memory) streams + fused combine,
  vs k calls of the kernel on T tokens.
- `fla MomAttention`: fla's layer (flash-linear-attention 0.6.0), hidden 2048, 16 heads
  of 128, expand_v 1, 4 memories, top 2, shared memory, short convolutions (it refuses
  to run without). Its base recurrence is the gated DeltaNet (delta rule with a
  data-dependent decay and qk L2-norm), not plain/fixed-decay linear attention, so its
  row is a reference point, not like for like. If it cannot be imported or run (its
  gated backward refuses triton 3.6 on Hopper) the reason is recorded.
- `lasp MoM train step eager` / `... CUDA graph`: forward, backward and an SGD step of
  the MoM layer, run eagerly and as one captured CUDA graph replayed (the sync-free
  path makes the capture possible); the graph's loss is checked against eager's.

`--profile` also writes mom_profile_T.txt per T: the CUDA kernels of one step of the
MoM op and of the layer, by total GPU time (where the overhead over k plain runs goes).

Prints a table last; writes mom.json (device, versions, shapes, medians, ratios) to
DIR (default $OUT, else benchmarks/results/).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import platform
import traceback

import torch
import triton

import lasp.kernels.mom as mom_kernels
from lasp.kernels import linear_attention, mixture_of_memories, mom_dispatch, mom_route
from lasp.layers import LinearAttention, MixtureOfMemories
from lasp.layers.linear_attention import retnet_log_decay

try:                                # imported as benchmarks.mom, or the repository root on sys.path
    from benchmarks.kernel_speed import time_and_peak
except ModuleNotFoundError:         # run as a script: benchmarks/ is sys.path[0]
    from kernel_speed import time_and_peak

HIDDEN, H, D, M, TOP_K = 2048, 16, 128, 4, 2


def profile_table(step, label, path):
    """Append the GPU-time table of three runs of `step` (after warm-up) to `path`."""
    from torch.profiler import ProfilerActivity, profile
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
    with open(path, "a") as f:
        f.write(f"== {label} (3 steps)\n{table}\n")


def layer_step(layer, x, returns_aux):
    params = [p for p in layer.parameters() if p.requires_grad]
    dout = torch.randn_like(x)

    def step():
        out = layer(x)
        if returns_aux:
            out, aux = out
            torch.autograd.grad([out, aux], [x, *params], [dout, torch.ones_like(aux)], allow_unused=True)
        else:
            out = out[0] if isinstance(out, tuple) else out
            torch.autograd.grad(out, [x, *params], dout, allow_unused=True)
    return step


def op_steps(T, gen):
    """The MoM op and k plain kernel calls on the same q, k, v."""
    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)
    logits = rand(1, T, M).requires_grad_()
    q = rand(1, T, H, D).bfloat16().requires_grad_()
    k = (rand(1, T, M, H, D) / D ** 0.5).bfloat16().requires_grad_()
    v = rand(1, T, M, H, D).bfloat16().requires_grad_()
    g_gamma = retnet_log_decay(H, device="cuda")
    do = rand(1, T, H, D).bfloat16()

    def mom_op():
        weights, indices, _ = mom_route(logits, TOP_K)
        o, _ = mixture_of_memories(q, k, v, weights, mom_dispatch(indices, M), g_gamma=g_gamma)
        torch.autograd.grad(o, [q, k, v, logits], do)

    ks = [k[:, :, m].detach().requires_grad_() for m in range(TOP_K)]
    vs = [v[:, :, m].detach().requires_grad_() for m in range(TOP_K)]

    def plain_ops():
        for km, vm in zip(ks, vs):
            o, _ = linear_attention(q, km, vm, g_gamma=g_gamma)
            torch.autograd.grad(o, [q, km, vm], do)
    return mom_op, plain_ops


def fla_layer():
    """fla's MoM layer, or the reason it is unavailable."""
    try:
        from fla.layers import MomAttention
    except Exception as e:                                  # noqa: BLE001 - recorded, not hidden
        return None, f"import failed: {type(e).__name__}: {e}"
    return MomAttention(hidden_size=HIDDEN, head_dim=D, num_heads=H, expand_v=1, num_memories=M, topk=TOP_K,
                        shared_mem=True, use_short_conv=True), None


def graphed(step):
    """`step` captured in one CUDA graph after two warm-up runs on a side stream:
    (the graph's replay, what the captured call returned)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    return graph.replay, captured


def graph_steps(layer, x):
    """(eager step, graph replay, max relative loss difference) for fwd + bwd + SGD."""
    eager_layer = copy.deepcopy(layer)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3)
    eager_opt = torch.optim.SGD(eager_layer.parameters(), lr=1e-3)
    static_x = x.clone()

    def step(module, optimizer, inp):
        optimizer.zero_grad(set_to_none=False)
        out, aux = module(inp)
        loss = out.float().square().mean() + 0.01 * aux
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(2):                  # the graphed layer gets two warm-up steps: so does eager
        step(eager_layer, eager_opt, x)
    replay, static_loss = graphed(lambda: step(layer, opt, static_x))
    replay()
    eager_loss = step(eager_layer, eager_opt, x)
    torch.cuda.synchronize()
    diff = ((static_loss - eager_loss).abs() / eager_loss.abs()).item()
    return (lambda: step(eager_layer, eager_opt, x)), replay, diff


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="8192,32768,131072")
    parser.add_argument("--profile", action="store_true", help="also write per-kernel GPU-time tables")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()
    results, notes = [], {}
    versions = dict(torch=torch.__version__, triton=triton.__version__, python=platform.python_version())
    for dist_name in ("fla-core", "flash-linear-attention"):
        try:
            versions[dist_name] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            versions[dist_name] = None
    meta = dict(device=torch.cuda.get_device_name(), **versions, dtype="bf16", hidden=HIDDEN, H=H, D=D,
                num_memories=M, top_k=TOP_K, B=1, decay="fixed", notes=notes, results=results)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "mom.json")

    def record(name, T, fn, **extra):
        try:
            ms, peak = time_and_peak(fn, rep=200)
        except Exception as e:                              # noqa: BLE001 - a row that fails says why
            notes[f"{name} T={T}"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"{name:34s} T={T:7d} failed: {notes[f'{name} T={T}']}", flush=True)
            traceback.print_exc()
            return None
        row = dict(method=name, T=T, ms=ms, mtok_s=T / ms / 1e3, peak_gb=peak / 1e9, **extra)
        results.append(row)
        print(f"{name:34s} T={T:7d} {ms:9.3f} ms  peak {row['peak_gb']:6.2f} GB", flush=True)
        with open(path, "w") as f:                           # after every row: a cut-short run keeps its rows
            json.dump(meta, f, indent=1)
        return row

    torch.manual_seed(0)
    dtype = torch.bfloat16
    mom = MixtureOfMemories(HIDDEN, H, D, num_memories=M, top_k=TOP_K).cuda().to(dtype)
    mom_noshared = MixtureOfMemories(HIDDEN, H, D, num_memories=M, top_k=TOP_K,
                                     shared_memory=False).cuda().to(dtype)
    plain = LinearAttention(HIDDEN, H, D).cuda().to(dtype)
    fla, why = fla_layer()
    if fla is None:
        notes["fla MomAttention"] = why
    else:
        fla = fla.cuda().to(dtype)
    for T in (int(t) for t in args.tokens.split(",")):
        gen = torch.Generator(device="cuda").manual_seed(T)
        x = torch.randn(1, T, HIDDEN, device="cuda", generator=gen).to(dtype).requires_grad_()
        base = record("plain LinearAttention", T, layer_step(plain, x, False))
        rows = [record("lasp MoM", T, layer_step(mom, x, True)),
                record("lasp MoM no-shared", T, layer_step(mom_noshared, x, True))]
        grouped_ok = mom_kernels._grouped_mm_ok
        mom_kernels._grouped_mm_ok = lambda *_: False        # the projection path off sm90/sm100
        try:
            rows.append(record("lasp MoM all-M projections", T, layer_step(mom, x, True)))
        finally:
            mom_kernels._grouped_mm_ok = grouped_ok
        # The same fwd+bwd steps replayed from CUDA graphs: GPU time without the host's
        # launch overhead, which bounds the eager MoM step at short T.
        graph_base = graph_row = None
        try:
            graph_base = record("plain LinearAttention CUDA graph", T, graphed(layer_step(plain, x, False))[0])
            graph_row = record("lasp MoM CUDA graph", T, graphed(layer_step(mom, x, True))[0])
        except Exception as e:                              # noqa: BLE001
            notes[f"layer CUDA graph T={T}"] = f"capture failed: {type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        for row, plain_row in [(r, base) for r in rows] + [(graph_row, graph_base)]:
            if row and plain_row:
                row["x_plain_k"] = row["ms"] / (TOP_K * plain_row["ms"])
                row["x_plain_k1"] = row["ms"] / ((TOP_K + 1) * plain_row["ms"])
        mom_op, plain_ops = op_steps(T, gen)
        op = record("lasp MoM op", T, mom_op)
        ops = record(f"linear_attention op x{TOP_K}", T, plain_ops)
        if op and ops:
            op["x_plain_k"] = op["ms"] / ops["ms"]
        if args.profile:
            profile_path = os.path.join(args.out, f"mom_profile_{T}.txt")
            for label, step in (("lasp MoM op", mom_op), (f"linear_attention op x{TOP_K}", plain_ops),
                                ("lasp MoM", layer_step(mom, x, True)),
                                ("plain LinearAttention", layer_step(plain, x, False))):
                profile_table(step, f"{label} T={T}", profile_path)
        if fla is not None:
            fla_row = record("fla MomAttention", T, layer_step(fla, x, False))
            if fla_row and rows[0]:
                rows[0]["speedup_vs_fla"] = fla_row["ms"] / rows[0]["ms"]
        try:
            eager, replay, diff = graph_steps(mom, x.detach())
            notes[f"cuda graph T={T}"] = f"captured; replay loss vs eager rel diff {diff:.1e}"
            record("lasp MoM train step eager", T, eager)
            record("lasp MoM train step CUDA graph", T, replay)
        except Exception as e:                              # noqa: BLE001
            notes[f"cuda graph T={T}"] = f"capture failed: {type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        del x
        torch.cuda.empty_cache()
    with open(path, "w") as f:
        json.dump(meta, f, indent=1)

    print(f"\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
          f"fla-core {versions['fla-core']}, flash-linear-attention {versions['flash-linear-attention']}"
          f" -> {path}")
    print(f"{'method':34s} {'T':>7s} {'ms':>9s} {'Mtok/s':>7s} {'peakGB':>7s} {'x plain·k':>9s} "
          f"{'x plain·(k+1)':>13s} {'x fla':>6s}")
    for r in results:
        cols = [f"{r[key]:.2f}" if r.get(key) is not None else "-"
                for key in ("x_plain_k", "x_plain_k1", "speedup_vs_fla")]
        print(f"{r['method']:34s} {r['T']:7d} {r['ms']:9.3f} {r['mtok_s']:7.2f} {r['peak_gb']:7.2f} "
              f"{cols[0]:>9s} {cols[1]:>13s} {cols[2]:>6s}")
    for key, note in notes.items():
        print(f"note: {key}: {note}")


if __name__ == "__main__":
    main()
