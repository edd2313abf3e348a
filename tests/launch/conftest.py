"""Shared fixtures of the launcher tests: a small JSON-lines corpus of short documents."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

WORDS = "the of linear attention state chunk rank sequence token layer model gradient scan".split()


def write_corpus(path, n_docs=60, seed=0):
    """`n_docs` documents of 1 to 12 random words, one JSON object a line."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"id": i, "text": " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl")


def start_train(output_dir, *args, env=None) -> subprocess.Popen:
    """Start `python -m lasp.launch.train --output-dir OUTPUT_DIR ARGS...` (offline), as a user runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    env.pop("LOCAL_RANK", None)
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "lasp.launch.train", "--output-dir", str(output_dir), *map(str, args)]
    # its own session, so that a run that hangs is ended with all its workers
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=REPO, start_new_session=True)


def finish(process: subprocess.Popen, timeout=180) -> subprocess.CompletedProcess:
    """Wait for a `start_train` process (killed with its workers after `timeout` seconds)."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"lasp-train did not finish within {timeout}s:\n{stdout}{stderr}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_train(output_dir, *args, env=None, timeout=180) -> subprocess.CompletedProcess:
    """`python -m lasp.launch.train --output-dir OUTPUT_DIR ARGS...` (offline), to its end."""
    return finish(start_train(output_dir, *args, env=env), timeout)


def losses(output_dir) -> dict:
    """step -> loss of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"steps repeated or out of order: {steps}"
    return {r["step"]: r["loss"] for r in records}


# the resume and fault tests continue this run: 6 steps of the embedded default, checkpoints at 3 and 6
BASELINE_ARGS = ("--steps", 6, "--checkpoint-every", 3, "--log-every", 1)


@pytest.fixture(scope="session")
def baseline(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("baseline")
    result = run_train(output_dir, *BASELINE_ARGS)
    assert result.returncode == 0, result.stdout + result.stderr
    return output_dir, result
