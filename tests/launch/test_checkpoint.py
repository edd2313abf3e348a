"""Checkpoints: keep-last-N and atomic saves, what a resume restores, a damaged checkpoint,
and the end-to-end guarantees: a stopped and resumed run, a run whose rank is killed under
torchrun --max-restarts, and a run whose latest checkpoint is damaged have exactly the
losses of the uninterrupted run; a finished job run again is left as it is."""

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lasp.launch.checkpoint import Checkpointer, checkpoints
from lasp.launch.config import Config
from lasp.launch.mesh import init_distributed
from lasp.launch.train import FAULT_ENV
from tests.distributed import run_distributed
from tests.launch.conftest import BASELINE_ARGS, losses, run_train


class FakeEngine:
    """An engine whose whole state is one tensor per rank (the checkpointer only calls save/load)."""

    def __init__(self, value):
        self.value = torch.tensor(float(value))

    def save(self, path):
        torch.save(self.value, Path(path) / f"engine_rank{dist.get_rank()}.pt")

    def load(self, path):
        self.value = torch.load(Path(path) / f"engine_rank{dist.get_rank()}.pt")


class FakeData:
    def __init__(self, position):
        self.position = position

    def state_dict(self):
        return {"document": self.position}

    def load_state_dict(self, state):
        self.position = state["document"]


def _scheduler():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: 1 / (done + 1))


def _checkpointer_body(rank, world_size, output_dir):
    config = replace(Config().checkpoint, output_dir=output_dir, checkpoint_every=2, keep_last=2)
    d = init_distributed(1, "cpu", 60)
    checkpointer = Checkpointer(config, d)
    assert checkpointer.restore(FakeEngine(0), _scheduler(), FakeData(0)) is None  # nothing to resume
    assert [s for s in range(1, 8) if checkpointer.due(s, last_step=7)] == [2, 4, 6, 7]
    scheduler = _scheduler()
    for step in range(1, 5):
        scheduler.step()
        torch.manual_seed(step)
        checkpointer.save(step, FakeEngine(step), scheduler, FakeData(10 * step))
    expected_random = torch.rand(3)
    root = Path(output_dir) / "checkpoints"
    assert [p.name for p in checkpoints(root)] == ["step_3", "step_4"]  # the last 2
    dist.barrier()
    if rank == 0:
        (root / "step_9.tmp").mkdir()  # a save that crashed: never resumed from

    engine, scheduler, data = FakeEngine(0), _scheduler(), FakeData(0)
    torch.manual_seed(1234)
    path, state = checkpointer.restore(engine, scheduler, data)
    assert path == root / "step_4" and state["step"] == 4
    assert engine.value == 4 and data.position == 40
    assert scheduler.get_last_lr() == pytest.approx([1 / 5])
    assert torch.equal(torch.rand(3), expected_random)  # the RNG continues where it was saved


def test_checkpointer(tmp_path):
    run_distributed(_checkpointer_body, 2, str(tmp_path))


def _damaged_body(rank, world_size, output_dir):
    config = replace(Config().checkpoint, output_dir=output_dir, checkpoint_every=1, keep_last=3)
    checkpointer = Checkpointer(config, init_distributed(1, "cpu", 60))
    for step in (1, 2, 3):
        checkpointer.save(step, FakeEngine(step), _scheduler(), FakeData(step))
    root = Path(output_dir) / "checkpoints"
    dist.barrier()
    if rank == 1:  # a file cut short (a full disk) on one rank only
        with open(root / "step_3" / "engine_rank1.pt", "r+b") as f:
            f.truncate(100)
    dist.barrier()
    engine = FakeEngine(0)
    path, state = checkpointer.restore(engine, _scheduler(), FakeData(0))
    assert (path, state["step"], engine.value) == (root / "step_2", 2, 2)  # on every rank: the one before
    dist.barrier()
    assert sorted(p.name for p in root.iterdir()) == ["step_1", "step_2", "step_3.damaged"]

    named = replace(config, resume=str(root / "step_3.damaged"))  # one named by --resume: an error
    with pytest.raises(ValueError, match=r"--resume .*step_3.damaged: the checkpoint does not load: rank 1: "):
        Checkpointer(named, checkpointer.dist).restore(FakeEngine(0), _scheduler(), FakeData(0))
    dist.barrier()
    if rank == 0:
        for step in (1, 2):
            (root / f"step_{step}" / "trainer_rank0.pt").write_bytes(b"")
    dist.barrier()
    with pytest.raises(ValueError, match=r"no checkpoint under .* loads \(renamed step_2.damaged, step_1.damaged\)"):
        checkpointer.restore(FakeEngine(0), _scheduler(), FakeData(0))


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, capfd):
    run_distributed(_damaged_body, 2, str(tmp_path))
    assert "lasp-train: warning: checkpoint " in capfd.readouterr().err


def test_stop_and_resume_gives_the_uninterrupted_losses(baseline, tmp_path):
    """Rank 1 dies before step 5 (no restarts): the job fails with the step-3 checkpoint written
    and metrics up to step 4; the same command again resumes from step 3 and finishes."""
    stopped = run_train(tmp_path, *BASELINE_ARGS, env={FAULT_ENV: "1:5"})
    assert stopped.returncode != 0
    assert [p.name for p in checkpoints(tmp_path / "checkpoints")] == ["step_3"]
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]
    resumed = run_train(tmp_path, *BASELINE_ARGS)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "steps 4-6" in resumed.stdout
    assert losses(tmp_path) == losses(baseline[0])  # exactly


def test_killed_rank_recovers_under_max_restarts(baseline, tmp_path):
    result = run_train(tmp_path, *BASELINE_ARGS, "--max-restarts", 1, env={FAULT_ENV: "1:5"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("lasp-train: tiny") == 2  # the first attempt and the restart
    assert "steps 4-6" in result.stdout and "resumed from" in result.stdout
    assert losses(tmp_path) == losses(baseline[0])  # exactly


def test_damaged_latest_checkpoint_and_a_finished_job(baseline, tmp_path):
    """The baseline, as if it had died just after its step-6 checkpoint was written cut short
    (no summary.json): the same command warns, renames it, resumes from step 3 (under
    --max-restarts too, without a restart) and gives the uninterrupted losses. Run again, the
    finished job says so and keeps its files."""
    shutil.copytree(baseline[0], tmp_path, dirs_exist_ok=True)
    (tmp_path / "summary.json").unlink()
    shard = sorted((tmp_path / "checkpoints" / "step_6").glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    resumed = run_train(tmp_path, *BASELINE_ARGS, "--max-restarts", 1)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"lasp-train: warning: checkpoint {tmp_path / 'checkpoints' / 'step_6'} does not load (rank " \
           in resumed.stderr and "renamed to step_6.damaged" in resumed.stderr
    assert resumed.stdout.count("lasp-train: tiny") == 1 and "steps 4-6 (resumed from" in resumed.stdout
    assert losses(tmp_path) == losses(baseline[0])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_3", "step_6", "step_6.damaged"]

    files = {name: (tmp_path / name).read_bytes() for name in ("summary.json", "metrics.jsonl")}
    again = run_train(tmp_path, *BASELINE_ARGS)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.strip() == (f"lasp-train: nothing to do: the job in {tmp_path} is finished (its checkpoint "
                                    "is at step 6; a larger --steps trains on); its summary.json and metrics.jsonl "
                                    "are left as they are")
    assert {name: (tmp_path / name).read_bytes() for name in files} == files
