"""GPU check of `lasp-train`: the 1B Linear-Llama, a few steps, tokens/s/GPU, MFU and peak memory.

    python benchmarks/train_gpu_check.py                  # one GPU (SP = 1)
    python benchmarks/train_gpu_check.py --gpus 2         # two GPUs of one node, SP = 2

Each configuration (layer pattern × tokens per GPU) is one `python -m lasp.launch.train`
run: `linear-llama3-1b` with its 128K vocabulary, synthetic packed documents (no
`datasets`, no download), bf16 under FSDP2, activation checkpointing from 131K tokens per
GPU, `--steps` steps. Throughput excludes the first `--log-every` steps (compilation and
warm-up). Prints a table and writes JSON to $OUT (or benchmarks/results/) after every run,
so an interrupted check keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run(pattern: str, tokens_per_gpu: int, gpus: int, steps: int, timeout: int) -> dict:
    checkpointing = tokens_per_gpu >= 131072
    with tempfile.TemporaryDirectory() as output_dir:
        command = [sys.executable, "-m", "lasp.launch.train", "--model", "linear-llama3-1b",
                   "--layer-pattern", pattern, "--model-overrides", json.dumps({"vocab_size": 128256}),
                   "--dataset", "synthetic", "--seq-len", str(tokens_per_gpu * gpus), "--sp-size", str(gpus),
                   "--nproc-per-node", str(gpus), "--steps", str(steps), "--warmup-steps", "2",
                   "--log-every", "3", "--output-dir", output_dir, "--no-tensorboard",
                   "--activation-checkpointing" if checkpointing else "--no-activation-checkpointing"]
        result = {"pattern": pattern, "tokens_per_gpu": tokens_per_gpu, "seq_len": tokens_per_gpu * gpus,
                  "sp": gpus, "activation_checkpointing": checkpointing, "steps": steps}
        try:
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as error:
            return {**result, "status": f"timeout after {timeout}s", "log_tail": str(error.stdout)[-3000:]}
        summary_file = Path(output_dir) / "summary.json"
        if done.returncode or not summary_file.exists():
            return {**result, "status": f"failed (exit {done.returncode})",
                    "log_tail": (done.stdout + done.stderr)[-3000:]}
        summary = json.loads(summary_file.read_text())
        records = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
        return {**result, "status": "ok", "tokens_per_s_per_gpu": summary["tokens_per_s_per_gpu"],
                "mfu": summary["mfu"], "peak_memory_gb": summary["peak_memory_gb"],
                "flops_per_token": summary["flops_per_token"], "losses": [r["loss"] for r in records]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=1, help="GPUs of this node (SP degree)")
    parser.add_argument("--patterns", default="L,LLLN", help="layer patterns, comma-separated")
    parser.add_argument("--tokens-per-gpu", default="32768,131072", help="comma-separated")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per run")
    args = parser.parse_args()
    import triton
    out_dir = Path(os.environ.get("OUT") or REPO / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / f"train_gpu_check_{args.gpus}gpu.json"
    report = {"device": torch.cuda.get_device_name(0), "gpus": args.gpus, "torch": torch.__version__,
              "triton": triton.__version__, "model": "linear-llama3-1b (vocab 128256)", "runs": []}
    print(f"{'pattern':>8} {'tokens/GPU':>10} {'SP':>3} {'AC':>3} {'tokens/s/GPU':>13} {'MFU':>6} {'peak GB':>8}  status",
          flush=True)
    for pattern in args.patterns.split(","):
        for tokens in map(int, args.tokens_per_gpu.split(",")):
            r = run(pattern, tokens, args.gpus, args.steps, args.timeout)
            report["runs"].append(r)
            out_file.write_text(json.dumps(report, indent=2))
            ok = r["status"] == "ok"
            print(f"{pattern:>8} {tokens:>10} {args.gpus:>3} {'y' if r['activation_checkpointing'] else 'n':>3} "
                  f"{r['tokens_per_s_per_gpu'] if ok else float('nan'):>13,.0f} "
                  f"{100 * r['mfu'] if ok and r['mfu'] else float('nan'):>5.1f}% "
                  f"{r['peak_memory_gb'] if ok else float('nan'):>8.1f}  {r['status']}", flush=True)
            if not ok:
                print(r["log_tail"], flush=True)
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
