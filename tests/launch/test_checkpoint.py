"""Checkpoints: keep-last-N and atomic saves, what a resume restores, and the end-to-end
guarantees: a stopped and resumed run, and a run whose rank is killed under torchrun
--max-restarts, have exactly the losses of the uninterrupted run."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lasp.launch.checkpoint import Checkpointer, checkpoints
from lasp.launch.config import Config
from lasp.launch.mesh import init_distributed
from lasp.launch.train import FAULT_ENV
from tests.distributed import run_distributed
from tests.launch.conftest import BASELINE_ARGS, losses, run_train


class FakeEngine:
    """An engine whose whole state is one tensor (the checkpointer only calls save/load)."""

    def __init__(self, value):
        self.value = torch.tensor(float(value))

    def save(self, path):
        torch.save(self.value, Path(path) / "engine.pt")

    def load(self, path):
        self.value = torch.load(Path(path) / "engine.pt")


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
    assert checkpointer.to_resume() is None
    assert [s for s in range(1, 8) if checkpointer.due(s, last_step=7)] == [2, 4, 6, 7]
    scheduler = _scheduler()
    for step in range(1, 5):
        scheduler.step()
        torch.manual_seed(step)
        checkpointer.save(step, FakeEngine(step), scheduler, FakeData(10 * step))
    expected_random = torch.rand(3)
    root = Path(output_dir) / "checkpoints"
    assert [p.name for p in checkpoints(root)] == ["step_3", "step_4"]  # the last 2
    (root / "step_9.tmp").mkdir()  # a save that crashed: never resumed from
    assert checkpointer.to_resume() == root / "step_4"

    engine, scheduler, data = FakeEngine(0), _scheduler(), FakeData(0)
    torch.manual_seed(1234)
    assert checkpointer.load(root / "step_4", engine, scheduler, data) == 4
    assert engine.value == 4 and data.position == 40
    assert scheduler.get_last_lr() == pytest.approx([1 / 5])
    assert torch.equal(torch.rand(3), expected_random)  # the RNG continues where it was saved


def test_checkpointer(tmp_path):
    run_distributed(_checkpointer_body, 1, str(tmp_path))


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
    expected = losses(baseline[0])
    assert losses(tmp_path) == pytest.approx(expected, rel=1e-6, abs=0)


def test_killed_rank_recovers_under_max_restarts(baseline, tmp_path):
    result = run_train(tmp_path, *BASELINE_ARGS, "--max-restarts", 1, env={FAULT_ENV: "1:5"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("lasp-train: tiny") == 2  # the first attempt and the restart
    assert "steps 4-6" in result.stdout and "resumed from" in result.stdout
    assert losses(tmp_path) == pytest.approx(losses(baseline[0]), rel=1e-6, abs=0)
