"""Launch parameters of every Triton kernel, in one table, and the kernels' output allocation.

`LAUNCH` maps a row name to a `Launch`. A family names its rows `"<family>.<kernel>"`
(`"scalar.summary"`, `"scalar.dkdv_dg"`, ...; the shared scan's row is `"scan"`), and a
new family adds its rows to this table, so that `benchmarks/launch_sweep.py` (every
family, one row at a time, per-kernel times) finds every row in one place. Nothing is
autotuned at run time. This module does not import Triton (the torch backend takes
`CHUNK_SIZE` from here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Tokens per chunk: the tile of the intra-chunk products, for every backend and family.
CHUNK_SIZE = 64

# Head dims (K and V) the Triton kernels take.
TRITON_HEAD_DIMS = (16, 256)

# Head dims above 128 take chunks of CHUNK_SIZE // 2 tokens: their [C, K] tiles at C = 64,
# K = 256 need more shared memory than a Hopper GPU has (compiled for sm_90 with Triton 3.6:
# the delta chunk backward 320 KB, the scalar dk/dv with fp32 inputs 304 KB, of 227 KB;
# tests/kernels/test_hopper_resources.py), and on an H100 the per-key dq walk at K = V = 256
# with 64-token chunks hits an illegal memory access, with 32 it runs
# (benchmarks/results/diagonal_phases_probe_h100_2026-12-06.txt).
WIDE_HEAD_CHUNK = CHUNK_SIZE // 2


# Tokens per chunk of each family's Triton kernels at head dims up to 128. The per-key
# family (diagonal) takes 32: at 64 its output / dq / dk-dv kernels spill 1.3 / 1.1 / 2.3 KB
# a thread at D = 128 (compiled for sm_90 with Triton 3.6; 0.2 / 0.7 / 0.9 KB at 32), and on
# an H100 its four phases took 10.2 ms fwd+bwd at B=1, T=32K, H=16 against 7.9 ms at 32
# (benchmarks/results/diagonal_phases_probe_h100_2026-12-06.txt).
FAMILY_CHUNK = {"scalar": CHUNK_SIZE, "diagonal": CHUNK_SIZE // 2, "delta": CHUNK_SIZE}


def chunk_for_head_dims(family: str, K: int, V: int) -> int:
    """Tokens per chunk of `family`'s Triton kernels: its FAMILY_CHUNK, at most
    WIDE_HEAD_CHUNK when a head dim exceeds 128."""
    chunk = FAMILY_CHUNK[family]
    return chunk if max(K, V) <= 128 else min(chunk, WIDE_HEAD_CHUNK)


@dataclass(frozen=True)
class Launch:
    """Launch parameters of one kernel: warps, software-pipeline stages and `block`, the
    widest tile along each head dimension the kernel splits across programs (halved when
    the dimension it keeps whole exceeds 128, to bound registers; the delta walks narrow
    theirs further while they have fewer programs than the GPU has SMs), or the scan's
    block of state elements."""

    num_warps: int
    num_stages: int
    block: int


# One row per kernel, the only place launch parameters are set; chosen at H=16, D=128 by
# `benchmarks/check_triton_gpu.py --tune` (H200) and `benchmarks/launch_sweep.py` (H100).
LAUNCH = {
    "scalar.summary": Launch(num_warps=4, num_stages=2, block=64),
    "scalar.output": Launch(num_warps=4, num_stages=2, block=64),
    "scalar.dq": Launch(num_warps=4, num_stages=2, block=64),
    # The dq walk with the decay's gradient (DG: it also stores every chunk's state): 8 warps
    # (1.09 ms against 4 warps' 1.18 at 1×32K, H100, launch_sweep_h100_2026-12-06-s6).
    "scalar.dq_dg": Launch(num_warps=8, num_stages=2, block=64),
    "scalar.dkdv": Launch(num_warps=8, num_stages=2, block=64),
    # The dk/dv walk with the decay's gradient (DG: dg's chunk-local terms): more
    # registers, no room to pipeline.
    "scalar.dkdv_dg": Launch(num_warps=8, num_stages=1, block=64),
    # Per-key decay (gk): swept on an H100 at 1×32K (benchmarks/launch_sweep.py,
    # launch_sweep_h100_2026-12-06-s6): summary 0.34 ms with 128-wide tiles (0.48 at 64),
    # output 0.81 with 8 warps and all of V (1.02), dq 1.97 with 32-wide K-tiles (2.17). The
    # split dk/dv launches (`FUSED_DKDV_MAX_ELEMENTS`) on 4 warps unpipelined: 2.82 ms at 1×32K
    # on an H200 against 3.65 on 8 warps pipelined, 3.70 unpipelined (gk_variants_h200_2026-12-07-s9).
    # Head dims above 128 or fp32 inputs keep 8 warps (`_wide`): on 4 they spill 1.3-2.4 KB a
    # thread against 0.1-0.2 KB (sm_90, benchmarks/kernel_resources.py).
    "diagonal.summary": Launch(num_warps=4, num_stages=2, block=128),
    "diagonal.output": Launch(num_warps=8, num_stages=2, block=128),
    "diagonal.dq": Launch(num_warps=4, num_stages=2, block=32),
    "diagonal.dkdv": Launch(num_warps=4, num_stages=1, block=64),
    "diagonal.dkdv_wide": Launch(num_warps=8, num_stages=1, block=64),
    # Delta rule: the sequential state pass per (document, head, V-tile) and its backward
    # walk; narrow V-tiles give more programs (the fp32 walks swept on an H100 for Gated
    # DeltaNet at 1×32K, launch_sweep_h100_2026-12-06-s6: V-tiles of 16 walk in 2.27 ms
    # against 2.42 at 32; the backward walk's 16 was already the best).
    "delta.state": Launch(num_warps=4, num_stages=2, block=16),
    # V-tiles of 16: with 32 the per-key walk at K = 128 (bf16) needs 228 KB of shared
    # memory (it failed on an H100, 2026-12-06); 16 gives it 218 KB. The per-key walk with
    # fp32 inputs still needs 236 KB pipelined, so it runs unpipelined (its own row).
    "delta.state_grad": Launch(num_warps=4, num_stages=2, block=16),
    "delta.state_grad_per_key": Launch(num_warps=4, num_stages=1, block=16),
    # The same walks with bf16 operands (`lasp.kernels.delta.triton.WALK_OPERANDS`, the
    # default for 16-bit inputs): a stage's W and k_end tiles take half the shared memory
    # (sm_90, Triton 3.6, K = V = 128, benchmarks/kernel_resources.py), which buys a deeper
    # pipeline for the forward walk. Their block is the widest V-tile: a walk halves it,
    # down to 16, while it would have fewer programs than the GPU has SMs (`_walk_grid`).
    # Every program re-reads its chunks' W and k_end, so wide tiles read less where there
    # are programs enough: on an H100 at (8,4K) (128 walks) DeltaNet took 4.93 ms fwd+bwd
    # with 64-wide tiles against 6.21 with 16 (5.64 with 32; 8 warps at 64: 5.03), Gated
    # DeltaNet 5.20 against 6.26, KDA 10.75 against 11.75
    # (delta_variants_walk_vtiles_8x4096_h100_2026-12-07-s15). At 1×32K (16 walks) 16 swept
    # best (launch_sweep_h100_2026-12-07-s8): Gated DeltaNet's forward walk 0.92 ms against
    # 1.17 at 32, its backward walk 1.82 against 1.97, KDA's 3.18 against 3.33; DeltaNet
    # 5.64 ms fwd+bwd against 5.88 at 32 (delta_variants_walk_rounding_*-s15). The fp32
    # rows stay at 16: their backward walk at 32 needs 240 KB of shared memory (227 on an H100).
    "delta.state_bf16": Launch(num_warps=4, num_stages=3, block=64),
    "delta.state_grad_bf16": Launch(num_warps=4, num_stages=2, block=64),
    "delta.state_grad_per_key_bf16": Launch(num_warps=4, num_stages=2, block=64),
    # The per-chunk kernels of the delta rule (one program per chunk and head; block = the
    # V-tile): the UT transform (`inverse`, R alone: its block is unused; `wy`, w and u; on
    # an H100 at (8,4K) 8 warps took R 1.03 ms against 0.36 on 4, w and u 0.48 against 0.40,
    # DeltaNet, delta_variants_ut_split_warps_8x4096_h100_2026-12-07-s18), the outputs, the
    # outputs' dδ (first guesses). The chunk
    # backward in two: `key_grad` per (chunk, head, K-tile), block = its K-tile and V-tile;
    # `wy_grad` per (chunk, head), block = the K- and V-tiles of its loops. The per-key
    # decay's exact diagonal blocks hold more registers: narrower tiles (its `_per_key`
    # rows). Chosen offline for no spills (sm_90, Triton 3.6, K = V = 128, bf16 and fp32,
    # benchmarks/kernel_resources.py; 64-wide per-key tiles spill 0.6 KB a thread, 32-wide
    # ones in wy_grad 0.2 KB). Swept on an H100 for Gated DeltaNet (as above): the chunk
    # backward on 4 warps, key_grad 1.51 ms and wy_grad 1.22 against 1.92 and 1.88 on 8; the
    # UT transform's 4 warps were already the best. The `_per_key` rows on 4 warps too (KDA,
    # launch_sweep_kda_h100_2026-12-07-s8): wy_grad 8.03 ms against 12.57 on 8, key_grad 7.75
    # against 8.25, although on 4 warps they spill (0.3 and 0.7 KB a thread, bf16).
    "delta.inverse": Launch(num_warps=4, num_stages=1, block=64),
    "delta.wy": Launch(num_warps=4, num_stages=1, block=64),
    "delta.output": Launch(num_warps=4, num_stages=2, block=64),
    "delta.output_grad": Launch(num_warps=4, num_stages=2, block=64),
    "delta.key_grad": Launch(num_warps=4, num_stages=2, block=64),
    "delta.wy_grad": Launch(num_warps=4, num_stages=2, block=64),
    "delta.key_grad_per_key": Launch(num_warps=4, num_stages=2, block=32),
    "delta.wy_grad_per_key": Launch(num_warps=4, num_stages=2, block=16),
    "scan": Launch(num_warps=4, num_stages=3, block=1024),
}


def tile(row: str, split_dim: int, whole_dim: int) -> int:
    """Tile along `split_dim` for the kernel of `LAUNCH[row]` when the other head dim
    (`whole_dim`, padded to a power of two) stays whole in each program."""
    cap = LAUNCH[row].block if whole_dim <= 128 else LAUNCH[row].block // 2
    return min(cap, 1 << (split_dim - 1).bit_length())


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (torch caches the properties: no host sync);
    1 off a GPU, so that the Triton interpreter and the offline sm_90 compile
    (`benchmarks/kernel_resources.py`) take the widest tiles a GPU may take."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def launch_kw(row: str, widest_dim: int = 0) -> dict:
    """`num_warps` and `num_stages` of `LAUNCH[row]`, as keywords of a kernel launch;
    unpipelined when a head dim the program holds whole (`widest_dim`) exceeds 128: a
    second stage of such tiles needs more shared memory than a GPU has (on an H100 the
    delta walk at K = 128 with 3 stages already asked for 240 KB of 227 KB)."""
    launch = LAUNCH[row]
    return dict(num_warps=launch.num_warps, num_stages=1 if widest_dim > 128 else launch.num_stages)


# Per family, the widest K×V state gradient one program keeps in registers for the fused
# dk/dv launch; wider states take the split launch (dv over V-tiles with all of K, dk over
# K-tiles with all of V), which reads q, k, v and do twice. Scalar family: on an H200 at
# B=1, T=32K, H=16, D=128 the split launch cost 1.24 / 1.81 / 2.77 ms fwd+bwd against the
# fused one's 0.92 / 1.44 / 2.32 (plain / g_gamma / g; benchmarks/results/tune_launch_*-s4),
# and again on an H100 after the transposed reads (1.33 / 1.83 / 3.41 against 1.00 / 1.35 /
# 3.00, scalar_transposed_loads_h100_2026-12-07-s9). The per-key family always splits: its
# fused launch at K = V = 128 spills 0.9 KB a thread (sm_90), and the split one on 4 warps
# took gk's fwd+bwd from 6.61 to 5.97 ms at 1×32K on an H200 (its dk/dv launches 3.45 ->
# 2.82 ms; gk_variants_h200_2026-12-07-s9).
# Inputs of 4 bytes (fp32) always take the split launch: their tiles need twice the shared
# memory, and the per-key fused dk/dv at K = V = 128 asked for 256 KB of a Hopper GPU's 227
# (compiled for sm_90, benchmarks/kernel_resources.py).
FUSED_DKDV_MAX_ELEMENTS = {"scalar": 128 * 128, "diagonal": 0}


def fuses_dkdv(family: str, K: int, V: int, element_size: int) -> bool:
    """Whether `family`'s one dk/dv launch holds the whole K×V state gradient
    (`FUSED_DKDV_MAX_ELEMENTS`, inputs of at most 2 bytes an element)."""
    fits = (1 << (K - 1).bit_length()) * (1 << (V - 1).bit_length()) <= FUSED_DKDV_MAX_ELEMENTS[family]
    return fits and element_size <= 2


def check_triton_head_dims(q, v) -> None:
    """The Triton kernels take head dims in `TRITON_HEAD_DIMS`: ValueError naming the dim."""
    lo, hi = TRITON_HEAD_DIMS
    for name, dim in (("q/k head dim K", q.shape[-1]), ("v head dim V", v.shape[-1])):
        if not lo <= dim <= hi:
            raise ValueError(f"backend='triton' supports head dims {lo}..{hi}; {name} is {dim}")


def new_tensor(shape, dtype, device) -> torch.Tensor:
    """Every Triton kernel output is allocated here, uninitialised.

    Call it as `launch.new_tensor(...)` (through the module): tests replace it with a
    NaN fill (tests/conftest.py), so that an element a kernel forgets fails a comparison.
    """
    return torch.empty(shape, dtype=dtype, device=device)
