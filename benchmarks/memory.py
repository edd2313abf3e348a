"""Longest trainable sequence per number of GPUs: per-rank peak memory of linear-llama3-1b
measured on one GPU, extrapolated to W sequence-parallel ranks. Outputs are PROJECTED.

    python benchmarks/memory.py --measure      # GPU, < 2 min: peak memory of one training step
    python benchmarks/memory.py --model-only   # CPU: the longest sequence per W and card size
    python benchmarks/memory.py --model-only --fit $OUT/memory_fit_h100.json
    python benchmarks/memory.py --model-only --long-sequence   # + offload_activations, tile_tokens
    python benchmarks/memory.py --profile-cpu  # CPU, ~2 min: what tiling saves per token (below)

Measured (--measure): one fwd + bwd + bf16 AdamW step of linear-llama3-1b (lasp.models,
activation checkpointing on, patterns L and LLLN, batch 1) at a few local lengths; the peak
(torch.cuda.max_memory_allocated) minus what is allocated before the step (parameters and
optimizer states) is the step's working memory, fitted as a + b·tokens.

Projected, per rank at W ranks and L = T/W local tokens:

    model states  16 B/parameter / W   (lasp-train: fp32 master weights, fp32 gradients and
                                        AdamW moments, sharded by FSDP over the W ranks)
    working       a + b·L              (the fit)
    LASP-2        2·W·H·K·V·4          (the gathered summaries of one layer and their gradients;
                                        with checkpointing one layer at a time)
    LASP-2H       (T − L)·kv + f·T·(2·H·D·2 + 2·H_kv·D·4)
                                       (softmax layers: the gathered bf16 K/V of the whole
                                        sequence, kv = 2·H_kv·D·2 bytes per token, beyond the local
                                        ones the fit holds; in the backward the full-length dK/dV,
                                        expanded to the query heads, and their fp32 copies for the
                                        reduce-scatter, for the fraction f of heads gathered at once
                                        under lasp2h's 1 GiB budget; one layer at a time)

against a card's capacity less `--reserve` GB (CUDA context, allocator slack). The longest
sequence is W times the largest L that fits.

`--long-sequence` projects the model with `offload_activations=True, tile_tokens=16384`
(DeepSpeed ALST's recipe): the fit's bytes per token less what those options take off the
GPU, per token of L:

    offloaded     layers · hidden · 2          (each checkpointed block input, bf16; to host)
                  + hidden · (4 + 2 + 2)       (the final norm's fp32 input and bf16 output,
                                                the loss chunks' hidden states; to host)
    tiled         TILED_SAVING_PER_TOKEN       (one block's recomputation with its norms, the
                                                MLP and the linear attention's output path
                                                tiled, against untiled: `--profile-cpu`
                                                measures it at linear-llama3-1b's widths on the
                                                CPU, torch's MemTracker, the linear-attention
                                                kernel replaced by a stand-in that saves and
                                                allocates what the Triton op does)

The host then holds the offloaded bytes (the `host` column: pinned memory, per rank).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
INTERIM = RESULTS / "memory_fit_interim.json"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CARDS_GB = (80.0, 141.0)
WORLD_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
PATTERNS = ("L", "LLLN")
SHAPE = dict(layers=16, heads=32, kv_heads=8, head_dim=64)     # linear-llama3-1b
GATHER_BUDGET_BYTES = 1 << 30                                   # lasp.parallel.lasp2h
HIDDEN = 2048
LONG_SEQUENCE_TILE = 16384
# `--profile-cpu` (2026-12-06, torch 2.13 CPU): one block's peak recomputation 120.0 KiB/token
# untiled, 36.0 KiB/token with tile_tokens (its norms, MLP and the linear attention's output
# path a tile at a time; 60.1 KiB/token when only the norms and the MLP were tiled).
TILED_SAVING_PER_TOKEN = (120.0 - 36.0) * KiB


def offloaded_bytes_per_token(layers: int = SHAPE["layers"], hidden: int = HIDDEN) -> float:
    """What offload_activations moves to the host per token (module docstring)."""
    return layers * hidden * 2 + hidden * (4 + 2 + 2)


def long_sequence_fit(fit: dict) -> dict:
    """The fit with offload_activations and tile_tokens: bytes per token less what they take off the GPU."""
    saving = offloaded_bytes_per_token() + TILED_SAVING_PER_TOKEN
    return {**fit, "bytes_per_token": {p: b - saving for p, b in fit["bytes_per_token"].items()},
            "host_bytes_per_token": offloaded_bytes_per_token(),
            "source": fit["source"] + f"; offload_activations + tile_tokens={LONG_SEQUENCE_TILE}: "
                      f"{saving / 1e3:.1f} KB/token off the GPU (projected)"}


def state_bytes_per_layer(shape=SHAPE) -> int:
    """One rank's fp32 summary of one linear layer: H·K·V·4 (+ one decay per head)."""
    return shape["heads"] * (shape["head_dim"] ** 2 + 1) * 4


