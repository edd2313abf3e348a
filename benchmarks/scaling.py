"""Scaling model of sequence-parallel training, calibrated on one GPU. Every figure it prints
or writes is PROJECTED: one GPU's measured local work plus an α-β model of the collectives.

    python benchmarks/scaling.py --model-only                 # CPU, < 1 min: projected tables
    python benchmarks/scaling.py --calibrate                  # GPU, ~3 min on an H100
    python benchmarks/scaling.py --model-only --calibration $OUT/scaling_calibration_h100.json
    python benchmarks/scaling.py --build-interim              # rebuild the interim calibration

What it models (per rank, per training step of linear-llama3-1b, patterns L and LLLN, batch 1,
T tokens over W ranks, L = T/W local tokens, the slowest rank):

- the rest of the step (projections, MLP, norms, embedding, loss, optimizer): calibrated per
  step as a + b·L from the whole model on one GPU minus its attention ops;
- linear layers: LASP-2 (summarize | all-gather of the summaries overlapped with the output
  phase | walk of the W gathered summaries | state output; the backward mirrors it with grad_q
  as the overlap window), LASP-1 (the same local work and a serial chain of W−1 state hops), the
  alternative exchanges ZeCO All-Scan (the running state pipelined down the chain in pieces,
  arXiv 2507.01004) and a log-depth prefix scan (Kogge-Stone: ⌈log2 W⌉ rounds, one summary
  per round), and ring attention on a linear layer (the local keys/values travel the ring and
  each rank applies each earlier block's state to its queries, overlapped with the hops);
- softmax layers (LLLN): LASP-2H (all-gather of K/V in head groups, the next group's gather
  overlapped with the current group's attention; local causal attention of the L queries over
  the keys up to their position, zigzag-balanced: (2W+1)·L²/4 query-key pairs; a synchronous
  fp32 reduce-scatter of dK/dV) and ring attention (W block steps, each overlapped with a K/V hop);
- activation checkpointing recomputes every layer's forward, collectives included.

Collectives: α-β with the parameters of `Network` (every default stated with its source);
overlap: t = window + comm − η·min(window, comm), η measured on one GPU (`--calibrate`: the
output phase with and without a bandwidth-bound copy kernel on a side stream).

`choose_exchange(world_size, state_bytes, params)` is the pure rule LASP-2 could use to pick
its exchange by W and summary size (not wired into lasp.parallel).

Until a GPU calibration is committed, `--model-only` reads
`benchmarks/results/scaling_calibration_interim.json`, built by `--build-interim` from figures
already measured and committed (REFERENCES.md H100 figures, benchmarks/results/kernels.json);
its `sources` field names each number's origin and each assumption.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
INTERIM = RESULTS / "scaling_calibration_interim.json"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# ---------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class Network:
    """α-β parameters of a cluster's links (seconds, bytes/s). A message of n bytes over one
    hop costs latency + n / bandwidth; a ring collective over W ranks costs W−1 steps of its
    slowest link."""

    name: str = "H100 NVLink + NDR"
    gpus_per_node: int = 8
    """GPUs that share NVLink (DGX/HGX nodes)."""
    intra_bw: float = 345e9
    """Bus bandwidth inside a node: NCCL all-reduce of 1 GiB measured on this workplace's H100
    machines, 329 (2 GPUs), 355 (4) and 361 GB/s (8) (.library/device/KINDS.md); the midpoint.
    Used for all-gather, reduce-scatter and point-to-point hops alike (assumption)."""
    inter_bw: float = 45e9
    """Per GPU across nodes: InfiniBand NDR 400 Gb/s = 50 GB/s, one NIC per GPU, at the ~90%
    NCCL reaches on large messages (assumption)."""
    intra_latency: float = 3e-6
    """Per hop inside a node (assumption: the order of the per-hop latencies NCCL's own tuning
    model uses for NVLink rings, about 0.6-4 µs by protocol, src/graph/tuning.cc)."""
    inter_latency: float = 8e-6
    """Per hop across nodes (assumption: the order of NCCL's tuning-model network latencies,
    about 3-14 µs by protocol)."""
    launch: float = 10e-6
    """Fixed cost of one collective call (kernel launch and NCCL bookkeeping; assumption)."""


A100_NETWORK = Network(
    name="A100 NVLink3 + HDR (assumed)", intra_bw=230e9, inter_bw=22.5e9,
    intra_latency=3e-6, inter_latency=8e-6)
"""A100 (assumptions): NVLink3 600 GB/s per GPU both ways, scaled by the H100 ratio of measured
bus bandwidth to NVLink bandwidth (345/450 per direction → 300·0.77 ≈ 230 GB/s); InfiniBand
HDR 200 Gb/s per GPU = 25 GB/s at 90%; latencies as on H100."""


@dataclass(frozen=True)
class Hardware:
    """A GPU kind: its network, its time relative to the calibrated GPU, and its memory."""

    name: str = "H100 (calibrated)"
    network: Network = field(default_factory=Network)
    compute_scale: float = 1.0
    """Multiplies every calibrated compute time (1 on the calibrated GPU)."""
    memory_gb: float = 80.0


A100 = Hardware(name="A100-80GB (scaled, assumed)", network=A100_NETWORK,
                compute_scale=989 / 312, memory_gb=80.0)
"""A100: bf16 dense peak 312 TFLOP/s against the H100 SXM's 989 (vendor datasheets): every
calibrated H100 time ×3.17 (assumption: the same fraction of peak on both)."""


@dataclass(frozen=True)
class Shape:
    """The sizes of linear-llama3-1b that the model needs (lasp/models/config.py preset;
    tests/benchmarks checks them against it)."""

    layers: int = 16
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 64
    hidden: int = 2048

    def state_bytes(self, transition: str = "scalar") -> int:
        """One rank's summary per layer and chain: fp32 K×V state per head plus its transition
        (identity: none, scalar: one per head, diagonal: K, dense: K×K)."""
        K = V = self.head_dim
        extra = {"identity": 0, "scalar": 1, "diagonal": K, "dense": K * K}[transition]
        return self.heads * (K * V + extra) * 4

    def kv_bytes_per_token(self) -> int:
        """bf16 keys and values of the KV heads (what LASP-2H and the rings send)."""
        return 2 * self.kv_heads * self.head_dim * 2


LINEAR_LLAMA3_1B = Shape()


# ---------------------------------------------------------------------------------------------
# Collectives (seconds). Pure functions of the network, W and bytes.


def nodes(net: Network, W: int) -> int:
    return -(-W // net.gpus_per_node)


def _link(net: Network, inter: bool) -> tuple[float, float]:
    return (net.inter_latency, net.inter_bw) if inter else (net.intra_latency, net.intra_bw)


def ring_bandwidth(net: Network, W: int) -> float:
    """Per-step bandwidth of a ring collective: NVLink inside a node; across nodes NCCL runs
    one ring per NIC (channel), each carrying its share of the data, so a node's NICs together
    bound the step: min(intra_bw, gpus_per_node · inter_bw)."""
    if nodes(net, W) == 1:
        return net.intra_bw
    return min(net.intra_bw, net.gpus_per_node * net.inter_bw)


def all_gather_time(net: Network, W: int, nbytes: float) -> float:
    """Ring all-gather of `nbytes` per rank: W−1 steps, each paying the slowest hop's latency
    and `nbytes` at the ring's bandwidth."""
    if W <= 1:
        return 0.0
    latency = net.inter_latency if nodes(net, W) > 1 else net.intra_latency
    return net.launch + (W - 1) * (latency + nbytes / ring_bandwidth(net, W))


