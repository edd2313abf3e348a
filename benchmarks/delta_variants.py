"""Variants of the delta rule's Triton module timed against each other in one process.

    python benchmarks/delta_variants.py NAME=PATH[@ROW=warps,stages,block;...] ... \
        [--decays delta,g+beta,gk+beta] [--B 1] [--T 32768] [--keys random|collinear]
        [--gates mild|strong]

Each PATH is a copy of `lasp/kernels/delta/triton.py` with a change to try (e.g. the
committed file from `git show REV:lasp/kernels/delta/triton.py` beside the working tree's);
`@ROW=...` overrides launch rows of `lasp.kernels.common.launch.LAUNCH` for that variant
only (a walk's row gives its widest V-tile, which the walk halves where its programs are
fewer than the GPU's SMs). A variant runs as the module `lasp.kernels.delta.triton`
(`lasp.kernels.compiled` imports its launches from there on every call), so that before and
after share one GPU, one process and the same inputs. Per decay and variant, on
(B, T, 16, 128) bf16 inputs (`kernel_speed.delta_inputs`): the relative error of o and of
every gradient against lasp's torch chunk form in float64 on the first two heads, whether a
second run is bitwise the first (no kernel accumulates atomically: "NO" is a race or a
miscompile), the fwd+bwd median ms and the CUDA µs per kernel. `--keys collinear` draws each
chunk's keys near one direction and β near 1, the UT transform's worst-conditioned inverse
(`collinear_keys`), to compare the variants' errors there; `--gates strong` draws decays
strong enough that KDA's chunks leave the factored form (`strong_gates`). Prints a table
last; JSON to
$OUT/delta_variants.json (or benchmarks/results/). Session 11 used it for the UT transform
and the backward walk (`benchmarks/results/delta_wy_variants_*`, `delta_walk_q_decayed_*`),
session 12 for the chunk states' dtype (`delta_states_bf16_*`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch
import torch.nn.functional as F

from kernel_speed import D, delta_gate, delta_inputs, kernel_times, seeded_randn, time_and_peak
from lasp.kernels.common import launch
from lasp.kernels.common.launch import Launch, chunk_for_head_dims
from lasp.kernels.delta import chunk_linear_attention as delta_chunk

MODULE = "lasp.kernels.delta.triton"
GRADS = ("dq", "dk", "dv", "dbeta", "ddecay")
# The UT transform's kernels, whose µs the table adds up (one launch before session 18).
UT_KERNELS = ("_inverse_kernel", "_wy_kernel")


def load_variant(spec: str):
    """NAME=PATH[@ROW=w,s,b;...] -> (name, module, launch overrides)."""
    name, _, rest = spec.partition("=")
    path, _, rows = rest.partition("@")
    module_spec = importlib.util.spec_from_file_location(f"delta_variant_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module          # dataclasses look their module up there
    module_spec.loader.exec_module(module)
    overrides = {}
    for row_spec in filter(None, rows.split(";")):
        row, _, values = row_spec.partition("=")
        if row not in launch.LAUNCH:
            raise ValueError(f"{spec!r}: no LAUNCH row {row!r}")
        overrides[row] = Launch(*(int(x) for x in values.split(",")))
    return name, module, overrides


def collinear_keys(k):
    """(keys, β) to replace k's: each chunk's keys (the delta kernels' chunk for k's head dim)
    spread 0.1 around one random direction (L2-normalised, in k's dtype), β = σ(x + 4) ≈ 0.98.
    I + N of the UT transform then has entries near β everywhere below the diagonal, its worst
    conditioning."""
    rand = seeded_randn(1, k.device)
    B, T, H, K = k.shape
    chunk = chunk_for_head_dims("delta", K, K)
    direction = rand(B, T // chunk, 1, H, K).expand(-1, -1, chunk, -1, -1).reshape(B, T, H, K)
    keys = F.normalize(direction + 0.1 * rand(B, T, H, K), dim=-1)
    return keys.to(k.dtype).requires_grad_(), torch.sigmoid(rand(B, T, H) + 4).requires_grad_()


def strong_gates(g, gk):
    """(g, gk) to replace the benchmark's mild decays: log σ(x − 2) ≈ −2.1 a token, so a
    64-token chunk's per-key Γ falls far below −FACTORED_LOG_DECAY (KDA's exact branch)."""
    rand = seeded_randn(2, g.device)
    return (F.logsigmoid(rand(*g.shape) - 2).requires_grad_(), F.logsigmoid(rand(*gk.shape) - 2).requires_grad_())


def oracle(leaves, gate, do):
    """o and every gradient of lasp's torch chunk form in float64 on the first two heads."""
    ref = [x[:, :, :2].detach().double().requires_grad_() for x in leaves]
    o = delta_chunk(ref[0], ref[1], ref[2], None if gate is None else ref[4], ref[3], scale=D ** -0.5)[0]
    return o.detach(), torch.autograd.grad(o, ref, do[:, :, :2].double())


