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
    result = gpu_tier.run_group(["test_slow.py"], 10, log)
    assert result["timed_out"] and result["seconds"] < 60
    assert (result["passed"], result["failed"]) == (1, 1)
    assert result["failures"] == ["FAILED test_slow.py::test_fails - AssertionError: boom"]
    assert "interrupted at the limit" in log.getvalue()


def _wheel(folder, name):
    """A minimal pure-Python wheel holding module `name`."""
    import zipfile
    path = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    files = {f"{name}.py": "VALUE = 1\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)


def test_wheels_install_one_by_one(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "lasp_probe_module")
    (wheels / "broken-1.0-py3-none-any.whl").write_text("not a zip")
    failed = gpu_tier.install_wheels(str(wheels), str(tmp_path / "site"))
    assert len(failed) == 1 and failed[0].startswith("broken-1.0-py3-none-any.whl:")
    assert (tmp_path / "site" / "lasp_probe_module.py").read_text() == "VALUE = 1\n"