def reduce_scatter_time(net: Network, W: int, nbytes_out: float) -> float:
    """Ring reduce-scatter leaving `nbytes_out` per rank: as the all-gather."""
    return all_gather_time(net, W, nbytes_out)


def chain_hops(net: Network, W: int) -> list[bool]:
    """The W−1 hops of a chain rank 0 → W−1: True where a hop crosses a node boundary."""
    return [(r + 1) % net.gpus_per_node == 0 for r in range(W - 1)]


def chain_time(net: Network, W: int, nbytes: float, pieces: int = 1, per_hop_compute: float = 0.0) -> float:
    """A value handed down the chain 0 → W−1, each rank adding its part (`per_hop_compute`)
    before sending on, cut into `pieces` pipelined pieces: the first piece crosses every hop,
    the others follow one slowest-hop time apart."""
    if W <= 1:
        return 0.0
    hops = [latency + nbytes / pieces / bw + per_hop_compute / pieces
            for latency, bw in (_link(net, inter) for inter in chain_hops(net, W))]
    return net.launch + sum(hops) + (pieces - 1) * max(hops)


def all_scan_time(net: Network, W: int, nbytes: float, per_hop_compute: float = 0.0) -> float:
    """ZeCO's All-Scan: the chain pipelined in the best number of pieces (1..1024)."""
    return min(chain_time(net, W, nbytes, p, per_hop_compute) for p in (2 ** i for i in range(11)))


def log_scan_time(net: Network, W: int, nbytes: float, combine: float = 0.0) -> float:
    """Log-depth (Kogge-Stone) prefix scan: round k sends one summary 2^k ranks on and
    combines it (`combine` seconds); ⌈log2 W⌉ rounds, each a collective call."""
    total, k = 0.0, 0
    while (1 << k) < W:
        latency, bw = _link(net, (1 << k) >= net.gpus_per_node)
        total += net.launch + latency + nbytes / bw + combine
        k += 1
    return total


EXCHANGES = ("all_gather", "log_scan", "all_scan")


@dataclass(frozen=True)
class ExchangeParams:
    """What the exchange of one layer and direction costs besides bytes on the wire."""

    network: Network = field(default_factory=Network)
    walk_step: float = 7e-6
    """Seconds per gathered summary of LASP-2's local walk (lasp.parallel.scan: an exp, a
    multiply and an add per summary, launched from Python: W steps per chain); device time,
    the host running ahead as it does in a GPU-bound training step."""
    combine: float = 7e-6
    """Seconds to compose two summaries (one walk step for scalar decays)."""
    transition_bytes: int = 0
    """Bytes of the transition part of one summary (dense K×K transitions make it large)."""


def exchange_time(kind: str, world_size: int, state_bytes: float, params: ExchangeParams) -> float:
    """Seconds until each rank holds its incoming state, one layer and direction (before
    overlap): `all_gather` (LASP-2: gather W summaries, then walk them), `log_scan`,
    `all_scan` (the running state only, no transition, on the chain)."""
    W, net = world_size, params.network
    if W <= 1:
        return 0.0
    summary = state_bytes + params.transition_bytes
    if kind == "all_gather":
        return all_gather_time(net, W, summary) + W * params.walk_step
    if kind == "log_scan":
        return log_scan_time(net, W, summary, params.combine)
    if kind == "all_scan":
        return all_scan_time(net, W, state_bytes, params.walk_step)
    raise ValueError(f"kind must be one of {EXCHANGES}, got {kind!r}")


def choose_exchange(world_size: int, state_bytes: float, params: ExchangeParams) -> str:
    """The exchange (one of `EXCHANGES`) with the least modelled time for `world_size` ranks
    and `state_bytes` of state per rank; all-gather on ties (it is the one LASP-2 ships)."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if state_bytes <= 0:
        raise ValueError(f"state_bytes must be positive, got {state_bytes!r}")
    times = {kind: exchange_time(kind, world_size, state_bytes, params) for kind in EXCHANGES}
    return min(EXCHANGES, key=lambda kind: (times[kind], EXCHANGES.index(kind)))


def overlapped(window: float, comm: float, efficiency: float) -> float:
    """Time of `window` of compute with `comm` in flight beside it: perfect overlap at
    efficiency 1 (max of the two), none at 0 (their sum)."""
    return window + comm - efficiency * min(window, comm)


# ---------------------------------------------------------------------------------------------
# Calibration: measured (or interim) one-GPU times, interpolated in the local length.


def interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear in x through (xs, ys) (xs ascending); beyond the ends, linear through
    the last two points (local work grows linearly in tokens), never below 0."""
    if len(xs) == 1:
        return ys[0] * x / xs[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass
class Calibration:
    """One GPU's local times in ms (JSON: `scaling_calibration_*.json`).

    linear[phase][i]: the linear-attention phases of one layer at local_tokens[i] (B=1,
    32 heads, head dim 64, bf16, fixed decay): summarize, output, grad_q, grad_kvg, and
    state_output_fwd / state_output_bwd (LASP-2's correction by the incoming state).
    rest[pattern][i]: one whole training step minus its attention ops (activation
    checkpointing on: non-attention forwards counted twice), at rest_tokens[i].
    softmax: fwd+bwd seconds per query-key pair of causal attention (LASP-2H's local
    step, `pair_s`, and the ring's flex block, `ring_pair_s`), `fwd_fraction`, `fixed_s`.
    walk_step_fwd_s / walk_step_bwd_s: LASP-2's walk, per gathered summary.
    overlap_efficiency: η of `overlapped`.
    """

    device: str
    source: str
    local_tokens: list
    linear: dict
    rest_tokens: list
    rest: dict
    softmax: dict
    walk_step_fwd_s: float
    walk_step_bwd_s: float
    overlap_efficiency: float
    sources: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path) -> "Calibration":
        data = json.loads(Path(path).read_text())
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def linear_s(self, phase: str, L: float) -> float:
        return interpolate(self.local_tokens, self.linear[phase], L) / 1e3

    def rest_s(self, pattern: str, L: float) -> float:
        return interpolate(self.rest_tokens, self.rest[pattern], L) / 1e3

    def attention_s(self, pairs: float, ring: bool = False) -> float:
        """fwd+bwd seconds of causal softmax attention over `pairs` query-key pairs."""
        return self.softmax["fixed_s"] + pairs * self.softmax["ring_pair_s" if ring else "pair_s"]


