"""CPU smoke runs of benchmarks/hf_hybrids.py on tiny configs (fp32, Triton interpreter):
the lasp-wrapped model against transformers' own path, W = 2 ranks against W = 1, and the
fp32 run that bf16 gradients are judged against."""

import copy
import json

import torch

from benchmarks import hf_hybrids

TINY = ["--device", "cpu", "--tiny", "--steps", "1", "--tokens", "32"]


def test_wrapped_against_native(tmp_path, capsys):
    rows = hf_hybrids.main(TINY + ["--models", "lfm2,qwen3_5_text", "--native-max-tokens", "16",
                                   "--out", str(tmp_path)])
    assert [r["family"] for r in rows] == ["lfm2", "qwen3_5_text"]
    for r in rows:
        assert r["lasp"]["tokens"] == 32 and r["native"]["tokens"] == r["lasp_at_native_tokens"]["tokens"] == 16
        assert min(r[run]["tokens_per_s"] for run in ("lasp", "native", "lasp_at_native_tokens")) > 0
        assert r["compare"]["loss_rel_diff"] < 1e-5, r["compare"]
        assert r["compare"]["grad_rel_diff"]["all"] < 1e-4, r["compare"]
    assert json.loads((tmp_path / "hf_hybrids.json").read_text())["families"] == rows
    assert "qwen3_5_text" in capsys.readouterr().out.split("family")[-1]     # the table comes last


def test_ranks_sharing_a_device(tmp_path):
    rows = hf_hybrids.main(TINY + ["--models", "qwen3_5_text", "--shared-gpu-ranks", "2", "--out", str(tmp_path)])
    assert [r["kind"] for r in rows] == ["contiguous", "zigzag"]
    for r in rows:
        assert r["world_size"] == 2 and r["loss_rel_diff"] < 1e-6 and r["grad_rel_diff"]["all"] < 1e-5, r
    assert json.loads((tmp_path / "hf_hybrids_shared.json").read_text())["rows"] == rows


def test_bf16_gradients_judged_against_an_fp32_run():
    """`native_fp32`: a bf16 model's gradients are held to an fp32 run of the native model,
    within GRAD_FLOOR_FACTOR × the bf16 native model's own distance to it: an identical twin
    passes, a twin whose gradients are off by more than that fails."""
    args = hf_hybrids.parse_args(TINY + ["--models", "lfm2"])
    args.dtype = torch.bfloat16
    native, _ = hf_hybrids.build_model("lfm2", args)
    twin = copy.deepcopy(native)
    ids = hf_hybrids.batches(16, 1, args)[0]
    for model in (native, twin):
        hf_hybrids.native_step(model, ids)
    same = hf_hybrids.native_fp32(native, twin, ids, args)
    distances = same["grad_rel_diff_to_fp32"]
    assert same["grad_ok"] and distances["lasp"] == distances["reference_bf16"]
    assert 0 < distances["reference_bf16"]["all"] < 5e-2, distances     # bf16 against fp32: rounding only
    torch.manual_seed(0)
    for p in twin.parameters():
        if p.grad is not None:
            p.grad += 0.2 * p.grad.float().norm() / p.numel() ** 0.5 * torch.randn_like(p.grad)
    worse = hf_hybrids.native_fp32(native, twin, ids, args)
    assert not worse["grad_ok"], worse["grad_rel_diff_to_fp32"]


def test_native_over_its_time_limit_runs_shorter(monkeypatch):
    """A native run over --native-timeout-s is tried again NATIVE_RETRY_SHORTER times
    shorter, down to NATIVE_MIN_TOKENS, and the comparison runs at the last length tried."""
    monkeypatch.setattr(hf_hybrids, "NATIVE_MIN_TOKENS", 4)
    args = hf_hybrids.parse_args(TINY + ["--models", "lfm2", "--native-timeout-s", "1e-4"])
    record = hf_hybrids.run_family("lfm2", args)
    # --tiny: 32 tokens, over the limit; 8, over it again; 2 would be under NATIVE_MIN_TOKENS
    assert [r["tokens"] for r in record["native_over_time"]] == [32]
    assert record["native"]["tokens"] == 8 and record["native"]["timed_out"]
    assert record["lasp_at_native_tokens"]["tokens"] == 8 and "compare" not in record