def kv_bytes_per_token(shape=SHAPE) -> int:
    return 2 * shape["kv_heads"] * shape["head_dim"] * 2


def heads_fraction(T: float, shape=SHAPE) -> float:
    """Fraction of the KV heads lasp2h gathers at once (its GATHER_BUDGET_BYTES rule)."""
    per_head = 2 * T * shape["head_dim"] * 2
    heads = max(1, min(shape["kv_heads"], int(GATHER_BUDGET_BYTES // per_head)))
    return heads / shape["kv_heads"]


def per_rank_bytes(fit: dict, pattern: str, W: int, L: float, state_bytes_per_param: float = 16.0,
                   shape=SHAPE) -> dict:
    """Projected peak bytes of one rank, by part."""
    T = W * L
    parts = dict(model_states=state_bytes_per_param * fit["params"][pattern] / W,
                 working=fit["fixed_bytes"][pattern] + fit["bytes_per_token"][pattern] * L,
                 lasp2_states=2 * W * state_bytes_per_layer(shape) if W > 1 else 0.0, lasp2h=0.0)
    host = fit.get("host_bytes_per_token", 0.0) * L
    if "N" in pattern and W > 1:
        H, Hkv, D = shape["heads"], shape["kv_heads"], shape["head_dim"]
        backward = heads_fraction(T, shape) * T * (2 * H * D * 2 + 2 * Hkv * D * 4)
        parts["lasp2h"] = (T - L) * kv_bytes_per_token(shape) + backward
    parts["total"] = sum(parts.values())
    parts["host"] = host
    return parts


def max_local_tokens(fit: dict, pattern: str, W: int, capacity_gb: float, reserve_gb: float = 2.0,
                     state_bytes_per_param: float = 16.0, granule: int = 1024) -> int:
    """The largest local length (a multiple of `granule`) whose projected peak fits the card;
    0 if not even one granule fits. Bisection: the peak grows with L."""
    limit = (capacity_gb - reserve_gb) * 1e9

    def fits(L):
        return per_rank_bytes(fit, pattern, W, L, state_bytes_per_param)["total"] <= limit
    if not fits(granule):
        return 0
    lo, hi = 1, 2
    while fits(hi * granule):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * granule) else (lo, mid)
    return lo * granule


def longest_rows(fit: dict, reserve_gb: float = 2.0, state_bytes_per_param: float = 16.0) -> list[dict]:
    rows = []
    for pattern in PATTERNS:
        for card in CARDS_GB:
            for W in WORLD_SIZES:
                L = max_local_tokens(fit, pattern, W, card, reserve_gb, state_bytes_per_param)
                parts = per_rank_bytes(fit, pattern, W, L, state_bytes_per_param)
                rows.append(dict(pattern=pattern, card_gb=card, W=W, max_local_tokens=L, max_tokens=W * L,
                                 **{f"{k}_gb": v / 1e9 for k, v in parts.items()}))
    return rows


def fmt_tokens(n: float) -> str:
    return f"{n / MiB:.2f}M" if n >= MiB else f"{n / KiB:.0f}K"


def run_model(fit_path: Path, out_dir: Path, reserve_gb: float, state_bytes_per_param: float,
              long_sequence: bool = False) -> dict:
    fit = json.loads(fit_path.read_text())
    if long_sequence:
        fit = long_sequence_fit(fit)
    rows = longest_rows(fit, reserve_gb, state_bytes_per_param)
    print(f"fit: {fit_path.name}: {fit['device']}; {fit['source']}")
    options = (f"activation checkpointing, offload_activations, tile_tokens={LONG_SEQUENCE_TILE}" if long_sequence
               else "activation checkpointing")
    print(f"\nPROJECTED longest sequence of linear-llama3-1b (batch 1, {options}; model states "
          f"{state_bytes_per_param:g} B/param sharded over W; {reserve_gb:g} GB reserved per card)")
    print(f"{'pattern':>7} {'card':>5} {'W':>4} {'max T':>9} {'T/W':>8} {'states':>7} {'working':>8} "
          f"{'LASP-2':>7} {'LASP-2H':>8} {'host':>6} GB")
    for r in rows:
        print(f"{r['pattern']:>7} {r['card_gb']:5.0f} {r['W']:4d} {fmt_tokens(r['max_tokens']):>9} "
              f"{fmt_tokens(r['max_local_tokens']):>8} {r['model_states_gb']:7.1f} {r['working_gb']:8.1f} "
              f"{r['lasp2_states_gb']:7.2f} {r['lasp2h_gb']:8.1f} {r['host_gb']:6.1f}")
    paper = next(r for r in rows if r["pattern"] == "L" and r["card_gb"] == 80 and r["W"] == 128)
    print(f"\nLASP-2 paper (Table 6, A100-80GB, no checkpointing stated): 2048K on 128 GPUs (16K/GPU), 57.8 GB/GPU "
          f"at 1024K on 64. PROJECTED here for an 80 GB card, W=128, pattern L: {fmt_tokens(paper['max_tokens'])}.")
    one_gpu = next(r for r in rows if r["pattern"] == "L" and r["card_gb"] == 80 and r["W"] == 1)
    print(f"Longest sequence on one 80 GB GPU, pattern L: {fmt_tokens(one_gpu['max_tokens'])} "
          f"({options}; PROJECTED)")
    result = dict(label="PROJECTED (memory model from a one-GPU fit, not a measurement)", fit=fit_path.name,
                  long_sequence=long_sequence,
                  fit_device=fit["device"], fit_source=fit["source"], reserve_gb=reserve_gb,
                  state_bytes_per_param=state_bytes_per_param, rows=rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "interim" if fit["source"].startswith("interim") else fit_path.stem.removeprefix("memory_fit_")
    tag += "_long_sequence" if long_sequence else ""
    path = out_dir / f"memory_projection_{tag}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return result


def fit_line(xs, ys) -> tuple[float, float]:
    """Least-squares (intercept, slope); intercept clamped at 0."""
    n = len(xs)
    if n == 1:
        return 0.0, ys[0] / xs[0]
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return max(0.0, my - slope * mx), slope


def build_interim() -> dict:
    """From committed lasp-train peaks (FSDP, fp32 master: 16 B/param at W=1), activation
    checkpointing on: H200 131K tokens, L 48.69 GB, LLLN 48.43 GB
    (benchmarks/results/train_gpu_check_1gpu_h200_2026-12-03.json); working memory taken
    proportional to the tokens (one point per pattern)."""
    runs = json.loads((RESULTS / "train_gpu_check_1gpu_h200_2026-12-03.json").read_text())["runs"]
    params = {"L": 1302924288, "LLLN": 1286146816}
    per_token = {}
    for r in runs:
        if r["activation_checkpointing"] and r["status"] == "ok":
            per_token[r["pattern"]] = (r["peak_memory_gb"] * 1e9 - 16 * params[r["pattern"]]) / r["tokens_per_gpu"]
    return dict(device="NVIDIA H200 (interim: derived from lasp-train peaks, not a --measure run)",
                source="interim: lasp-train peak memory at 131K tokens with checkpointing (H200, 2026-12-03) minus "
                       "16 B/param of FSDP fp32 model states; working memory proportional to tokens (assumption)",
                params=params, fixed_bytes={p: 0.0 for p in PATTERNS}, bytes_per_token=per_token,
                points={})


def measure(out_dir: Path, lengths=(16384, 32768, 65536, 131072), long_sequence: bool = False) -> Path:
    """Peak memory (and tokens/s) of one training step per pattern and length on this GPU;
    `long_sequence`: with offload_activations and tile_tokens, pattern L, up to 1M tokens."""
    import torch
    import triton

    from lasp.models import LinearLlamaForCausalLM, linear_llama_config

    start = time.perf_counter()
    points, params, fixed, slope, states = {}, {}, {}, {}, {}
    options = dict(offload_activations=True, tile_tokens=LONG_SEQUENCE_TILE) if long_sequence else {}
    for pattern in ("L",) if long_sequence else PATTERNS:
        torch.manual_seed(0)
        config = linear_llama_config("linear-llama3-1b", layer_pattern=pattern, activation_checkpointing=True,
                                     **options)
        with torch.device("cuda"):
            model = LinearLlamaForCausalLM(config).to(torch.bfloat16)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        params[pattern] = sum(p.numel() for p in model.parameters())

        def step(L):
            ids = torch.randint(0, config.vocab_size, (1, L), device="cuda")
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        step(lengths[0])                                  # creates the AdamW states
        points[pattern] = []
        for L in lengths:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            began = time.perf_counter()
            try:
                step(L)
            except torch.OutOfMemoryError:
                opt.zero_grad(set_to_none=True)
                points[pattern].append(dict(tokens=L, status="out of memory"))
                break
            torch.cuda.synchronize()
            seconds = time.perf_counter() - began
            peak = torch.cuda.max_memory_allocated()
            points[pattern].append(dict(tokens=L, base_bytes=base, peak_bytes=peak, working_bytes=peak - base,
                                        step_seconds=seconds))
            print(f"{pattern:>5} {L:7d} tokens: peak {peak / 1e9:6.2f} GB, states {base / 1e9:5.2f} GB, "
                  f"working {(peak - base) / 1e9:6.2f} GB, {L / seconds:8.0f} tokens/s", flush=True)
        ok = [p for p in points[pattern] if "peak_bytes" in p]
        fixed[pattern], slope[pattern] = fit_line([p["tokens"] for p in ok], [p["working_bytes"] for p in ok])
        states[pattern] = ok[0]["base_bytes"]
        model = opt = None      # freed (not `del`: step() names them)
        torch.cuda.empty_cache()
    if long_sequence:   # the projection's other pattern, so that the fit file keeps its shape
        for table in (points, params, fixed, slope, states):
            table["LLLN"] = table["L"]
    data = dict(device=torch.cuda.get_device_name(),
                source="measured: benchmarks/memory.py --measure" + (" --long-sequence (pattern L only)"
                                                                     if long_sequence else ""),
                torch=torch.__version__, triton=triton.__version__, params=params, fixed_bytes=fixed,
                bytes_per_token=slope, measured_state_bytes=states, points=points,
                notes="bf16 parameters, bf16 AdamW, activation checkpointing, batch 1, no packing; working = "
                      "peak - allocated before the step; step_seconds: the first step at a length (not warmed up)"
                      + (f"; offload_activations, tile_tokens={LONG_SEQUENCE_TILE}" if long_sequence else ""),
                seconds=time.perf_counter() - start)
    name = "h200" if "H200" in data["device"] else "h100" if "H100" in data["device"] else "gpu"
    name += "_long_sequence" if long_sequence else ""
    path = out_dir / f"memory_fit_{name}.json"
    path.write_text(json.dumps(data, indent=1))
    print(f"fit: working = {fixed} + {slope} B/token -> {path}")
    return path


def profile_cpu(lengths=(256, 512), layers: int = 2, tile_tokens: int = 64) -> dict:
    """Peak activation bytes per token of one fwd + bwd of linear-llama3-1b's widths (`layers`
    blocks, a 512-token vocabulary, bf16, CPU, torch's MemTracker) with activation
    checkpointing, without and with offload_activations + tile_tokens: the slope between
    `lengths`. The linear-attention op is a stand-in with the Triton op's memory (saves q, k,
    v; the backward allocates dq, dk, dv) and offloaded tensors are not kept (the host's)."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    import lasp.layers.linear_attention as linear_attention
    import lasp.models.linear_llama as linear_llama
    from lasp.models import LinearLlamaForCausalLM, linear_llama_config

    class TritonMemory(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            ctx.save_for_backward(q, k, v)
            return v.clone()

        @staticmethod
        def backward(ctx, do):
            q, k, _ = ctx.saved_tensors
            return torch.empty_like(q), torch.empty_like(k), do.clone()

    class HostSide(torch.autograd.graph.saved_tensors_hooks):
        """HostOffload's choice of tensors; what it offloads is not device memory."""
        def __init__(self):
            def pack(t):
                small = t.numel() * t.element_size() < linear_llama.OFFLOAD_MIN_BYTES
                return t if isinstance(t, torch.nn.Parameter) or small else (t.shape, t.dtype)

            def unpack(packed):
                return packed if isinstance(packed, torch.Tensor) else torch.empty(packed[0], dtype=packed[1])
            super().__init__(pack, unpack)

    saved_op, saved_offload = linear_attention.linear_attention_op, linear_llama.HostOffload
    linear_attention.linear_attention_op = lambda q, k, v, *args, **kwargs: TritonMemory.apply(q, k, v)
    linear_llama.HostOffload = HostSide
    try:
        result = {}
        for name, options in (("checkpointing", {}),
                              ("offload+tiles", dict(offload_activations=True, tile_tokens=tile_tokens))):
            peaks = []
            for T in lengths:
                torch.manual_seed(0)
                config = linear_llama_config("linear-llama3-1b", num_hidden_layers=layers, vocab_size=512,
                                             activation_checkpointing=True, **options)
                model = LinearLlamaForCausalLM(config).to(torch.bfloat16)
                ids = torch.randint(0, 512, (1, T))
                tracker = MemTracker()
                tracker.track_external(model)
                with tracker:
                    model(ids, labels=ids).loss.backward()
                peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
                peaks.append(peak["Total"] - peak[_MemRefType.PARAM] - peak[_MemRefType.GRAD])
            result[name] = (peaks[1] - peaks[0]) / (lengths[1] - lengths[0])
            print(f"{name:>14}: {result[name] / KiB:6.1f} KiB/token (peak activations, slope over {lengths})")
    finally:
        linear_attention.linear_attention_op, linear_llama.HostOffload = saved_op, saved_offload
    return result


def default_fit() -> Path:
    measured = sorted(RESULTS.glob("memory_fit_h*.json"), key=lambda p: p.stat().st_mtime)
    return measured[-1] if measured else INTERIM


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--measure", action="store_true", help="measure peak memory on this GPU")
    mode.add_argument("--model-only", action="store_true", help="project from a fit JSON (CPU)")
    mode.add_argument("--build-interim", action="store_true", help="rebuild the interim fit JSON")
    mode.add_argument("--profile-cpu", action="store_true",
                      help="CPU: peak activation bytes per token without and with offload + tiles")
    parser.add_argument("--long-sequence", action="store_true",
                        help=f"with offload_activations and tile_tokens={LONG_SEQUENCE_TILE} (--measure: pattern L "
                             "at 128K-1M tokens)")
    parser.add_argument("--fit", type=Path, default=None, help="fit JSON (default: newest measured, else interim)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or RESULTS))
    parser.add_argument("--reserve", type=float, default=2.0, help="GB per card kept free (context, allocator)")
    parser.add_argument("--state-bytes-per-param", type=float, default=16.0,
                        help="model-state bytes per parameter before FSDP sharding (16: fp32 master + grads + AdamW)")
    args = parser.parse_args(argv)
    if args.build_interim:
        INTERIM.write_text(json.dumps(build_interim(), indent=1))
        print(f"wrote {INTERIM}")
        return
    if args.profile_cpu:
        profile_cpu()
        return
    if args.measure:
        args.out.mkdir(parents=True, exist_ok=True)
        lengths = (131072, 262144, 524288, 1048576) if args.long_sequence else (16384, 32768, 65536, 131072)
        args.fit = measure(args.out, lengths, args.long_sequence)
        run_model(args.fit, args.out, args.reserve, args.state_bytes_per_param)
        return
    run_model(args.fit or default_fit(), args.out, args.reserve, args.state_bytes_per_param, args.long_sequence)


if __name__ == "__main__":
    main()