def run_variant(module, leaves, gate, do, want_o, want_grads):
    """(errors by name, whether a second run is bitwise the first, fwd+bwd median ms, µs per
    kernel) of one variant at one decay."""
    q, k, v, beta = leaves[:4]

    def forward():
        return module.triton_linear_attention(q, k, v, gate, beta, scale=D ** -0.5)[0]

    def outputs():
        o = forward()
        return (o,) + torch.autograd.grad(o, leaves, do)

    def step():
        torch.autograd.grad(forward(), leaves, do)
    first, again = outputs(), outputs()
    o, got = first[0], first[1:]
    errors = {"o": ((o[:, :, :2].double() - want_o).norm() / want_o.norm()).item()}
    for name, mine, ref in zip(GRADS, got, want_grads):
        errors[name] = ((mine[:, :, :2].double() - ref).norm() / ref.norm()).item()
    repeatable = all(torch.equal(a, b) for a, b in zip(first, again))
    ms, _ = time_and_peak(step, warmup=10, rep=50)
    return errors, repeatable, ms, kernel_times(step)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="+", help="NAME=PATH[@ROW=warps,stages,block;...]")
    parser.add_argument("--decays", default="delta,g+beta,gk+beta")
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--T", type=int, default=32768)
    parser.add_argument("--keys", choices=("random", "collinear"), default="random")
    parser.add_argument("--gates", choices=("mild", "strong"), default="mild")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()
    variants = [load_variant(spec) for spec in args.variants]
    (q, k, v, beta, g, gk), do = delta_inputs(args.B, args.T)
    if args.keys == "collinear":
        k, beta = collinear_keys(k)
    if args.gates == "strong":
        g, gk = strong_gates(g, gk)
    defaults, original = dict(launch.LAUNCH), sys.modules.get(MODULE)
    results = []
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, B=args.B, T=args.T, keys=args.keys,
                gates=args.gates, results=results)
    try:
        for decay in args.decays.split(","):
            gate = delta_gate(decay, g, gk)
            leaves = [q, k, v, beta] + ([] if gate is None else [gate])
            want_o, want_grads = oracle(leaves, gate, do)
            for name, module, overrides in variants:
                launch.LAUNCH.clear()
                launch.LAUNCH.update(defaults, **overrides)
                sys.modules[MODULE] = module
                errors, repeatable, ms, per_kernel = run_variant(module, leaves, gate, do, want_o, want_grads)
                results.append(dict(variant=name, decay=decay, B=args.B, T=args.T, ms=ms, errors=errors,
                                    repeatable=repeatable,
                                    kernels_us={kk: round(us, 1) for kk, us in per_kernel.items() if us > 20}))
                print(json.dumps(results[-1]), flush=True)
                os.makedirs(args.out, exist_ok=True)
                with open(os.path.join(args.out, "delta_variants.json"), "w") as f:
                    json.dump(meta, f, indent=1)
    finally:
        launch.LAUNCH.clear()
        launch.LAUNCH.update(defaults)
        sys.modules[MODULE] = original
    print(f"\n{meta['device']}, B = {args.B}, T = {args.T}, {args.keys} keys, {args.gates} gates")
    print(f"{'variant':28s} {'decay':8s} {'ms':>8s} {'max err':>9s} {'repeats':>7s} {'UT us':>7s} "
          f"{'walk-back us':>12s}")
    for r in results:
        ku = r["kernels_us"]
        print(f"{r['variant']:28s} {r['decay']:8s} {r['ms']:8.3f} {max(r['errors'].values()):9.2e} "
              f"{'yes' if r['repeatable'] else 'NO':>7s} {sum(ku.get(n, 0) for n in UT_KERNELS):7.0f} "
              f"{ku.get('_state_pass_grad_kernel', 0):12.0f}")


if __name__ == "__main__":
    main()
