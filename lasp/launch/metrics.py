"""What a run reports: a progress bar on rank 0, a JSONL line per step, TensorBoard, a summary.

The bar shows the mean loss since the last update (one packed sequence is a noisy sample).

Losses stay on the device until a log step (every --log-every steps), so the loop waits
for the GPU only there. Throughput is per process (the tokens of the global batch ÷ time ÷
ranks): shown as tok/s/GPU when each process has a GPU of its own, else tok/s/proc (CPU,
or processes sharing a GPU); the JSON key stays `tokens_per_s_per_gpu`. MFU is that ×
training FLOPs per token ÷ the device's peak dense FLOP/s. Memory is the process's peak:
`mem` is GPU memory allocated by torch, `rss` (CPU runs) the peak resident host memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from lasp.kernels.common.launch import CHUNK_SIZE
from lasp.layers.delta_rule import DeltaRuleAttention
from lasp.layers.linear_attention import LinearAttention
from lasp.layers.mamba2 import Mamba2

# peak dense bf16 TFLOP/s by device name (first match wins)
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
               ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
               ("A10G", 70.0), ("L4", 121.0))


def flops_per_token(model, seq_len: int, chunk_size: int = CHUNK_SIZE) -> float:
    """Training FLOPs (forward + backward = 3 × forward) per token of a `seq_len` sequence.

    6 × the parameters of every matmul (the matrices but the input embedding; the output
    projection counted once, tied or not; norm weights and decays multiply nothing), plus
    per layer and head (head dim D, causal): softmax attention 6·D·T (each token sees T/2
    keys on average), linear attention as each linear layer counts it
    (`LinearAttention.attention_flops_per_token`: 6·D·C + 12·D² when the key and value
    dims are both D), Mixture-of-Memories 6·D·C + 12·D² for each memory a token reaches
    (top-k + the shared one).
    Recomputation under activation checkpointing is not counted (the MFU convention).
    A Hugging Face model (`--model hf:PATH`, no `layer_kinds`): the matmuls and its softmax
    layers (`hf_softmax_layers`) only, an estimate: every expert of a MoE counts, its linear
    layers' state FLOPs do not.
    """
    config = model.config
    embedding = model.get_input_embeddings().weight
    matmul_params = sum(p.numel() for p in model.parameters() if p.dim() >= 2) - embedding.numel()
    if model.get_output_embeddings().weight is embedding:
        matmul_params += embedding.numel()
    if not hasattr(config, "layer_kinds"):
        H = config.num_attention_heads
        D = getattr(config, "head_dim", None) or config.hidden_size // H
        return 6.0 * matmul_params + hf_softmax_layers(config) * 6 * H * D * seq_len
    H, D = config.num_attention_heads, config.head_dim
    linear = H * (6 * D * chunk_size + 12 * D * D)
    memories = getattr(config, "mom_top_k", 0) + int(getattr(config, "mom_shared_memory", False))
    softmax = {"N": 6 * H * D * seq_len, "M": memories * linear}
    # Linear layers (L, G, D, K, S) answer for their own dims (feature maps may widen the keys).
    linear_layers = [m for m in model.modules() if isinstance(m, (LinearAttention, DeltaRuleAttention, Mamba2))]
    return (6.0 * matmul_params + sum(softmax.get(kind, 0) for kind in config.layer_kinds)
            + sum(layer.attention_flops_per_token(chunk_size) for layer in linear_layers))


SOFTMAX_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention", "attention", "hybrid")


def hf_softmax_layers(config) -> int:
    """The softmax-attention layers of a transformers config: those its `layer_types` name so,
    or every layer without `layer_types`."""
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return config.num_hidden_layers
    return sum(layer_type in SOFTMAX_LAYER_TYPES for layer_type in layer_types)


def peak_flops(device: torch.device, peak_tflops: float | None) -> float | None:
    """The device's peak dense FLOP/s: --peak-tflops, or the table by GPU name; None on CPU."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS if key in name), None)


def units(device: torch.device) -> tuple[str, str]:
    """What the progress line shows: (the throughput unit, the memory label)."""
    if device.type != "cuda":
        return "tok/s/proc", "rss"
    shared = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > torch.cuda.device_count()  # gloo: ranks share GPUs
    return ("tok/s/proc" if shared else "tok/s/GPU"), "mem"


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


