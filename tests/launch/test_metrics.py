"""The FLOP count behind MFU (against FlopCounterMode on a real forward), the peak-FLOP table,
and what the progress line and the summary say they measure."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lasp.launch.config import MetricsConfig
from lasp.launch.metrics import Metrics, flops_per_token, peak_flops
from lasp.models import LinearLlamaForCausalLM, linear_llama_config

CHUNK_SIZE = 64  # the chunk of the torch backend's linear attention, and flops_per_token's


def test_flops_per_token_counts_a_real_forward():
    """FlopCounterMode counts the matmuls of a forward of a tiny hybrid (T = 4 chunks). The
    formula must be 3 × that per token (forward + backward), with causal products at half
    (the MFU convention): FlopCounterMode counts a softmax layer's T×T products dense, and the
    C×C intra-chunk products of a linear layer dense (per token 2·H·D·C of them are masked)."""
    T = 4 * CHUNK_SIZE
    model = LinearLlamaForCausalLM(linear_llama_config("tiny", layer_pattern="LLN", vocab_size=257))
    config = model.config
    H, D = config.num_attention_heads, config.head_dim
    with FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(0, 257, (1, T)))
    counts = counter.get_flop_counts()
    matmuls = sum(counts["Global"].get(op, 0) for op in (torch.ops.aten.mm, torch.ops.aten.addmm))
    forward = matmuls
    for i, kind in enumerate(config.layer_kinds):
        attention = counts[f"LinearLlamaForCausalLM.model.layers.{i}.self_attn"]
        products = sum(n for op, n in attention.items() if op not in (torch.ops.aten.mm, torch.ops.aten.addmm))
        assert products > 0, kind
        forward += products / 2 if kind == "N" else products - 2 * H * D * CHUNK_SIZE * T
    assert flops_per_token(model, T) == pytest.approx(3 * forward / T, rel=1e-12)


def test_flops_per_token_of_a_1b_model():
    with torch.device("meta"):
        model = LinearLlamaForCausalLM(linear_llama_config("linear-llama3-1b", layer_pattern="L"))
    assert 7e9 < flops_per_token(model, 32768) < 9e9  # ≈ 6 × 1.24B matmul weights


def test_peak_flops():
    assert peak_flops(torch.device("cpu"), None) is None  # MFU is n/a on CPU
    assert peak_flops(torch.device("cpu"), 100.0) == 100e12


def test_cpu_progress_says_what_it_measures(tmp_path, capsys):
    """Per process and host RSS on CPU (not "GPU" and "mem"); a summary with nothing timed is
    valid JSON (no NaN)."""
    dist_state = SimpleNamespace(is_main=True, world_size=2, device=torch.device("cpu"))
    metrics = Metrics(MetricsConfig(log_every=1, tensorboard=False), str(tmp_path), dist_state, steps=2,
                      start_step=0, tokens_per_step=64, flops_per_token=1.0, peak=None)
    for step in (1, 2):
        metrics.record(step, torch.tensor(2.0), torch.tensor(1.0), 1e-3)
    summary = metrics.summary()
    lines = capsys.readouterr().out.splitlines()
    assert all(" tok/s/proc | " in line and " rss " in line and "GPU" not in line for line in lines), lines
    assert summary["throughput_unit"] == "tok/s/proc" and summary["peak_memory"] == "host resident set (RSS)"

    idle = Metrics(MetricsConfig(tensorboard=False), str(tmp_path / "idle"), dist_state, steps=2, start_step=2,
                   tokens_per_step=64, flops_per_token=1.0, peak=1e12)
    summary = idle.summary()
    assert summary["tokens_per_s_per_gpu"] is None and summary["mfu"] is None
    json.dumps(summary, allow_nan=False)


def test_profile_step_writes_that_steps_op_table(tmp_path):
    """--profile-step N: step N's ops are tabled in profile_step_N.txt; other steps run unprofiled."""
    dist_state = SimpleNamespace(is_main=True, world_size=1, device=torch.device("cpu"))
    metrics = Metrics(MetricsConfig(log_every=1, tensorboard=False, profile_step=2), str(tmp_path), dist_state,
                      steps=3, start_step=0, tokens_per_step=64, flops_per_token=1.0, peak=None)
    a = torch.randn(64, 64)
    for step in (1, 2, 3):
        with metrics.profiling(step):
            (torch.cholesky_inverse(a @ a.T) if step == 2 else a + a).sum()
    assert [p.name for p in tmp_path.glob("profile_step_*")] == ["profile_step_2.txt"]
    table = (tmp_path / "profile_step_2.txt").read_text()
    assert "aten::cholesky_inverse" in table and "aten::add" not in table
