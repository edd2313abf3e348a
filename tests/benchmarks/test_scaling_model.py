"""CPU tests of the scaling and memory models' pure functions (benchmarks/scaling.py,
benchmarks/memory.py) and of their --model-only runs on the committed JSON."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module       # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


scaling = _load("scaling")
memory = _load("memory")
NET = scaling.Network()


def test_all_gather_is_alpha_beta():
    assert scaling.all_gather_time(NET, 1, 1e6) == 0.0
    n = 3 * 2 ** 20
    expected = NET.launch + 7 * (NET.intra_latency + n / NET.intra_bw)
    assert scaling.all_gather_time(NET, 8, n) == pytest.approx(expected)
    # across nodes every step pays the network latency, and the node's NICs bound the bandwidth
    bw = min(NET.intra_bw, NET.gpus_per_node * NET.inter_bw)
    assert scaling.all_gather_time(NET, 16, n) == pytest.approx(NET.launch + 15 * (NET.inter_latency + n / bw))
    times = [scaling.all_gather_time(NET, W, n) for W in (2, 4, 8, 16, 64, 256)]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert scaling.all_gather_time(NET, 8, 2 * n) > scaling.all_gather_time(NET, 8, n)


def test_chain_pipelining_and_log_depth():
    n = 2 ** 20
    serial = scaling.chain_time(NET, 64, n)
    assert scaling.chain_hops(NET, 64).count(True) == 7            # 8 nodes: 7 crossings
    assert scaling.all_scan_time(NET, 64, n) < serial               # pieces overlap the hops
    assert scaling.chain_time(NET, 64, n, 1, per_hop_compute=1e-4) == pytest.approx(serial + 63e-4)
    one_round = NET.launch + NET.intra_latency + n / NET.intra_bw
    assert scaling.log_scan_time(NET, 2, n) == pytest.approx(one_round)
    assert scaling.log_scan_time(NET, 5, n) == pytest.approx(3 * one_round)   # ceil(log2 5) rounds
    assert scaling.log_scan_time(NET, 1, n) == 0.0


def test_overlapped_between_max_and_sum():
    assert scaling.overlapped(3.0, 2.0, 1.0) == 3.0
    assert scaling.overlapped(3.0, 2.0, 0.0) == 5.0
    assert 3.0 < scaling.overlapped(3.0, 2.0, 0.5) < 5.0


def test_choose_exchange():
    params = scaling.ExchangeParams(NET)
    assert scaling.choose_exchange(1, 1e6, params) == "all_gather"          # nothing to exchange: a tie
    state = 32 * 64 * 64 * 4
    assert scaling.choose_exchange(256, state, params) == "log_scan"
    # two ranks, no local walk: every exchange is one hop, a tie that keeps the all-gather
    free = scaling.ExchangeParams(NET, walk_step=0.0, combine=0.0)
    times = {kind: scaling.exchange_time(kind, 2, state, free) for kind in scaling.EXCHANGES}
    assert max(times.values()) == pytest.approx(min(times.values()))
    assert scaling.choose_exchange(2, state, free) == "all_gather"
    # the all-gather brings W summaries: with a costly walk and many ranks it loses
    assert scaling.exchange_time("all_gather", 64, state, params) > scaling.exchange_time("log_scan", 64, state, params)
    for kind in scaling.EXCHANGES:
        assert scaling.exchange_time(kind, 64, state, params) > 0
    with pytest.raises(ValueError, match="world_size"):
        scaling.choose_exchange(0, 1e6, params)
    with pytest.raises(ValueError, match="state_bytes"):
        scaling.choose_exchange(8, 0, params)
    with pytest.raises(ValueError, match="kind"):
        scaling.exchange_time("ring", 8, 1e6, params)


def test_shape_matches_the_preset():
    from lasp.models import linear_llama_config
    config = linear_llama_config("linear-llama3-1b")
    shape = scaling.LINEAR_LLAMA3_1B
    assert (shape.layers, shape.heads, shape.kv_heads, shape.head_dim, shape.hidden) == (
        config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
        config.hidden_size)
    assert shape.state_bytes("identity") == 32 * 64 * 64 * 4
    assert shape.state_bytes("dense") == 2 * shape.state_bytes("identity")


def test_interpolate():
    assert scaling.interpolate([1, 2, 4], [10, 20, 40], 3) == pytest.approx(30)
    assert scaling.interpolate([1, 2, 4], [10, 20, 40], 8) == pytest.approx(80)       # linear beyond
    assert scaling.interpolate([1, 2], [10, 20], -100) == 0.0


@pytest.fixture(scope="module")
def setup():
    return scaling.Setup(scaling.Calibration.load(scaling.INTERIM))


def test_step_time_sanity(setup):
    steps = [scaling.step_time(setup, "L", "lasp2", 64, T)["step"] for T in (2 ** 16, 2 ** 20, 2 ** 23)]
    assert steps == sorted(steps)
    one = {m: scaling.step_time(setup, "LLLN", m, 1, 32768)["step"] for m in scaling.METHODS}
    assert max(one.values()) == pytest.approx(min(one.values()))              # W = 1: no exchange at all
    for W in (8, 64, 256):
        assert scaling.weak_scaling_efficiency(setup, "L", "lasp2", W, W * 32768) <= 1.0
        slow = scaling.linear_layer_time(setup, "lasp1_paper", W, 32768)["total"]
        assert slow > scaling.linear_layer_time(setup, "lasp1", W, 32768)["total"]
    # an all-gather that grows with W: exposed communication grows with W at a fixed local length
    exposed = [scaling.step_time(setup, "L", "lasp2", W, W * 8192)["exposed_comm"] for W in (8, 32, 128)]
    assert exposed == sorted(exposed) and exposed[0] > 0
    without = scaling.Setup(setup.cal, checkpointing=False)
    assert scaling.step_time(without, "L", "lasp2", 8, 2 ** 18)["attention"] < \
        scaling.step_time(setup, "L", "lasp2", 8, 2 ** 18)["attention"]


def test_interim_calibration_is_reproducible():
    assert json.loads(scaling.INTERIM.read_text()) == json.loads(json.dumps(scaling.build_interim()))
    assert json.loads(memory.INTERIM.read_text()) == json.loads(json.dumps(memory.build_interim()))


def test_memory_model():
    fit = memory.build_interim()
    limit = (80 - 2) * 1e9
    for pattern in memory.PATTERNS:
        L1 = memory.max_local_tokens(fit, pattern, 1, 80)
        assert L1 > 0 and memory.per_rank_bytes(fit, pattern, 1, L1)["total"] <= limit
        assert memory.per_rank_bytes(fit, pattern, 1, L1 + 1024)["total"] > limit
        assert memory.max_local_tokens(fit, pattern, 1, 141) > L1
        assert memory.per_rank_bytes(fit, pattern, 1, L1)["lasp2h"] == 0.0
        longest = [w * memory.max_local_tokens(fit, pattern, w, 80) for w in (1, 4, 16, 64)]
        assert longest == sorted(longest)
    # softmax layers hold the gathered keys of the whole sequence: more per rank as W grows
    hybrid = [memory.per_rank_bytes(fit, "LLLN", W, 65536)["lasp2h"] for W in (2, 8, 32)]
    assert hybrid == sorted(hybrid) and hybrid[0] > 0
    assert memory.heads_fraction(2 ** 16) == 1.0 and memory.heads_fraction(2 ** 24) < 1.0
    assert memory.fit_line([1, 2, 3], [5, 7, 9]) == pytest.approx((3, 2))


def test_model_only_runs_end_to_end(tmp_path, capsys):
    result = scaling.run_model(scaling.INTERIM, tmp_path, quiet=True)
    assert result["label"].startswith("PROJECTED")
    assert (tmp_path / "scaling_projection_interim.json").exists()
    assert {r["best_exchange"] for r in result["projection"]} <= set(scaling.EXCHANGES)
    assert all(math.isfinite(r["tokens_per_s_per_gpu"]) and r["tokens_per_s_per_gpu"] > 0
               for r in result["projection"])
    assert len(result["paper_check"]) == 5
    memory.main(["--model-only", "--fit", str(memory.INTERIM), "--out", str(tmp_path)])
    assert "PROJECTED" in capsys.readouterr().out
    rows = json.loads((tmp_path / "memory_projection_interim.json").read_text())["rows"]
    assert len(rows) == len(memory.PATTERNS) * len(memory.CARDS_GB) * len(memory.WORLD_SIZES)