class _StepProfile(contextlib.AbstractContextManager):
    """torch.profiler around one step; on exit, `path` gets the per-op table (if `write`)."""

    def __init__(self, path: Path, device: torch.device, write: bool):
        from torch.profiler import ProfilerActivity, profile
        self.path, self.write, self.cuda = path, write, device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.profiler = profile(activities=activities)

    def __enter__(self):
        self.profiler.__enter__()
        return self

    def __exit__(self, *exc):
        self.profiler.__exit__(*exc)
        if self.write and exc[0] is None:
            averages = self.profiler.key_averages()
            order = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
            self.path.write_text(averages.table(sort_by=order, row_limit=60, max_name_column_width=70))
        return False


class Metrics:
    """Per-step records on every rank; rank 0 writes them and shows them."""

    def __init__(self, config, output_dir: str, dist_state, *, steps: int, start_step: int,
                 tokens_per_step: int, flops_per_token: float, peak: float | None):
        self.log_every, self.steps, self.start_step = config.log_every, steps, start_step
        self.profile_step = config.profile_step
        self.dist, self.tokens_per_step = dist_state, tokens_per_step
        self.flops_per_token, self.peak = flops_per_token, peak
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor | None, float]] = []
        self.history: list[dict] = []
        self.intervals: list[tuple[int, float]] = []  # (steps, seconds) between log steps
        self.main = dist_state.is_main
        self.rate_unit, self.memory_label = units(dist_state.device)
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

    def profiling(self, step: int):
        """A torch.profiler context for step `--profile-step` (a no-op for every other step):
        rank 0 writes its per-op table, sorted by device time (host time on CPU), to
        <output-dir>/profile_step_N.txt. The profiler waits for the device when it stops."""
        if step != self.profile_step:
            return contextlib.nullcontext()
        return _StepProfile(self.jsonl.parent / f"profile_step_{step}.txt", self.dist.device, self.main)

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
            text = (f"loss {sum(losses) / len(losses):.4f} | {rate:,.0f} {self.rate_unit} | MFU "
                    f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | {self.memory_label} {memory:.2f} GB")
            if self.bar is not None:
                self.bar.update(n_steps)
                self.bar.set_postfix_str(text)
            else:
                print(f"step {step}/{self.steps} | {text}", flush=True)
        self.pending, self.last_log, self.last_log_step = [], now, step

    def summary(self, announce: bool = True) -> dict:
        """The run's summary: losses, throughput after the first log interval (warm-up), MFU,
        peak memory (None where nothing was timed: never NaN, the JSON stays valid). Rank 0
        prints it in one line if `announce`."""
        if self.pending:
            self._log(self.pending[-1][0])
        timed = self.intervals[1:] or self.intervals
        steps, seconds = sum(n for n, _ in timed), sum(s for _, s in timed)
        rate = steps * self.tokens_per_step / seconds / self.dist.world_size if seconds else None
        losses = [r["loss"] for r in self.history]
        result = {
            "steps": self.steps, "resumed_from": self.start_step, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "last_10_mean_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "tokens_per_s_per_gpu": rate, "throughput_unit": self.rate_unit,
            "mfu": None if self.peak is None or rate is None else rate * self.flops_per_token / self.peak,
            "peak_memory_gb": peak_memory_gb(self.dist.device),
            "peak_memory": "GPU memory allocated" if self.memory_label == "mem" else "host resident set (RSS)",
            "wall_s": time.perf_counter() - self.started, "flops_per_token": self.flops_per_token,
        }
        if self.main:
            if self.bar is not None:
                self.bar.close()
            self.file.close()
            if self.writer is not None:
                self.writer.close()
            if announce and losses:
                mfu = "n/a" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
                speed = "n/a" if rate is None else f"{rate:,.0f}"
                print(f"lasp-train: steps {self.start_step + 1}-{self.steps}: loss {losses[0]:.4f} -> "
                      f"{losses[-1]:.4f} (last 10 steps: {result['last_10_mean_loss']:.4f}) | {speed} "
                      f"{self.rate_unit} | MFU {mfu} | peak {self.memory_label} {result['peak_memory_gb']:.2f} GB | "
                      f"{result['wall_s']:.1f} s | metrics: {self.jsonl}", flush=True)
        return result
