"""Checkpoints: sharded, atomic, the last N kept; resuming restores everything a step depends on.

    <output_dir>/checkpoints/step_<N>/     model + optimizer (the engine's sharded format:
                                           torch.distributed.checkpoint for FSDP2)
                                 trainer_rank<r>.pt   step, scheduler, RNG and data position of rank r

All ranks write into `step_<N>.tmp`; after a barrier rank 0 renames it to `step_<N>`, so
a directory without `.tmp` is always complete (a crash mid-save leaves only a `.tmp`).
A checkpoint that is complete but does not load on some rank (a file truncated by a full
disk, say) is renamed `step_<N>.damaged` and the previous one is resumed, with a warning.
The output directory must be shared by all nodes.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from lasp.launch.process import first_error

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


def describe(error: BaseException, rank: int) -> str:
    """One line for `rank`'s load error (torch.distributed.checkpoint's: its first failed rank's)."""
    if isinstance(error, CheckpointException) and error.failures:
        rank, (error, _) = min(error.failures.items())
    first = str(error).strip().split("\n")[0].split(". ")[0]
    return f"rank {rank}: {type(error).__name__}" + (f": {first[:160]}" if first else "")


class Checkpointer:
    def __init__(self, config, dist_state, train=None):
        """`config`: the checkpoint section; `train`: the train section, recorded in each
        checkpoint so that a resumed run can say which of its options changed."""
        self.root = Path(config.output_dir) / "checkpoints"
        self.every, self.keep, self.resume = config.checkpoint_every, config.keep_last, config.resume
        self.dist, self.train = dist_state, train

    def due(self, step: int, last_step: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == last_step)

    def _trainer_state(self, step, scheduler, data) -> dict:
        return {"step": step, "world_size": self.dist.world_size, "sp_size": self.dist.sp_size,
                "scheduler": scheduler.state_dict(), "rng": rng_state(self.dist.device),
                "data": data.state_dict(), "train": None if self.train is None else asdict(self.train)}

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

    def restore(self, engine, scheduler, data) -> tuple[Path, dict] | None:
        """Restore the checkpoint --resume names: auto is the newest under the output directory
        that loads on every rank. Returns (the checkpoint, its trainer state), or None: a fresh
        start. Every rank takes the same decision."""
        if self.resume == "none":
            return None
        if self.resume != "auto":
            path = Path(self.resume)
            state, error = self.load(path, engine, scheduler, data)
            if error:
                raise ValueError(f"--resume {path}: the checkpoint does not load: {error}")
            return path, state
        damaged = []
        for path in reversed(checkpoints(self.root)):  # (listed before any rank renames one)
            state, error = self.load(path, engine, scheduler, data)
            if not error:
                return path, state
            damaged.append(path.with_name(path.name + ".damaged"))
            if self.dist.is_main:
                print(f"lasp-train: warning: checkpoint {path} does not load ({error}); renamed to "
                      f"{damaged[-1].name}, trying the previous one", file=sys.stderr, flush=True)
                os.rename(path, damaged[-1])
        if damaged:  # the model may hold part of a damaged checkpoint: do not train it
            raise ValueError(f"--resume auto: no checkpoint under {self.root} loads (renamed "
                             f"{', '.join(p.name for p in damaged)}); run again to start from step 1")
        return None

    def load(self, path: Path, engine, scheduler, data) -> tuple[dict | None, str | None]:
        """Restore everything from `path`: (its trainer state, None), or (None, the first rank's
        error) on every rank if it fails to load on any (a damaged file)."""
        file = path / f"trainer_rank{self.dist.rank}.pt"
        state, error = None, None
        if file.is_file():
            try:
                state = torch.load(file, weights_only=True)
            except Exception as exc:  # a truncated or corrupt file: any error of the unpickler
                error = describe(exc, self.dist.rank)
        missing = self._any(not file.is_file())
        if missing:
            raise ValueError(f"--resume {path}: no trainer state for some rank of this job of "
                             f"{self.dist.world_size} ranks (was the checkpoint written by a job of another size?)")
        error = first_error(error, self.dist.world_size)
        if error:
            return None, error
        if (state["world_size"], state["sp_size"]) != (self.dist.world_size, self.dist.sp_size):
            raise ValueError(f"--resume {path}: written by {state['world_size']} ranks with sp-size "
                             f"{state['sp_size']}; this job has {self.dist.world_size} ranks with sp-size "
                             f"{self.dist.sp_size} (the data position is per data-parallel rank)")
        try:
            engine.load(str(path))
        except (Exception, CheckpointException) as exc:  # (CheckpointException is a BaseException)
            error = describe(exc, self.dist.rank)
        error = first_error(error, self.dist.world_size)
        if error:
            return None, error
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], self.dist.device)
        data.load_state_dict(state["data"])
        return state, None

    def _any(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (at start-up only: it waits for every rank)."""
        value = torch.tensor([int(flag)], device=self.dist.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())