# ---------------------------------------------------------------------------------------------
# Per-layer step times (seconds, one rank, fwd (×2 with checkpointing) + bwd)

LINEAR_METHODS = ("lasp2", "lasp1", "lasp1_paper", "ring", "all_scan", "log_scan")
SOFTMAX_METHODS = ("lasp2h", "ring")
METHODS = {  # method -> (linear layers, softmax layers)
    "lasp2": ("lasp2", "lasp2h"),
    "lasp1": ("lasp1", "lasp2h"),
    "ring": ("ring", "ring"),
    "lasp2+all_scan": ("all_scan", "lasp2h"),
    "lasp2+log_scan": ("log_scan", "lasp2h"),
}


@dataclass(frozen=True)
class Setup:
    """One projected configuration."""

    cal: Calibration
    hw: Hardware = field(default_factory=Hardware)
    shape: Shape = LINEAR_LLAMA3_1B
    checkpointing: bool = True
    transition: str = "scalar"

    def t(self, seconds: float) -> float:
        """A calibrated compute time on this hardware."""
        return seconds * self.hw.compute_scale

    def exchange_params(self) -> ExchangeParams:
        cal = self.cal
        trans = self.shape.state_bytes(self.transition) - self.shape.state_bytes("identity")
        step = self.t(cal.walk_step_fwd_s)
        return ExchangeParams(self.hw.network, step, step, trans)


def linear_layer_time(s: Setup, method: str, W: int, L: float) -> dict:
    """Seconds of one linear layer: {'compute', 'exposed_comm', 'total'}."""
    lin = {p: s.t(s.cal.linear_s(p, L)) for p in s.cal.linear}
    fwd_local = lin["summarize"] + lin["output"]
    bwd_local = lin["grad_q"] + lin["grad_kvg"]
    n_fwd = 2 if s.checkpointing else 1
    if W == 1:
        compute = n_fwd * fwd_local + bwd_local
        return dict(compute=compute, exposed_comm=0.0, total=compute)
    net, eta = s.hw.network, s.cal.overlap_efficiency
    state = s.shape.state_bytes("identity")
    so_f, so_b = lin["state_output_fwd"], lin["state_output_bwd"]
    walk_f, walk_b = s.t(s.cal.walk_step_fwd_s), s.t(s.cal.walk_step_bwd_s)
    if method in ("lasp2", "all_scan", "log_scan"):
        summary = s.shape.state_bytes(s.transition)
        if method == "lasp2":       # the gather, then the walk over the W gathered summaries
            comm_f = comm_b = all_gather_time(net, W, summary)
            walks = (W * walk_f, W * walk_b)
        elif method == "all_scan":  # each rank updates the running state as it passes
            comm_f, comm_b = all_scan_time(net, W, state, walk_f), all_scan_time(net, W, state, walk_b)
            walks = (0.0, 0.0)
        else:
            comm_f, comm_b = log_scan_time(net, W, summary, walk_f), log_scan_time(net, W, summary, walk_b)
            walks = (0.0, 0.0)
        fwd = lin["summarize"] + overlapped(lin["output"], comm_f, eta) + walks[0] + so_f
        bwd = so_b + overlapped(lin["grad_q"], comm_b, eta) + walks[1] + lin["grad_kvg"]
    elif method in ("lasp1", "lasp1_paper"):
        # lasp's ring (RingScan): the summary is ready before the chain; the paper's LASP-1
        # computes each rank's K^T V update on the chain (per_hop = the summarize phase).
        per_hop_f = walk_f + (lin["summarize"] if method == "lasp1_paper" else 0.0)
        per_hop_b = walk_b + (lin["summarize"] if method == "lasp1_paper" else 0.0)
        fwd = fwd_local + chain_time(net, W, state, 1, per_hop_f) + so_f
        bwd = so_b + bwd_local + chain_time(net, W, state, 1, per_hop_b)
    elif method == "ring":
        # K/V blocks travel the ring; each earlier block's state is built and applied to the
        # local queries (summarize + state output), overlapped with the next hop.
        hop = chain_time(net, 2, s.shape.kv_bytes_per_token() * L)  # one hop (worst: intra)
        if nodes(net, W) > 1:
            hop = max(hop, net.launch + net.inter_latency + s.shape.kv_bytes_per_token() * L / net.inter_bw)
        block_f = lin["summarize"] + so_f
        block_b = so_b + 2 * lin["summarize"]
        fwd = fwd_local + (W - 1) * overlapped(block_f, hop, eta)
        bwd = bwd_local + (W - 1) * overlapped(block_b, hop, eta)
    else:
        raise ValueError(f"unknown linear method {method!r}; use one of {LINEAR_METHODS}")
    total = n_fwd * fwd + bwd
    compute = n_fwd * (fwd_local + so_f) + bwd_local + so_b
    return dict(compute=compute, exposed_comm=total - compute, total=total)


def softmax_pairs(W: int, L: float) -> float:
    """Query-key pairs one rank computes under the zigzag layout: (2W+1)·L²/4 (L²/2 at W=1)."""
    return L * L / 2 if W == 1 else (2 * W + 1) * L * L / 4


