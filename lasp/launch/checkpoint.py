"""Checkpoints: sharded, atomic, the last N kept; resuming restores everything a step depends on.

    <output_dir>/checkpoints/step_<N>/     model + optimizer (the engine's sharded format:
                                           torch.distributed.checkpoint for FSDP2)
                                 trainer_rank<r>.pt   step, scheduler, RNG and data position of rank r

All ranks write into `step_<N>.tmp`; after a barrier rank 0 renames it to `step_<N>`, so
a directory without `.tmp` is always complete (a crash mid-save leaves only a `.tmp`).
The output directory must be shared by all nodes.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

STEP_DIR = re.compile(r"step_(\d+)")


def checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Checkpointer:
    def __init__(self, config, dist_state):
        self.root = Path(config.output_dir) / "checkpoints"
        self.every, self.keep, self.resume = config.checkpoint_every, config.keep_last, config.resume
        self.dist = dist_state

    def due(self, step: int, last_step: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == last_step)

    def _trainer_state(self, step, scheduler, data) -> dict:
        return {"step": step, "world_size": self.dist.world_size, "sp_size": self.dist.sp_size,
                "scheduler": scheduler.state_dict(), "rng": rng_state(self.dist.device),
                "data": data.state_dict()}

    def save(self, step: int, engine, scheduler, data) -> Path:
        final, tmp = self.root / f"step_{step}", self.root / f"step_{step}.tmp"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # a save that crashed
            tmp.mkdir(parents=True)
        dist.barrier()
        engine.save(str(tmp))
        torch.save(self._trainer_state(step, scheduler, data), tmp / f"trainer_rank{self.dist.rank}.pt")
        dist.barrier()
        if self.dist.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            for old in checkpoints(self.root)[:-self.keep]:
                shutil.rmtree(old)
        dist.barrier()
        return final

    def to_resume(self) -> Path | None:
        """The checkpoint --resume names: auto is the latest under the output directory."""
        if self.resume == "none":
            return None
        if self.resume == "auto":
            found = checkpoints(self.root)
            return found[-1] if found else None
        return Path(self.resume)

    def load(self, path: Path, engine, scheduler, data) -> int:
        """Restore everything from `path`; returns its step."""
        file = path / f"trainer_rank{self.dist.rank}.pt"
        if not file.is_file():
            raise ValueError(f"--resume {path}: no trainer state for rank {self.dist.rank} (was the "
                             "checkpoint written by a job of another size?)")
        state = torch.load(file, weights_only=True)
        if (state["world_size"], state["sp_size"]) != (self.dist.world_size, self.dist.sp_size):
            raise ValueError(f"--resume {path}: written by {state['world_size']} ranks with sp-size "
                             f"{state['sp_size']}; this job has {self.dist.world_size} ranks with sp-size "
                             f"{self.dist.sp_size} (the data position is per data-parallel rank)")
        engine.load(str(path))
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], self.dist.device)
        data.load_state_dict(state["data"])
        return state["step"]
