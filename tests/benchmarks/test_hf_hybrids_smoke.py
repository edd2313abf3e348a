"""CPU smoke runs of benchmarks/hf_hybrids.py on tiny configs (fp32, Triton interpreter):
the lasp-wrapped model against transformers' own path, and W = 2 ranks against W = 1."""

import json

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
