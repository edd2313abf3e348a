"""benchmarks/sp.py's byte model (`lasp2_bytes_per_layer`) against the bytes LASP-2 really
sends (`lasp.parallel.scan.bytes_sent`), for every transition kind, on gloo CPU ranks."""

import argparse
import importlib.util
import sys
from pathlib import Path

import torch.distributed as dist

from tests.distributed import run_distributed

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _sp_module():
    spec = importlib.util.spec_from_file_location("bench_sp", BENCHMARKS / "sp.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _bytes_body(rank, W):
    sp = _sp_module()
    H, D, N = 2, 8, 16
    for variant in sp.VARIANTS:
        for kind, segments in (("contiguous", 1), ("zigzag", 2)):
            args = argparse.Namespace(heads=H, dim=D, device="cpu", variant=variant)
            step = sp.make_step(sp.lasp2_linear_attention, kind, N, args, rank, W)
            sp.scan.bytes_sent = 0
            step()
            expected = sp.lasp2_bytes_per_layer(W, H, D, segments, variant)
            assert sp.scan.bytes_sent == expected["forward"] + expected["backward"], (variant, kind, sp.scan.bytes_sent)
    dist.barrier()


def test_byte_model_matches_what_lasp2_sends():
    run_distributed(_bytes_body, 2)