def softmax_layer_time(s: Setup, method: str, W: int, L: float) -> dict:
    """Seconds of one softmax layer: {'compute', 'exposed_comm', 'total'}."""
    sm = s.cal.softmax
    net, eta = s.hw.network, s.cal.overlap_efficiency
    n_fwd = 2 if s.checkpointing else 1
    phi = sm["fwd_fraction"]
    kv_local = s.shape.kv_bytes_per_token() * L
    if method == "lasp2h" or W == 1:
        attn = s.t(s.cal.attention_s(softmax_pairs(W, L)))
        fwd, bwd = phi * attn, (1 - phi) * attn
        compute = n_fwd * fwd + bwd
        if W == 1:
            return dict(compute=compute, exposed_comm=0.0, total=compute)
        groups = max(1, math.ceil(kv_local * W / GiB))   # lasp2h.GATHER_BUDGET_BYTES
        gather = all_gather_time(net, W, kv_local / groups)
        fwd_total = gather + (groups - 1) * overlapped(fwd / groups, gather, eta) + fwd / groups
        rs = reduce_scatter_time(net, W, 2 * kv_local)    # fp32 dK/dV: twice the bf16 bytes
        total = n_fwd * fwd_total + bwd + rs
    elif method == "ring":
        block = s.t(s.cal.attention_s(softmax_pairs(W, L) / W, ring=True))
        hop = all_gather_time(net, 2, kv_local) if nodes(net, W) == 1 else \
            net.launch + net.inter_latency + kv_local / net.inter_bw
        fwd_total = phi * block + (W - 1) * overlapped(phi * block, hop, eta)
        bwd_total = (1 - phi) * block + (W - 1) * overlapped((1 - phi) * block, hop, eta)
        compute = W * block * (n_fwd * phi + 1 - phi)
        total = n_fwd * fwd_total + bwd_total
    else:
        raise ValueError(f"unknown softmax method {method!r}; use one of {SOFTMAX_METHODS}")
    return dict(compute=compute, exposed_comm=total - compute, total=total)


def pattern_kinds(pattern: str, layers: int) -> list[str]:
    return [pattern[i % len(pattern)] for i in range(layers)]


def step_time(s: Setup, pattern: str, method: str, W: int, T: float) -> dict:
    """Projected seconds of one training step at T tokens over W ranks (the slowest rank):
    {'step', 'rest', 'attention', 'exposed_comm', 'tokens_per_s_per_gpu'}."""
    L = T / W
    linear_method, softmax_method = METHODS[method]
    kinds = pattern_kinds(pattern, s.shape.layers)
    layers = [linear_layer_time(s, linear_method, W, L) if k == "L" else softmax_layer_time(s, softmax_method, W, L)
              for k in kinds]
    rest = s.t(s.cal.rest_s(pattern, L))
    attention = sum(x["total"] for x in layers)
    step = rest + attention
    return dict(step=step, rest=rest, attention=attention, exposed_comm=sum(x["exposed_comm"] for x in layers),
                tokens_per_s_per_gpu=L / step)


def weak_scaling_efficiency(s: Setup, pattern: str, method: str, W: int, T: float) -> float:
    """tokens/s/GPU at W ranks over tokens/s/GPU of one GPU at the same local length."""
    L = T / W
    return step_time(s, pattern, method, 1, L)["step"] / step_time(s, pattern, method, W, T)["step"]


# ---------------------------------------------------------------------------------------------
# Tables

SEQ_LENS = [64 * KiB, 256 * KiB, 1024 * KiB, 2048 * KiB, 4096 * KiB, 8192 * KiB]
WORLD_SIZES = [8, 16, 32, 64, 128, 256]
MIN_LOCAL = 512


def fmt_tokens(n: float) -> str:
    return f"{n / MiB:g}M" if n >= MiB else f"{n / KiB:g}K"


def projection_rows(s: Setup, patterns=("L", "LLLN")) -> list[dict]:
    rows = []
    for pattern in patterns:
        for T in SEQ_LENS:
            for W in WORLD_SIZES:
                if T / W < MIN_LOCAL:
                    continue
                res = {m: step_time(s, pattern, m, W, T) for m in METHODS}
                best = choose_exchange(W, s.shape.state_bytes("identity"), s.exchange_params())
                rows.append(dict(
                    pattern=pattern, T=T, W=W, local_tokens=T // W, lasp2_step_ms=res["lasp2"]["step"] * 1e3,
                    tokens_per_s_per_gpu=res["lasp2"]["tokens_per_s_per_gpu"],
                    weak_scaling_efficiency=weak_scaling_efficiency(s, pattern, "lasp2", W, T),
                    lasp2_exposed_comm_ms=res["lasp2"]["exposed_comm"] * 1e3,
                    speedup_over_lasp1=res["lasp1"]["step"] / res["lasp2"]["step"],
                    speedup_over_ring=res["ring"]["step"] / res["lasp2"]["step"],
                    all_scan_step_ms=res["lasp2+all_scan"]["step"] * 1e3,
                    log_scan_step_ms=res["lasp2+log_scan"]["step"] * 1e3, best_exchange=best))
    return rows


def print_projection(rows: list[dict], title: str) -> None:
    print(f"\nPROJECTED ({title}): one training step of linear-llama3-1b, batch 1, activation checkpointing;\n"
          f"exch ms = LASP-2's exposed exchange (collectives not hidden + the walk); x LASP-1 / x ring = their step "
          f"time over LASP-2's; best exchange = choose_exchange")
    print(f"{'pattern':>7} {'T':>6} {'W':>4} {'T/W':>6} {'LASP-2 ms':>10} {'tok/s/GPU':>10} {'weak eff':>8} "
          f"{'exch ms':>8} {'x LASP-1':>8} {'x ring':>7} {'best exchange':>13}")
    for r in rows:
        print(f"{r['pattern']:>7} {fmt_tokens(r['T']):>6} {r['W']:4d} {fmt_tokens(r['local_tokens']):>6} "
              f"{r['lasp2_step_ms']:10.1f} {r['tokens_per_s_per_gpu']:10,.0f} {r['weak_scaling_efficiency']:8.1%} "
              f"{r['lasp2_exposed_comm_ms']:8.2f} {r['speedup_over_lasp1']:8.3f} {r['speedup_over_ring']:7.3f} "
              f"{r['best_exchange']:>13}")


def weak_scaling_rows(s: Setup, local_tokens=(8 * KiB, 32 * KiB, 128 * KiB), patterns=("L", "LLLN")) -> list[dict]:
    """Fixed tokens per GPU, W = 1..256: the curves of the weak-scaling plot."""
    rows = []
    for pattern in patterns:
        for L in local_tokens:
            for W in [1, 2, 4, 8, 16, 32, 64, 128, 256]:
                row = dict(pattern=pattern, local_tokens=L, W=W, T=L * W)
                for m in ("lasp2", "lasp1", "ring", "lasp2+all_scan", "lasp2+log_scan"):
                    row[f"{m}_tokens_per_s_per_gpu"] = step_time(s, pattern, m, W, L * W)["tokens_per_s_per_gpu"]
                rows.append(row)
    return rows


