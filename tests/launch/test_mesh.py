"""Engines. FSDP2 is checked against one process in test_train.py; here DeepSpeed ZeRO (when
installed: the `deepspeed` extra) must give the FSDP2 run's losses, through a killed rank
and a resume from its own checkpoint."""

import pytest

from lasp.launch.train import FAULT_ENV
from tests.launch.conftest import BASELINE_ARGS, losses, run_train


def test_deepspeed_engine_matches_fsdp(baseline, tmp_path):
    pytest.importorskip("deepspeed", reason="the optional engine: pip install 'lasp[deepspeed]'")
    result = run_train(tmp_path, *BASELINE_ARGS, "--engine", "deepspeed", "--max-restarts", 1,
                       env={FAULT_ENV: "1:5"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| deepspeed |" in result.stdout and "resumed from" in result.stdout
    assert losses(tmp_path) == pytest.approx(losses(baseline[0]), rel=1e-5)
