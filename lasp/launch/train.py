"""`lasp-train`: train a linear-attention or hybrid LM with sequence parallelism.

    lasp-train                                   # the embedded default: tiny hybrid, SP = 2, 2 CPU processes
    lasp-train --config run.yaml --sp-size 8     # a config file and overrides (see --help)
    lasp-train --model hf:PATH --sp-size 4       # a transformers model directory (config.json, weights optional)
    torchrun --nproc-per-node 8 -m lasp.launch.train --config run.yaml

Started outside torchrun with more than one process (or nodes, or restarts), it launches
its processes itself through torch.distributed.run, with the same options.

The loop, per step: each data-parallel rank packs its next sequence; the SP ranks of that
rank shard it by the layout; `train_step` composes each rank's loss (the local token-loss
sum ÷ the valid tokens of the global batch, plus its share of the load-balancing loss of
Mixture-of-Memories layers); the engine (FSDP2 or DeepSpeed) sums the gradients over all
ranks and steps the optimizer.

SIGTERM or SIGINT (a scheduler's preemption, Ctrl-C) stops every rank after the same step
(the one running or the next), writes a checkpoint and ends with one line and exit status
128 + the signal's number; the same command resumes. A second signal stops at once. The
workers die with the launcher, and one job at a time holds `<output-dir>/.lock`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from lasp.launch.config import (Config, load_config, planned_world_size, resolve_backend, resolve_device,
                                resolve_nproc_per_node, under_torchrun, validate)
from lasp.launch.process import (LAUNCHER_PID_ENV, LOCK_HELD_ENV, GracefulStop, die_with_launcher, first_error,
                                 lock_output_dir)
from lasp.parallel.comm import sum_tensor

FAULT_ENV = "LASP_TEST_FAULT"  # "RANK:STEP": that rank dies before that step, in the first attempt only


def adamw(train, parameters):
    """AdamW; its fused kernels when the parameters live on GPUs (one pass over each
    parameter's state, as torchtitan; the for-each version makes several)."""
    parameters = list(parameters)
    fused = bool(parameters) and all(p.device.type == "cuda" for p in parameters)
    return torch.optim.AdamW(parameters, lr=train.lr, betas=(0.9, 0.95), weight_decay=train.weight_decay,
                             fused=fused or None)


def lr_schedule(optimizer, train):
    """Linear warm-up over --warmup-steps, then cosine decay to --min-lr-ratio × --lr."""
    def factor(done: int) -> float:
        if done < train.warmup_steps:
            return (done + 1) / (train.warmup_steps + 1)
        progress = (done - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_step(engine, batch, mesh) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step on this rank's share of the global batch (`mesh`: the job's
    `ParallelMesh`); returns (the global loss, the gradient norm), both device tensors.

    This rank's loss is its token-loss sum ÷ the valid targets of the global batch, plus
    `router_aux_loss_coef` × its share of its sequence's load-balancing loss (MoM) ÷ dp. The
    engine sums gradients over all ranks, so they are those of the global loss: the mean token
    loss plus the coefficient × the mean over the dp ranks' sequences of their aux loss."""
    num_tokens = sum_tensor(batch.num_tokens, mesh.group("dp"))  # valid targets of the whole global batch
    out = engine.model(input_ids=batch.input_ids, shift_labels=batch.shift_labels, cu_seqlens=batch.cu_seqlens,
                       num_items_in_batch=num_tokens)
    loss = out.lm_loss
    if out.aux_loss is not None:
        loss = loss + engine.config.router_aux_loss_coef * out.aux_loss / mesh.dims.dp
    engine.backward(loss)
    grad_norm = engine.step()
    return sum_tensor(loss, mesh.group("dp_sp")), grad_norm  # the ranks' parts add up to the global loss


def inject_fault(step: int, rank: int) -> None:
    """Tests only: kill this rank (as a crash would) where LASP_TEST_FAULT says, first attempt only."""
    fault = os.environ.get(FAULT_ENV)
    if fault and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        fault_rank, fault_step = map(int, fault.split(":"))
        if (rank, step) == (fault_rank, fault_step):
            os._exit(1)


def continue_schedule(scheduler, train, saved: dict | None) -> list[str]:
    """After a resume, this command's --lr, --weight-decay and schedule (--steps, --warmup-steps,
    --min-lr-ratio) apply from the resumed step on: the checkpoint's optimizer and scheduler
    state hold the old peak lr and weight decay. Returns the options that differ from the
    checkpoint's `saved` train section, as "--lr 0.001 (was 0.003)"."""
    for group in scheduler.optimizer.param_groups:
        group.update(initial_lr=train.lr, weight_decay=train.weight_decay)
    scheduler.base_lrs = [train.lr] * len(scheduler.optimizer.param_groups)
    scheduler.last_epoch -= 1
    scheduler.step()  # recomputes the current lr from the new base and lambda: the same as a fresh run's
    changed = []
    for name in ("steps", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip"):
        if saved is not None and saved.get(name, getattr(train, name)) != getattr(train, name):
            changed.append(f"--{name.replace('_', '-')} {getattr(train, name)} (was {saved[name]})")
    return changed


def train(config: Config, stop: GracefulStop | None = None) -> dict:
    """Run the job this process belongs to; returns the summary ("stopped_by": the signal's
    name if a SIGTERM or SIGINT stopped it early). `stop`: the handler of those signals, if
    the caller installed it earlier."""
    own_stop = stop is None
    stop = GracefulStop() if own_stop else stop
    try:
        return _train(config, stop)
    finally:
        if own_stop:
            stop.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(config: Config, stop: GracefulStop) -> dict:
    import lasp
    from lasp.launch.checkpoint import Checkpointer
    from lasp.launch.compile import compile_blocks
    from lasp.launch.data import build_data, build_tokenizer
    from lasp.launch.mesh import build_engine, compute_dtype, init_distributed
    from lasp.launch.metrics import Metrics, flops_per_token, peak_flops
    from lasp.launch.model import HFCausalLM, build_model
    from lasp.parallel.layout import SequenceLayout

    output_dir = Path(config.checkpoint.output_dir)
    d = init_distributed(config.parallel.sp_size, resolve_device(config), config.parallel.timeout,
                         resolve_backend(config))
    lock, error = None, None
    if d.is_main and not os.environ.get(LOCK_HELD_ENV):  # (a launcher that holds it says so)
        try:
            lock = lock_output_dir(str(output_dir))
        except ValueError as exc:
            error = str(exc)
    error = first_error(error, d.world_size)
    if error:
        raise ValueError(error)
    stop_group = dist.new_group(backend="gloo")  # host tensors only: see GracefulStop
    try:
        tokenizer = build_tokenizer(config.data.tokenizer)
        model = build_model(config.model, tokenizer.vocab_size, d.device, config.train.seed)
        n_params = sum(p.numel() for p in model.parameters())
        flops = flops_per_token(model, config.data.seq_len)
        lasp.parallelize(model.hf_model if isinstance(model, HFCausalLM) else model, d.sp_mesh,
                         kind=config.parallel.layout)
        if config.model.compile:
            compile_blocks(model)  # in place, before the engine shards the blocks
        dtype = compute_dtype(config.parallel.dtype, d.device)
        engine = build_engine(config.parallel.engine, model, partial(adamw, config.train), d, dtype,
                              config.train.grad_clip, config.parallel.zero_stage)
        scheduler = lr_schedule(engine.optimizer, config.train)
        data = build_data(config.data, tokenizer, config.train.seed, d.dp_rank, d.dp_size)
        layout = SequenceLayout(config.data.seq_len, d.sp_size, d.sp_rank, config.parallel.layout)

        checkpointer = Checkpointer(config.checkpoint, d, config.train)
        resumed = checkpointer.restore(engine, scheduler, data)
        start = resumed[1]["step"] if resumed else 0
        if start >= config.train.steps or (not resumed and config.checkpoint.resume == "auto"
                                           and (output_dir / "summary.json").is_file()):
            return _finished_already(start, config.train.steps, output_dir, d)
        changed = continue_schedule(scheduler, config.train, resumed[1].get("train")) if resumed else []
        if d.is_main:
            kind = model.config.model_type if isinstance(model, HFCausalLM) else config.model.layer_pattern
            print(f"lasp-train: {config.model.name} ({kind}, {n_params / 1e6:.2f}M "
                  f"parameters) | {d.world_size} ranks = dp {d.dp_size} × sp {d.sp_size} ({config.parallel.layout}) | "
                  f"{d.device.type} {str(dtype).removeprefix('torch.')} | {config.parallel.engine} | "
                  f"{config.data.seq_len} tokens per sequence | data {config.data.dataset} | steps "
                  f"{start + 1}-{config.train.steps}" + (f" (resumed from {resumed[0]})" if resumed else ""),
                  flush=True)
            if changed:
                print(f"lasp-train: this command changes {', '.join(changed)}: its schedule applies from step "
                      f"{start + 1}", flush=True)
        received = stop.start(stop_group)
        if received:
            return _stopped_before_training(received, d)
        metrics = Metrics(config.metrics, str(output_dir), d, steps=config.train.steps,
                          start_step=start, tokens_per_step=config.data.seq_len * d.dp_size,
                          flops_per_token=flops, peak=peak_flops(d.device, config.metrics.peak_tflops))

        stopped = None
        # Host syncs: only metrics.record at log steps and checkpointer.save (both labelled);
        # the stop flag is a host tensor on gloo and never waits for the device.
        for step in range(start + 1, config.train.steps + 1):
            stop.share()  # starts an async all-reduce of the host stop flag
            inject_fault(step, d.rank)
            tokens, cu_seqlens = (t.to(d.device, non_blocking=True) for t in next(data))
            batch = lasp.shard_batch(tokens, layout=layout, cu_seqlens=cu_seqlens)
            lr = scheduler.get_last_lr()[0]  # a host float
            with metrics.profiling(step):  # --profile-step only
                loss, grad_norm = train_step(engine, batch, d.mesh)
            scheduler.step()
            metrics.record(step, loss, grad_norm, lr)  # waits for the device at log steps only
            stopped = stop.agreed()  # a SIGTERM / SIGINT on any rank: all stop after the same step
            if checkpointer.due(step, config.train.steps) or stopped:
                saved = checkpointer.save(step, engine, scheduler, data)  # waits for the device
            if stopped:
                break

        summary = metrics.summary(announce=not stopped)
        if stopped:
            if d.is_main:
                print(f"lasp-train: stopped by {stopped.name} after step {step} of {config.train.steps}; "
                      f"checkpoint {saved}: run the same command to resume", flush=True)
            return {**summary, "stopped_by": stopped.name}
        if d.is_main:
            (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
        return summary
    finally:
        if lock is not None:
            lock.close()


def _stopped_before_training(received: signal.Signals, d) -> dict:
    if d.is_main:
        print(f"lasp-train: stopped by {received.name} before the first step: nothing new to save", flush=True)
    return {"stopped_by": received.name}


def _finished_already(start: int, steps: int, output_dir: Path, d) -> dict:
    """A rerun of a finished job: say so, and leave its summary.json and metrics.jsonl as they are."""
    if d.is_main:
        print(finished_message(output_dir, start, steps), flush=True)
    summary = output_dir / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else {"steps": steps, "resumed_from": start}


def finished_message(output_dir: Path, start: int, steps: int) -> str:
    if start == 0:
        state = "finished and left no checkpoint to continue from (--resume none trains it again from step 1)"
    else:
        state = (f"{'finished' if start == steps else f'past --steps {steps}'} (its checkpoint is at step {start}; "
                 "a larger --steps trains on)")
    return (f"lasp-train: nothing to do: the job in {output_dir} is {state}; its summary.json and metrics.jsonl are "
            "left as they are")


def finished_step(config: Config) -> int | None:
    """Before any process starts: the step of the finished job in --output-dir (it wrote
    summary.json, and its newest checkpoint, if any, is at --steps or past), or None. A
    damaged checkpoint does not matter here: there is nothing to train either way."""
    from lasp.launch.checkpoint import STEP_DIR, checkpoints

    output_dir = Path(config.checkpoint.output_dir)
    if config.checkpoint.resume != "auto" or not (output_dir / "summary.json").is_file():
        return None
    found = checkpoints(output_dir / "checkpoints")
    step = int(STEP_DIR.fullmatch(found[-1].name)[1]) if found else 0
    return step if step == 0 or step >= config.train.steps else None


class HideShutdownNotices(logging.Filter):
    """torchrun's notices of the shutdown it does for a signal (rank 0 prints the line that matters)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(notice in str(record.msg) for notice in ("death signal", "closing signal"))


SHUTDOWN_NOTICES = HideShutdownNotices()


def launch(config: Config, argv: list[str], holds_lock: bool = False) -> int:
    """Start this command's processes through torch.distributed.run (torchrun); `holds_lock`:
    this process holds the output directory's lock for them. Exit status: 0, 1 (a worker
    failed: torchrun has printed which and why), or 128 + the signal number after a SIGTERM /
    SIGINT stopped the job (the workers have saved a checkpoint)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    from lasp.launch.mesh import set_communication_defaults

    set_communication_defaults()
    for name in ("torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.multiprocessing.api"):
        logging.getLogger(name).addFilter(SHUTDOWN_NOTICES)
    launch = config.launch
    args = ["--nproc-per-node", str(resolve_nproc_per_node(config)), "--nnodes", launch.nnodes,
            "--max-restarts", str(launch.max_restarts)]
    if launch.rdzv_endpoint:
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", launch.rdzv_endpoint, "--rdzv-id", launch.rdzv_id]
    else:
        args += ["--standalone"]
    workers_env = {LAUNCHER_PID_ENV: str(os.getpid()), **({LOCK_HELD_ENV: "1"} if holds_lock else {})}
    os.environ.update(workers_env)  # (torchrun passes its environment on)
    try:
        torchrun([*args, "-m", "lasp.launch.train", *argv])
    except ChildFailedError:
        return 1  # torchrun has printed which rank failed and why
    except SignalException as stop:
        return 128 + stop.sigval
    finally:
        for name in workers_env:
            os.environ.pop(name)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`lasp-train`. Exit status: 0; 1 a worker failed; 2 a bad option (one line that names
    it); 128 + N when signal N (SIGTERM, SIGINT) stopped the job (a checkpoint was written)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    worker = under_torchrun()
    if worker:
        die_with_launcher()
    stop = GracefulStop()  # from here on, SIGTERM / SIGINT ask to stop (torchrun's own take over in launch)
    try:
        return _main(argv, worker, stop)
    finally:
        stop.close()


def _main(argv: list[str], worker: bool, stop: GracefulStop) -> int:
    lock = None
    try:
        config = load_config(argv)
        validate(config, planned_world_size(config))
        launching = not worker and (resolve_nproc_per_node(config) > 1 or config.launch.nnodes != "1"
                                    or config.launch.max_restarts > 0)
        if launching and config.launch.nnodes == "1":
            # one node: this process holds the lock for the job's lifetime, restarts included
            # (with several nodes, rank 0 takes it, wherever it runs)
            lock = lock_output_dir(config.checkpoint.output_dir)
    except ValueError as error:
        print(f"lasp-train: error: {error}", file=sys.stderr)
        return 2
    if launching:
        try:
            finished = finished_step(config)
            if finished is not None:  # (the workers would find the same, after starting)
                print(finished_message(Path(config.checkpoint.output_dir), finished, config.train.steps),
                      flush=True)
                return 0
            if stop.received:
                print(f"lasp-train: stopped by {stop.received.name} before starting", file=sys.stderr)
                return 128 + stop.received
            return launch(config, argv, holds_lock=lock is not None)
        finally:
            if lock is not None:
                lock.close()
    try:
        summary = train(config, stop)
    except ValueError as error:  # found by every rank (a lock, a checkpoint): rank 0 says it
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"lasp-train: error: {error}", file=sys.stderr)
        return 2
    if "stopped_by" in summary and not worker:
        return 128 + signal.Signals[summary["stopped_by"]]
    return 0  # (a worker stopped by a signal exits 0: torchrun must not restart it)


if __name__ == "__main__":
    sys.exit(main())