def exchange_table(s: Setup) -> list[dict]:
    """Per layer and direction: exchange time against the local window it hides behind,
    for summary sizes of lasp's configurations and W = 8..256 (scalar transitions for the
    state-only rows; dense rows carry K×K more)."""
    net = s.hw.network
    configs = [("H=32 K=V=64 (1B)", 32 * 64 * 64 * 4, 0), ("H=16 K=V=128", 16 * 128 * 128 * 4, 0),
               ("H=32 K=V=128", 32 * 128 * 128 * 4, 0),
               ("H=16 K=V=128 dense", 16 * 128 * 128 * 4, 16 * 128 * 128 * 4)]
    rows = []
    for name, state, trans in configs:
        params = ExchangeParams(net, s.t(s.cal.walk_step_fwd_s), s.t(s.cal.walk_step_fwd_s), trans)
        for W in WORLD_SIZES:
            times = {k: exchange_time(k, W, state, params) for k in EXCHANGES}
            rows.append(dict(config=name, state_bytes=state, transition_bytes=trans, W=W,
                             gathered_bytes=W * (state + trans),
                             **{f"{k}_us": v * 1e6 for k, v in times.items()},
                             best=choose_exchange(W, state, params)))
    return rows


def print_exchange_table(rows: list[dict], s: Setup) -> None:
    window = {L: s.t(s.cal.linear_s("output", L)) * 1e6 for L in (4 * KiB, 32 * KiB)}
    print(f"\nPROJECTED exchange per layer and direction, {s.hw.network.name} (µs; the overlap window, the "
          f"output phase, is {window[4 * KiB]:.0f} µs at 4K local tokens and {window[32 * KiB]:.0f} µs at 32K)")
    print(f"{'summary':>20} {'W':>4} {'gathered':>9} {'all-gather':>10} {'log-scan':>9} {'All-Scan':>9} {'best':>10}")
    for r in rows:
        print(f"{r['config']:>20} {r['W']:4d} {r['gathered_bytes'] / MiB:8.1f}M {r['all_gather_us']:10.0f} "
              f"{r['log_scan_us']:9.0f} {r['all_scan_us']:9.0f} {r['best']:>10}")


# ---------------------------------------------------------------------------------------------
# The LASP-2 paper's figures (REFERENCES.md): Linear-Llama3-1B, 64 A100, batch 1

PAPER = [  # (T, W, LASP-2 over LASP-1, LASP-2 over ring attention)
    (2048 * KiB, 64, 1.152, 1.366),
    (512 * KiB, 64, 1.073, 1.178),
]
PAPER_THROUGHPUT = [(512 * KiB, 32, 250_586), (1024 * KiB, 64, 442_221), (2048 * KiB, 128, 769_030)]


def paper_check(cal: Calibration) -> list[dict]:
    """The model on the A100 parameter set against the paper. The paper's models are pure
    linear (pattern L) and plain linear attention; we assume no activation checkpointing."""
    s = Setup(cal, A100, checkpointing=False)
    rows = []
    for T, W, lasp1, ring in PAPER:
        res = {m: step_time(s, "L", m, W, T)["step"] for m in ("lasp2", "lasp1", "ring")}
        rows.append(dict(T=T, W=W, paper_over_lasp1=lasp1, paper_over_ring=ring,
                         model_over_lasp1=res["lasp1"] / res["lasp2"],
                         model_over_lasp1_paper_style=_lasp1_paper_step(s, W, T) / res["lasp2"],
                         model_over_ring=res["ring"] / res["lasp2"], model_tokens_per_s=T / res["lasp2"]))
    for T, W, tps in PAPER_THROUGHPUT:
        model = W * step_time(s, "L", "lasp2", W, T)["tokens_per_s_per_gpu"]
        rows.append(dict(T=T, W=W, paper_tokens_per_s=tps, model_tokens_per_s=model))
    return rows


def _lasp1_paper_step(s: Setup, W: int, T: float) -> float:
    L = T / W
    layers = s.shape.layers * linear_layer_time(s, "lasp1_paper", W, L)["total"]
    return s.t(s.cal.rest_s("L", L)) + layers


def print_paper_check(rows: list[dict]) -> None:
    print("\nPROJECTED vs the LASP-2 paper (A100 parameter set, pattern L, no checkpointing):")
    for r in rows:
        if "paper_over_lasp1" in r:
            print(f"  {fmt_tokens(r['T'])} on {r['W']} GPUs: LASP-2 over LASP-1 paper {r['paper_over_lasp1']:.3f}, "
                  f"model {r['model_over_lasp1']:.3f} (lasp's ring: summary before the chain), "
                  f"{r['model_over_lasp1_paper_style']:.3f} (K^T V update on the chain); over ring attention "
                  f"paper {r['paper_over_ring']:.3f}, model {r['model_over_ring']:.3f}")
        else:
            print(f"  {fmt_tokens(r['T'])} on {r['W']} GPUs: paper {r['paper_tokens_per_s']:,} tokens/s, "
                  f"model (LASP-2) {r['model_tokens_per_s']:,.0f} tokens/s")


# ---------------------------------------------------------------------------------------------
# Interim calibration from figures already measured and committed


