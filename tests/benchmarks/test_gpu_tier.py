"""benchmarks/gpu_tier.py: a group cut at its time limit still reports the failures so far."""

import io

from benchmarks import gpu_tier

SLOW_GROUP = '''
import time
import pytest

@pytest.mark.gpu
def test_fails():
    assert 1 == 2, "boom"

@pytest.mark.gpu
def test_passes():
    pass

@pytest.mark.gpu
def test_hangs():
    time.sleep(600)
'''


def test_group_interrupted_at_its_limit_keeps_its_failures(tmp_path, monkeypatch):
    (tmp_path / "test_slow.py").write_text(SLOW_GROUP)
    monkeypatch.chdir(tmp_path)
    log = io.StringIO()
    result = gpu_tier.run_group(["test_slow.py"], 8, log)
    assert result["timed_out"] and result["seconds"] < 60
    assert (result["passed"], result["failed"]) == (1, 1)
    assert result["failures"] == ["FAILED test_slow.py::test_fails - AssertionError: boom"]
    assert "interrupted at the limit" in log.getvalue()
