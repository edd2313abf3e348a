"""GPU check of `lasp-train`: the 1B Linear-Llama, a few steps, tokens/s/GPU, MFU and peak memory.

    python benchmarks/train_gpu_check.py                  # one GPU (SP = 1)
    python benchmarks/train_gpu_check.py --gpus 2         # two GPUs of one node, SP = 2

    python benchmarks/train_gpu_check.py --tokens-per-gpu 65536 --variants full,selective,compile
    python benchmarks/train_gpu_check.py --patterns L --tokens-per-gpu 1048576 --variants long

Each configuration (layer pattern × tokens per GPU × variant) is one `python -m
lasp.launch.train` run: `linear-llama3-1b` with its 128K vocabulary, synthetic packed
documents (no `datasets`, no download), bf16 under FSDP2, `--steps` steps. A variant
names the speed and memory switches (`VARIANTS`): `auto` checkpoints every block from
131K tokens per GPU; `long` adds host offload of the checkpointed inputs and 16K-token
tiles of norms and MLP (the ALST way to 1M tokens on one GPU); `compile+acN` checkpoints
only the first N of the 16 blocks. Throughput excludes the
first `--log-every` steps (compilation and warm-up). Prints a table and writes JSON to $OUT
(or benchmarks/results/) after every run, so an interrupted check keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


# variant -> lasp-train switches (auto: decided by the length, in `switches`)
VARIANTS = {
    "auto": None,
    "none": ["--activation-checkpointing", "none"],
    "full": ["--activation-checkpointing", "full"],
    "selective": ["--activation-checkpointing", "selective"],
    "compile": ["--compile", "--activation-checkpointing", "none"],
    "compile+full": ["--compile", "--activation-checkpointing", "full"],
    "compile+selective": ["--compile", "--activation-checkpointing", "selective"],
    "long": ["--activation-checkpointing", "full", "--offload-activations", "--tile-tokens", "16384"],
}


def checkpointed_blocks(variant: str) -> str | None:
    """N of a `compile+acN` variant (compiled, the first N blocks checkpointed), else None."""
    blocks = variant.removeprefix("compile+ac")
    return blocks if blocks != variant and blocks.isdigit() else None


def switches(variant: str, tokens_per_gpu: int) -> list[str]:
    """lasp-train's switches of `variant` at this length."""
    blocks = checkpointed_blocks(variant)
    if blocks is not None:
        return ["--compile", "--activation-checkpointing", "full", "--activation-checkpointing-blocks", blocks]
    if VARIANTS[variant] is None:
        return ["--activation-checkpointing", "full" if tokens_per_gpu >= 131072 else "none"]
    return VARIANTS[variant]


def run(pattern: str, tokens_per_gpu: int, variant: str, gpus: int, steps: int, timeout: int,
        profile_step: int = 0, out_dir: Path | None = None) -> dict:
    """One lasp-train run; with `profile_step`, its per-op table of that step is copied to
    `out_dir` as profile_<pattern>_<tokens>_<variant, + as _>.txt."""
    flags = switches(variant, tokens_per_gpu)
    if profile_step:
        flags = [*flags, "--profile-step", str(profile_step)]
    with tempfile.TemporaryDirectory() as output_dir:
        command = [sys.executable, "-m", "lasp.launch.train", "--model", "linear-llama3-1b",
                   "--layer-pattern", pattern, "--model-overrides", json.dumps({"vocab_size": 128256}),
                   "--dataset", "synthetic", "--seq-len", str(tokens_per_gpu * gpus), "--sp-size", str(gpus),
                   "--nproc-per-node", str(gpus), "--steps", str(steps), "--warmup-steps", "2",
                   "--log-every", "3", "--output-dir", output_dir, "--no-tensorboard", *flags]
        result = {"pattern": pattern, "tokens_per_gpu": tokens_per_gpu, "seq_len": tokens_per_gpu * gpus,
                  "sp": gpus, "variant": variant, "switches": " ".join(flags), "steps": steps}
        try:
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as error:
            return {**result, "status": f"timeout after {timeout}s", "log_tail": str(error.stdout)[-3000:]}
        summary_file = Path(output_dir) / "summary.json"
        if done.returncode or not summary_file.exists():
            return {**result, "status": f"failed (exit {done.returncode})",
                    "log_tail": (done.stdout + done.stderr)[-3000:]}
        summary = json.loads(summary_file.read_text())
        profile = Path(output_dir) / f"profile_step_{profile_step}.txt"
        if profile_step and profile.exists():
            shutil.copy(profile, out_dir / f"profile_{pattern}_{tokens_per_gpu}_{variant.replace('+', '_')}.txt")
        records = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
        return {**result, "status": "ok", "tokens_per_s_per_gpu": summary["tokens_per_s_per_gpu"],
                "mfu": summary["mfu"], "peak_memory_gb": summary["peak_memory_gb"],
                "flops_per_token": summary["flops_per_token"], "losses": [r["loss"] for r in records]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=1, help="GPUs of this node (SP degree)")
    parser.add_argument("--patterns", default="L,LLLN", help="layer patterns, comma-separated")
    parser.add_argument("--tokens-per-gpu", default="32768,131072", help="comma-separated")
    parser.add_argument("--variants", default="auto",
                        help=f"comma-separated, of {', '.join(VARIANTS)}, compile+acN (N of the 16 blocks "
                             "checkpointed)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per run")
    parser.add_argument("--profile-step", type=int, default=0,
                        help="record this step of each run with torch.profiler (a warm-up step, e.g. 3: "
                             "throughput excludes the first 3 steps); its per-op table goes beside the JSON")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS and checkpointed_blocks(v) is None]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    import triton
    out_dir = Path(os.environ.get("OUT") or REPO / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / f"train_gpu_check_{args.gpus}gpu.json"
    report = {"device": torch.cuda.get_device_name(0), "gpus": args.gpus, "torch": torch.__version__,
              "triton": triton.__version__, "model": "linear-llama3-1b (vocab 128256)", "runs": []}
    print(f"{'pattern':>8} {'tokens/GPU':>10} {'SP':>3} {'variant':>12} {'tokens/s/GPU':>13} {'MFU':>6} "
          f"{'peak GB':>8}  status", flush=True)
    for pattern in args.patterns.split(","):
        for tokens in map(int, args.tokens_per_gpu.split(",")):
            for variant in variants:
                r = run(pattern, tokens, variant, args.gpus, args.steps, args.timeout, args.profile_step, out_dir)
                report["runs"].append(r)
                out_file.write_text(json.dumps(report, indent=2))
                ok = r["status"] == "ok"
                print(f"{pattern:>8} {tokens:>10} {args.gpus:>3} {variant:>12} "
                      f"{r['tokens_per_s_per_gpu'] if ok else float('nan'):>13,.0f} "
                      f"{100 * r['mfu'] if ok and r['mfu'] else float('nan'):>5.1f}% "
                      f"{r['peak_memory_gb'] if ok else float('nan'):>8.1f}  {r['status']}", flush=True)
                if not ok:
                    print(r["log_tail"], flush=True)
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