def build_interim() -> dict:
    """A calibration built from committed measurements, each with its source, and the
    assumptions needed to fill what was not measured. Replace with `--calibrate` output."""
    kernels = json.loads((RESULTS / "kernels.json").read_text())
    by = {(r["method"], r["B"], r["T"], r["mode"]): r["ms"] for r in kernels["results"]}
    fwd = by[("lasp-triton g_gamma", 1, 32768, "fwd")]
    fb = by[("lasp-triton g_gamma", 1, 32768, "fwd+bwd")]
    fwd_fraction = fwd / fb
    # H100 lasp g_gamma fwd+bwd (REFERENCES.md, 2026-12-06): 1.57 ms at 1x32K, 6.48 at 1x128K;
    # through both points and a 0.05 ms launch floor (assumption) below them.
    slope = (6.48 - 1.57) / (131072 - 32768)
    tokens = [512 * 2 ** i for i in range(10)]
    total = [max(0.05, 1.57 + slope * (L - 32768)) if L >= 32768 else max(0.05, 1.57 * L / 32768) for L in tokens]
    split = dict(summarize=0.35 * fwd_fraction, output=0.65 * fwd_fraction,
                 grad_q=0.45 * (1 - fwd_fraction), grad_kvg=0.55 * (1 - fwd_fraction))
    linear = {p: [round(f * t, 5) for t in total] for p, f in split.items()}
    # state output: q [L,32,64] bf16 against the fp32 states: memory-bound, ~12 B/token/head-dim
    # passes at 3 TB/s plus a launch (assumption).
    linear["state_output_fwd"] = [round(0.02 + L * 4096 * 2 / 3e12 * 1e3, 5) for L in tokens]
    linear["state_output_bwd"] = [round(0.04 + L * 4096 * 4 / 3e12 * 1e3, 5) for L in tokens]
    # Rest of the step: lasp-train linear-llama3-1b L, 64K tokens, checkpointing, one H100:
    # 35.8K tokens/s (REFERENCES.md) -> 1.831 s per step, minus 16 linear layers (fwd+bwd plus
    # the recomputed forward) at 64K; proportional to the tokens (assumption).
    L64 = 65536
    op64 = interpolate(tokens, total, L64)
    rest64 = L64 / 35.8e3 * 1e3 - 16 * op64 * (1 + fwd_fraction)
    rest_tokens = [4096, 65536, 262144]
    rest = {p: [round(rest64 * L / L64, 3) for L in rest_tokens] for p in ("L", "LLLN")}
    # Softmax: torch SDPA causal fwd+bwd on the H100, H=16 D=128 (H·D as the 1B model's 32x64):
    # 27.1 ms at 32K, 462 ms at 128K (REFERENCES.md); seconds per query-key pair through both.
    p32, p128 = 32768 ** 2 / 2, 131072 ** 2 / 2
    pair_s = (0.462 - 0.0271) / (p128 - p32)
    softmax = dict(pair_s=pair_s, ring_pair_s=1.3 * pair_s, fwd_fraction=1 / 3.5,
                   fixed_s=max(0.0, 0.0271 - pair_s * p32))
    return dict(
        device="NVIDIA H100 80GB HBM3 (interim: derived, not a calibration run)",
        source="interim: derived from committed figures and stated assumptions; replace with --calibrate",
        local_tokens=tokens, linear=linear, rest_tokens=rest_tokens, rest=rest, softmax=softmax,
        walk_step_fwd_s=7e-6, walk_step_bwd_s=15e-6, overlap_efficiency=0.8,
        sources={
            "linear fwd+bwd": "REFERENCES.md, H100 2026-12-06, lasp g_gamma H=16 D=128: 1.57 ms (1x32K), 6.48 ms "
                              "(1x128K); taken as the 1B layer's (32 heads of 64: same H*D; assumption)",
            "linear phase split": f"fwd/(fwd+bwd) = {fwd_fraction:.3f} from benchmarks/results/kernels.json "
                                  "(H200, g_gamma 1x32K); summarize 35% / output 65% of fwd, grad_q 45% / "
                                  "grad_kvg 55% of bwd (assumption)",
            "state_output": "memory-bound estimate at 3 TB/s + 20/40 us launch (assumption)",
            "rest": "REFERENCES.md: lasp-train linear-llama3-1b L, 64K tokens/GPU, checkpointing, one H100: 35.8K "
                    "tokens/s; minus 16 linear layers; proportional to tokens; LLLN rest taken equal to L's "
                    "(assumption: the lasp-train LLLN figures use packed synthetic documents)",
            "softmax pair_s": "REFERENCES.md: torch SDPA causal fwd+bwd on H100, 27.1 ms at 32K, 462 ms at 128K",
            "softmax ring_pair_s": "1.3x SDPA's (the ring needs a log-sum-exp: flex; assumption)",
            "walk steps": "device time per gathered summary, 7 us forward (3 small kernels), 15 us backward (6) "
                          "(assumption; --calibrate measures it)",
            "overlap_efficiency": "0.8 (assumption; --calibrate measures it)",
        })


# ---------------------------------------------------------------------------------------------
# GPU calibration


