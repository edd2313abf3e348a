"""What a run reports: a progress bar on rank 0, a JSONL line per step, TensorBoard, a summary.

The bar shows the mean loss since the last update (one packed sequence is a noisy sample).

Losses stay on the device until a log step (every --log-every steps), so the loop waits
for the GPU only there. Throughput is tokens/s/GPU (the tokens of the global batch ÷
time ÷ ranks); MFU is that × training FLOPs per token ÷ the device's peak dense FLOP/s.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

# peak dense bf16 TFLOP/s by device name (first match wins)
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
               ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
               ("A10G", 70.0), ("L4", 121.0))


def flops_per_token(model, seq_len: int, chunk_size: int = 64) -> float:
    """Training FLOPs (forward + backward = 3 × forward) per token of a `seq_len` sequence.

    6 × the parameters of every matmul (all but the input embedding; the output projection
    counted once, tied or not), plus per layer and head (head dim D, causal):
    softmax attention 6·D·T (each token sees T/2 keys on average), linear attention
    6·D·C + 12·D² (the intra-chunk part over C/2 tokens, the state's read and update);
    Mixture-of-Memories that for each memory a token reaches (top-k + the shared one).
    Recomputation under activation checkpointing is not counted (the MFU convention).
    """
    config = model.config
    params = {id(p): p for p in model.parameters()}
    embedding = model.get_input_embeddings().weight
    matmul_params = sum(p.numel() for p in params.values()) - embedding.numel()
    if model.get_output_embeddings().weight is embedding:
        matmul_params += embedding.numel()
    H, D = config.num_attention_heads, config.head_dim
    linear = H * (6 * D * chunk_size + 12 * D * D)
    memories = getattr(config, "mom_top_k", 0) + int(getattr(config, "mom_shared_memory", False))
    per_kind = {"N": 6 * H * D * seq_len, "L": linear, "M": memories * linear}
    return 6.0 * matmul_params + sum(per_kind[kind] for kind in config.layer_kinds)


def peak_flops(device: torch.device, peak_tflops: float | None) -> float | None:
    """The device's peak dense FLOP/s: --peak-tflops, or the table by GPU name; None on CPU."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS if key in name), None)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: allocated on the GPU, resident on the host (CPU runs)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def _tensorboard(directory: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(directory / "tensorboard"))


def _progress_bar(total: int, initial: int):
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="lasp-train", unit="step", dynamic_ncols=True)


class Metrics:
    """Per-step records on every rank; rank 0 writes them and shows them."""

    def __init__(self, config, output_dir: str, dist_state, *, steps: int, start_step: int,
                 tokens_per_step: int, flops_per_token: float, peak: float | None):
        self.log_every, self.steps, self.start_step = config.log_every, steps, start_step
        self.dist, self.tokens_per_step = dist_state, tokens_per_step
        self.flops_per_token, self.peak = flops_per_token, peak
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor | None, float]] = []
        self.history: list[dict] = []
        self.intervals: list[tuple[int, float]] = []  # (steps, seconds) between log steps
        self.main = dist_state.is_main
        self.jsonl = Path(output_dir) / "metrics.jsonl"
        self.file = self.writer = self.bar = None
        if self.main:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)
            self.file = self._reopen_jsonl(start_step)
            self.writer = _tensorboard(Path(output_dir), config.tensorboard)
            self.bar = _progress_bar(steps, start_step)
        self.started = self.last_log = time.perf_counter()
        self.last_log_step = start_step

    def _reopen_jsonl(self, start_step: int):
        """Keep the records of the steps before `start_step` (a resumed run continues them)."""
        kept = []
        if start_step and self.jsonl.exists():
            kept = [line for line in self.jsonl.read_text().splitlines()
                    if line and json.loads(line)["step"] <= start_step]
        file = self.jsonl.open("w")
        file.writelines(line + "\n" for line in kept)
        return file

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None, lr: float) -> None:
        """Keep the step's (device) values; log every --log-every steps and at the last step."""
        self.pending.append((step, loss, grad_norm, lr))
        if step % self.log_every == 0 or step == self.steps:
            self._log(step)

    def _log(self, step: int) -> None:
        losses = torch.stack([loss.float() for _, loss, _, _ in self.pending]).tolist()  # waits for the device
        norms = [None if n is None else n.float() for _, _, n, _ in self.pending]
        norms = torch.stack(norms).tolist() if all(n is not None for n in norms) else [None] * len(norms)
        now = time.perf_counter()
        n_steps, seconds = step - self.last_log_step, now - self.last_log
        self.intervals.append((n_steps, seconds))
        rate = n_steps * self.tokens_per_step / seconds / self.dist.world_size
        mfu = None if self.peak is None else rate * self.flops_per_token / self.peak
        memory = peak_memory_gb(self.dist.device)
        for (s, _, _, lr), loss, norm in zip(self.pending, losses, norms):
            record = {"step": s, "loss": loss, "grad_norm": norm, "lr": lr, "tokens": s * self.tokens_per_step}
            if s == step:
                record.update(tokens_per_s_per_gpu=rate, mfu=mfu, peak_memory_gb=memory,
                              elapsed_s=now - self.started)
            self.history.append(record)
            if self.main:
                self.file.write(json.dumps(record) + "\n")
                if self.writer is not None:
                    self.writer.add_scalar("loss", loss, s)
                    self.writer.add_scalar("lr", lr, s)
        if self.main:
            self.file.flush()
            if self.writer is not None:
                self.writer.add_scalar("tokens_per_s_per_gpu", rate, step)
            text = (f"loss {sum(losses) / len(losses):.4f} | {rate:,.0f} tok/s/GPU | MFU "
                    f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | mem {memory:.2f} GB")
            if self.bar is not None:
                self.bar.update(n_steps)
                self.bar.set_postfix_str(text)
            else:
                print(f"step {step}/{self.steps} | {text}", flush=True)
        self.pending, self.last_log, self.last_log_step = [], now, step

    def summary(self) -> dict:
        """The run's summary (printed by rank 0): losses, throughput after the first log
        interval (warm-up), MFU, peak memory."""
        if self.pending:
            self._log(self.pending[-1][0])
        timed = self.intervals[1:] or self.intervals
        steps, seconds = sum(n for n, _ in timed), sum(s for _, s in timed)
        rate = steps * self.tokens_per_step / seconds / self.dist.world_size if seconds else math.nan
        losses = [r["loss"] for r in self.history]
        result = {
            "steps": self.steps, "resumed_from": self.start_step, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "last_10_mean_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "tokens_per_s_per_gpu": rate, "mfu": None if self.peak is None else rate * self.flops_per_token / self.peak,
            "peak_memory_gb": peak_memory_gb(self.dist.device), "wall_s": time.perf_counter() - self.started,
            "flops_per_token": self.flops_per_token,
        }
        if self.main:
            if self.bar is not None:
                self.bar.close()
            self.file.close()
            if self.writer is not None:
                self.writer.close()
            mfu = "n/a" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
            if losses:
                print(f"lasp-train: steps {self.start_step + 1}-{self.steps}: loss {losses[0]:.4f} -> "
                      f"{losses[-1]:.4f} (last 10 steps: {result['last_10_mean_loss']:.4f}) | {rate:,.0f} "
                      f"tok/s/GPU | MFU {mfu} | peak memory "
                      f"{result['peak_memory_gb']:.2f} GB | {result['wall_s']:.1f} s | metrics: {self.jsonl}",
                      flush=True)
            else:
                print(f"lasp-train: nothing to do: the checkpoint is at step {self.start_step} of {self.steps}",
                      flush=True)
        return result
