"""The job's processes: a SIGTERM / SIGINT stops every rank after the same step, with a
checkpoint and one line; workers die with their launcher; one job per output directory."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from lasp.launch.process import LAUNCHER_PID_ENV, GracefulStop, lock_output_dir
from lasp.launch.train import main
from tests.distributed import run_distributed
from tests.launch.conftest import REPO, finish, losses, start_train


def _stop_body(rank, world_size):
    group = dist.new_group(backend="gloo")
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stop = GracefulStop()
    if rank == 0:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the set-up, on rank 0 only
    assert stop.start(group) == signal.SIGINT  # every rank learns it before the first step
    stop.close()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before

    stop = GracefulStop()
    assert stop.start(group) is None
    for step in range(1, 10):
        stop.share()
        if rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # a SIGTERM to rank 1 only, in the middle of step 3
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a second one stops it at once
        received = stop.agreed()
        if received:
            break
    assert (step, received) == (4, signal.SIGTERM)  # every rank stops after the same step
    stop.close()


def test_ranks_agree_on_a_signal():
    run_distributed(_stop_body, 2)


def test_sigterm_stops_after_a_step_with_a_checkpoint(baseline, tmp_path):
    """SIGTERM to `lasp-train` (a scheduler's preemption): the workers finish their step, write a
    checkpoint, and the job ends with one line, exit status 128 + 15, and no traceback."""
    process = start_train(tmp_path, "--steps", 200, "--log-every", 1)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 150
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert process.poll() is None and time.monotonic() < deadline, "the run never reached step 2"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    result = finish(process, timeout=120)
    assert result.returncode == 128 + signal.SIGTERM, result.stdout + result.stderr
    last = result.stdout.splitlines()[-1]
    match = re.fullmatch(r"lasp-train: stopped by SIGTERM after step (\d+) of 200; checkpoint (\S+): run the "
                         r"same command to resume", last)
    assert match, result.stdout
    step = int(match[1])
    assert Path(match[2]) == tmp_path / "checkpoints" / f"step_{step}" and Path(match[2]).is_dir()
    assert "Traceback" not in result.stdout + result.stderr
    assert [line for line in result.stderr.splitlines() if "distributed/run.py" not in line] == []  # (OMP note)
    run = losses(tmp_path)
    assert sorted(run) == list(range(1, step + 1))
    expected = losses(baseline[0])  # the same first steps (the warm-up does not depend on --steps)
    assert {s: run[s] for s in run if s <= 6} == {s: expected[s] for s in expected if s <= step}


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"  # a zombie has died
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_worker_dies_with_its_launcher():
    """A worker in a session of its own (as torchrun starts them) is killed when its launcher is."""
    worker = ("from lasp.launch.process import die_with_launcher; die_with_launcher(); print('ready', flush=True); "
              "import time; time.sleep(120)")
    launcher = (f"import os, subprocess, sys; os.environ['{LAUNCHER_PID_ENV}'] = str(os.getpid()); "
                f"p = subprocess.Popen([sys.executable, '-c', {worker!r}], start_new_session=True); "
                "print(p.pid, flush=True); p.wait()")
    process = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True, cwd=REPO)
    worker_pid = int(process.stdout.readline())
    try:
        assert process.stdout.readline() == "ready\n"
        process.kill()  # SIGKILL: the launcher cannot pass anything on
        process.wait()
        deadline = time.monotonic() + 10
        while _alive(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker_pid)
    finally:
        if _alive(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)


def test_one_job_per_output_directory(tmp_path, capsys):
    held = lock_output_dir(str(tmp_path))
    with pytest.raises(ValueError, match=rf"--output-dir {tmp_path} is in use by another lasp-train job "
                                         rf"\(pid {os.getpid()} on "):
        lock_output_dir(str(tmp_path))
    # the command says so in one line, before it starts any process
    assert main(["--output-dir", str(tmp_path), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lasp-train: error: --output-dir {tmp_path} is in use") and err.count("\n") == 1
    held.close()
    lock_output_dir(str(tmp_path)).close()  # free again once the job ends