def calibrate(out_dir: Path, budget_s: float = 200.0) -> Path:
    """Time the real local work on this GPU and write scaling_calibration_<gpu>.json."""
    import torch
    import triton
    from triton.testing import do_bench

    from lasp.kernels import linear_attention_phases, softmax_attention, state_output
    from lasp.layers.linear_attention import retnet_log_decay

    start = time.perf_counter()
    dev = torch.device("cuda")
    shape = LINEAR_LLAMA3_1B
    H, Hkv, D = shape.heads, shape.kv_heads, shape.head_dim
    bf16 = torch.bfloat16
    free = torch.cuda.mem_get_info()[0]
    tokens = [512 * 2 ** i for i in range(11) if 512 * 2 ** i * H * D * 2 * 12 < free / 2]
    log = []

    def left():
        return budget_s - (time.perf_counter() - start)

    def bench(fn):
        return do_bench(fn, warmup=5, rep=25, return_mode="median")

    def device_ms(fn, reps=5):
        """GPU time of fn's kernels with the host running ahead: queued behind a 20 ms sleep
        kernel, minus the sleep alone."""
        def timed(work):
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                torch.cuda._sleep(40_000_000)
                work()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return sorted(times)[reps // 2]
        fn()
        return max(0.0, timed(fn) - timed(lambda: None))

    # Linear-attention phases of one layer at each local length.
    linear = {p: [] for p in ("summarize", "output", "grad_q", "grad_kvg", "state_output_fwd", "state_output_bwd")}
    g_gamma = retnet_log_decay(H, torch.float32, dev)
    measured_tokens = []
    for L in tokens:
        if left() < budget_s * 0.6:
            log.append(f"linear phases: stopped before {L} tokens (time budget)")
            break
        q, k, v, do = (torch.randn(1, L, H, D, device=dev, dtype=bf16) for _ in range(4))
        phases, (q_, k_, v_, g_, _) = linear_attention_phases(q, k, v, None, g_gamma)
        final, saved = phases.summarize(k_, v_, g_, None)
        dq, partial = phases.grad_q(q_, k_, v_, g_, saved, do)
        d_final = torch.randn_like(final)
        linear["summarize"].append(bench(lambda: phases.summarize(k_, v_, g_, None)))
        linear["output"].append(bench(lambda: phases.output(q_, k_, v_, g_, saved)))
        linear["grad_q"].append(bench(lambda: phases.grad_q(q_, k_, v_, g_, saved, do)))
        linear["grad_kvg"].append(bench(lambda: phases.grad_kvg(q_, k_, v_, g_, saved, partial, d_final,
                                                                 want_dg=False, want_dh0=False)))
        qs = q.detach().requires_grad_()
        S = torch.randn(1, H, D, D, device=dev, requires_grad=True)
        so_f = bench(lambda: state_output(qs, S, None, g_gamma))
        so_fb = bench(lambda: torch.autograd.grad(state_output(qs, S, None, g_gamma), (qs, S), do))
        linear["state_output_fwd"].append(so_f)
        linear["state_output_bwd"].append(max(0.0, so_fb - so_f))
        measured_tokens.append(L)
        q = k = v = do = phases = saved = partial = None    # freed (not `del`: the lambdas above name them)
    torch.cuda.empty_cache()

    # LASP-2's walk over W gathered summaries (the arithmetic of lasp.parallel.scan's walk).
    state = torch.randn(256, 1, H, D, D, device=dev)
    decays = -torch.rand(256, 1, H, device=dev)
    walks = {}
    for W in (8, 64, 256):
        def forward_walk():
            value = state[0]
            for i in range(1, W):
                value = decays[i].exp()[..., None, None] * value + state[i]
            return value

        def backward_walk():
            grad = state[W - 1]
            d_decays = []
            for i in range(W - 2, -1, -1):
                decay = decays[i].exp()
                d_decays.append((grad * state[i]).sum((-2, -1)) * decay)
                grad = decay[..., None, None] * grad + state[i]
            return grad, d_decays
        walks[W] = dict(device=(device_ms(forward_walk) / W * 1e-3, device_ms(backward_walk) / W * 1e-3),
                        host_bound=(bench(forward_walk) / W * 1e-3, bench(backward_walk) / W * 1e-3))
    walk_f = max(w["device"][0] for w in walks.values())
    walk_b = max(w["device"][1] for w in walks.values())

    # Overlap: the output phase with and without a bandwidth-bound copy on a side stream.
    L = 32768
    q, k, v = (torch.randn(1, L, H, D, device=dev, dtype=bf16) for _ in range(3))
    phases, (q_, k_, v_, g_, _) = linear_attention_phases(q, k, v, None, g_gamma)
    _, saved = phases.summarize(k_, v_, g_, None)
    t_out = bench(lambda: phases.output(q_, k_, v_, g_, saved))
    n = int(3e12 * t_out * 1e-3 / 2 / 4)    # fp32 elements a copy moves in about t_out
    src, dst = torch.randn(n, device=dev), torch.empty(n, device=dev)
    side = torch.cuda.Stream()
    overlap = {}
    for name, copy in (("sm_kernel", lambda: torch.mul(src, 1.0, out=dst)), ("copy_engine", lambda: dst.copy_(src))):
        t_copy = bench(copy)

        def both():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                copy()
            phases.output(q_, k_, v_, g_, saved)
            torch.cuda.current_stream().wait_stream(side)
        t_both = bench(both)
        eta = (t_out + t_copy - t_both) / min(t_out, t_copy)
        overlap[name] = dict(output_ms=t_out, copy_ms=t_copy, both_ms=t_both, efficiency=min(1.0, max(0.0, eta)))
    q = k = v = src = dst = phases = saved = None           # freed (not `del`: the lambdas above name them)
    torch.cuda.empty_cache()

    # Softmax: LASP-2H's local step (lower-right causal, the default backend) at a few
    # (queries, keys).
    pairs, times = [], []
    for Tq, Tk in ((4096, 4096), (16384, 16384), (4096, 65536), (16384, 131072), (2048, 262144)):
        if left() < 90:
            log.append(f"softmax: stopped before ({Tq}, {Tk}) (time budget)")
            break
        qs = torch.randn(1, Tq, H, D, device=dev, dtype=bf16, requires_grad=True)
        ks, vs = (torch.randn(1, Tk, Hkv, D, device=dev, dtype=bf16, requires_grad=True) for _ in range(2))
        dos = torch.randn_like(qs)
        times.append(bench(lambda: torch.autograd.grad(softmax_attention(qs, ks, vs), (qs, ks, vs), dos)) * 1e-3)
        pairs.append(Tq * Tk - Tq * Tq / 2)
        if len(times) == 1:
            fwd_fraction = bench(lambda: softmax_attention(qs, ks, vs)) * 1e-3 / times[0]
    slope, fixed = _fit(pairs, times)
    del qs, ks, vs, dos
    torch.cuda.empty_cache()

    # The rest of a step: the whole model (checkpointing, bf16 AdamW) minus its attention ops.
    rest_tokens, rest = [], {"L": [], "LLLN": []}
    for pattern in ("L", "LLLN"):
        for L in (8192, 32768):
            if left() < 20:
                log.append(f"rest: stopped before {pattern} {L} (time budget)")
                break
            ms = _model_step_ms(pattern, L)
            kinds = pattern_kinds(pattern, shape.layers)
            lin = (sum(interpolate(measured_tokens, linear[p], L) for p in ("summarize", "output")) * 2
                   + sum(interpolate(measured_tokens, linear[p], L) for p in ("grad_q", "grad_kvg")))
            attn = (fixed + slope * L * L / 2) * (1 + fwd_fraction) * 1e3
            rest[pattern].append(ms - kinds.count("L") * lin - kinds.count("N") * attn)
            if pattern == "L":
                rest_tokens.append(L)
    if len(rest["LLLN"]) < len(rest_tokens):
        rest["LLLN"] += rest["L"][len(rest["LLLN"]):]
        log.append("rest LLLN: missing points taken from L")

    # Last (it compiles flex, tens of seconds): the ring's block.
    ring_pair_s, ring_note = 1.3 * slope, "assumed 1.3x LASP-2H's rate (no time left to compile flex)"
    if left() > 45:
        Lb = 8192
        qs = torch.randn(1, Lb, H, D, device=dev, dtype=bf16, requires_grad=True)
        ks, vs = (torch.randn(1, Lb, Hkv, D, device=dev, dtype=bf16, requires_grad=True) for _ in range(2))
        dos = torch.randn_like(qs)

        def ring_block():
            o, lse = softmax_attention(qs, ks, vs, causal=False, return_lse=True, backend="flex")
            return torch.autograd.grad((o, lse), (qs, ks, vs), (dos, torch.zeros_like(lse)))
        ring_block()
        ring_pair_s, ring_note = bench(ring_block) * 1e-3 / (Lb * Lb), f"flex fwd+bwd, {Lb}x{Lb} non-causal block"

    data = dict(
        device=torch.cuda.get_device_name(), source="measured: benchmarks/scaling.py --calibrate",
        local_tokens=measured_tokens, linear=linear, rest_tokens=rest_tokens, rest=rest,
        softmax=dict(pair_s=slope, ring_pair_s=ring_pair_s, fwd_fraction=fwd_fraction, fixed_s=fixed,
                     points=dict(pairs=pairs, seconds=times)),
        walk_step_fwd_s=walk_f, walk_step_bwd_s=walk_b, overlap_efficiency=overlap["sm_kernel"]["efficiency"],
        sources=dict(walk={str(W): w for W, w in walks.items()}, overlap=overlap, ring_block=ring_note,
                     shapes="B=1, 32 heads, head dim 64, 8 KV heads, bf16, fixed decay (g_gamma)",
                     overlap_method="output phase at 32K tokens vs a side-stream copy of about its length; "
                                    "efficiency = (t_out + t_copy - t_both) / min; the SM-kernel copy is used "
                                    "(NCCL's transfers run as kernels on SMs)", log=log),
        meta=dict(torch=torch.__version__, triton=triton.__version__, seconds=time.perf_counter() - start))
    name = "h200" if "H200" in data["device"] else "h100" if "H100" in data["device"] else "gpu"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"scaling_calibration_{name}.json"
    path.write_text(json.dumps(data, indent=1))
    print(f"calibration: {data['device']} in {data['meta']['seconds']:.0f} s -> {path}")
    for p, ys in linear.items():
        print(f"  {p:17s}" + " ".join(f"{y:7.3f}" for y in ys))
    print(f"  rest {rest} at {rest_tokens}; softmax {slope:.3e} s/pair (ring {ring_pair_s:.3e}); walk "
          f"{walk_f * 1e6:.1f}/{walk_b * 1e6:.1f} us; overlap {overlap}")
    return path


def _fit(xs, ys) -> tuple[float, float]:
    """Least-squares slope and intercept (intercept clamped at 0)."""
    n = len(xs)
    if n == 1:
        return ys[0] / xs[0], 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, max(0.0, my - slope * mx)


def _model_step_ms(pattern: str, L: int, reps: int = 2) -> float:
    """Median ms of one fwd+bwd+AdamW step of linear-llama3-1b (bf16, checkpointing) at L tokens."""
    import torch

    from lasp.models import LinearLlamaForCausalLM, linear_llama_config

    torch.manual_seed(0)
    config = linear_llama_config("linear-llama3-1b", layer_pattern=pattern, activation_checkpointing=True)
    with torch.device("cuda"):
        model = LinearLlamaForCausalLM(config).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, config.vocab_size, (1, L), device="cuda")
    times = []
    for i in range(reps + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        end.record()
        end.synchronize()
        if i:
            times.append(start.elapsed_time(end))
    del model, opt
    torch.cuda.empty_cache()
    return sorted(times)[len(times) // 2]


# ---------------------------------------------------------------------------------------------


def dominance(s: Setup) -> list[dict]:
    """Where LASP-2's all-gather stops hiding behind the output phase: for each local length,
    the smallest W whose gather (and walk) exceeds the overlap window."""
    rows = []
    for L in (2 * KiB, 8 * KiB, 32 * KiB, 128 * KiB):
        window = s.t(s.cal.linear_s("output", L))
        params = s.exchange_params()
        first = next((W for W in [2 ** i for i in range(1, 13)]
                      if exchange_time("all_gather", W, s.shape.state_bytes("identity"), params) > window), None)
        rows.append(dict(local_tokens=L, window_us=window * 1e6, first_exposed_W=first))
    return rows


def run_model(cal_path: Path, out_dir: Path, quiet: bool = False) -> dict:
    cal = Calibration.load(cal_path)
    s = Setup(cal)
    rows = projection_rows(s)
    weak = weak_scaling_rows(s)
    exchanges = exchange_table(s)
    paper = paper_check(cal)
    dom = dominance(s)
    if not quiet:
        print(f"calibration: {cal_path.name}: {cal.device}; {cal.source}")
        print_projection(rows, f"{s.hw.name}, {s.hw.network.name}")
        print_exchange_table(exchanges, s)
        print("\nPROJECTED: smallest W at which LASP-2's all-gather + walk outlasts the output phase it hides behind:")
        for r in dom:
            print(f"  {fmt_tokens(r['local_tokens']):>5} local tokens (window {r['window_us']:.0f} us): "
                  f"W = {r['first_exposed_W']}")
        print_paper_check(paper)
    result = dict(label="PROJECTED (scaling model, not a measurement)", calibration=str(cal_path.name),
                  calibration_device=cal.device, calibration_source=cal.source,
                  hardware=asdict(s.hw), shape=asdict(s.shape), checkpointing=s.checkpointing,
                  projection=rows, weak_scaling=weak, exchanges=exchanges, dominance=dom, paper_check=paper)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "interim" if cal.source.startswith("interim") else cal_path.stem.removeprefix("scaling_calibration_")
    path = out_dir / f"scaling_projection_{tag}.json"
    path.write_text(json.dumps(result, indent=1))
    if not quiet:
        print(f"\nwrote {path}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--model-only", action="store_true", help="project from a calibration JSON (CPU)")
    mode.add_argument("--calibrate", action="store_true", help="time the local work on this GPU")
    mode.add_argument("--build-interim", action="store_true", help="rebuild the interim calibration JSON")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="calibration JSON (default: the newest measured one in benchmarks/results, "
                             "else the interim)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or RESULTS))
    parser.add_argument("--budget", type=float, default=200.0, help="seconds for --calibrate")
    args = parser.parse_args(argv)
    if args.build_interim:
        INTERIM.write_text(json.dumps(build_interim(), indent=1))
        print(f"wrote {INTERIM}")
    elif args.calibrate:
        path = calibrate(args.out, args.budget)
        run_model(path, args.out)
    else:
        run_model(args.calibration or default_calibration(), args.out)


def default_calibration() -> Path:
    measured = sorted(RESULTS.glob("scaling_calibration_h*.json"), key=lambda p: p.stat().st_mtime)
    return measured[-1] if measured else INTERIM


if __name__ == "__main__":
    main()
