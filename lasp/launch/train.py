"""`lasp-train`: train a linear-attention or hybrid LM with sequence parallelism.

    lasp-train                                   # the embedded default: tiny hybrid, SP = 2, 2 CPU processes
    lasp-train --config run.yaml --sp-size 8     # a config file and overrides (see --help)
    torchrun --nproc-per-node 8 -m lasp.launch.train --config run.yaml

Started outside torchrun with more than one process (or nodes, or restarts), it launches
its processes itself through torch.distributed.run, with the same options.

The loop, per step: each data-parallel rank packs its next sequence; the SP ranks of that
rank shard it by the layout; the model's loss is the local token-loss sum ÷ the valid
tokens of the global batch; the engine (FSDP2 or DeepSpeed) reduces the gradients over
all ranks and steps the optimizer.
"""

from __future__ import annotations

import json
import math
import os
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from lasp.launch.config import (Config, load_config, planned_world_size, resolve_device, resolve_nproc_per_node,
                                under_torchrun, validate)

FAULT_ENV = "LASP_TEST_FAULT"  # "RANK:STEP": that rank dies before that step, in the first attempt only


def adamw(train, parameters):
    return torch.optim.AdamW(parameters, lr=train.lr, betas=(0.9, 0.95), weight_decay=train.weight_decay)


def lr_schedule(optimizer, train):
    """Linear warm-up over --warmup-steps, then cosine decay to --min-lr-ratio × --lr."""
    def factor(done: int) -> float:
        if done < train.warmup_steps:
            return (done + 1) / (train.warmup_steps + 1)
        progress = (done - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_step(engine, batch, dp_group) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step on this rank's share of the global batch; returns (the global mean
    token loss, the gradient norm), both device tensors."""
    num_tokens = batch.num_tokens.clone()            # valid targets of this data-parallel rank's sequence
    dist.all_reduce(num_tokens, group=dp_group)      # ... and of the whole global batch
    out = engine.model(input_ids=batch.input_ids, shift_labels=batch.shift_labels, cu_seqlens=batch.cu_seqlens,
                       num_items_in_batch=num_tokens)
    loss = out.loss
    aux_loss = getattr(out, "aux_loss", None)
    if aux_loss is not None and dist.get_world_size(dp_group) > 1:
        # MoM load balancing: the model adds its sequence's share, and gradients are summed over
        # dp; keep the mean over the dp ranks' sequences instead of their sum
        coef = engine.config.router_aux_loss_coef
        loss = loss - coef * aux_loss * (1 - 1 / dist.get_world_size(dp_group))
    engine.backward(loss)
    grad_norm = engine.step()
    loss = loss.detach().clone()
    dist.all_reduce(loss)                            # the ranks' parts add up to the global mean
    return loss, grad_norm


def inject_fault(step: int, rank: int) -> None:
    """Tests only: kill this rank (as a crash would) where LASP_TEST_FAULT says, first attempt only."""
    fault = os.environ.get(FAULT_ENV)
    if fault and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        fault_rank, fault_step = map(int, fault.split(":"))
        if (rank, step) == (fault_rank, fault_step):
            os._exit(1)


def train(config: Config) -> dict:
    """Run the job this process belongs to; returns the summary."""
    import lasp
    from lasp.launch.checkpoint import Checkpointer
    from lasp.launch.data import build_data, build_tokenizer
    from lasp.launch.mesh import build_engine, compute_dtype, init_distributed
    from lasp.launch.metrics import Metrics, flops_per_token, peak_flops
    from lasp.launch.model import build_model
    from lasp.parallel.layout import SequenceLayout

    d = init_distributed(config.parallel.sp_size, resolve_device(config), config.parallel.timeout)
    try:
        tokenizer = build_tokenizer(config.data.tokenizer)
        model = build_model(config.model, tokenizer.vocab_size, d.device, config.train.seed)
        n_params = sum(p.numel() for p in model.parameters())
        flops = flops_per_token(model, config.data.seq_len)
        lasp.parallelize(model, d.sp_mesh, kind=config.parallel.layout)
        dtype = compute_dtype(config.parallel.dtype, d.device)
        engine = build_engine(config.parallel.engine, model, partial(adamw, config.train), d, dtype,
                              config.train.grad_clip, config.parallel.zero_stage)
        scheduler = lr_schedule(engine.optimizer, config.train)
        data = build_data(config.data, tokenizer, config.train.seed, d.dp_rank, d.dp_size)
        layout = SequenceLayout(config.data.seq_len, d.sp_size, d.sp_rank, config.parallel.layout)

        checkpointer = Checkpointer(config.checkpoint, d)
        resume_from = checkpointer.to_resume()
        start = checkpointer.load(resume_from, engine, scheduler, data) if resume_from else 0
        if d.is_main:
            print(f"lasp-train: {config.model.name} ({config.model.layer_pattern}, {n_params / 1e6:.2f}M "
                  f"parameters) | {d.world_size} ranks = dp {d.dp_size} × sp {d.sp_size} ({config.parallel.layout}) | "
                  f"{d.device.type} {str(dtype).removeprefix('torch.')} | {config.parallel.engine} | "
                  f"{config.data.seq_len} tokens per sequence | data {config.data.dataset} | steps "
                  f"{start + 1}-{config.train.steps}" + (f" (resumed from {resume_from})" if resume_from else ""),
                  flush=True)
        metrics = Metrics(config.metrics, config.checkpoint.output_dir, d, steps=config.train.steps,
                          start_step=start, tokens_per_step=config.data.seq_len * d.dp_size,
                          flops_per_token=flops, peak=peak_flops(d.device, config.metrics.peak_tflops))

        for step in range(start + 1, config.train.steps + 1):
            inject_fault(step, d.rank)
            tokens, cu_seqlens = (t.to(d.device, non_blocking=True) for t in next(data))
            batch = lasp.shard_batch(tokens, layout=layout, cu_seqlens=cu_seqlens)
            lr = scheduler.get_last_lr()[0]
            loss, grad_norm = train_step(engine, batch, d.dp_group)
            scheduler.step()
            metrics.record(step, loss, grad_norm, lr)
            if checkpointer.due(step, config.train.steps):
                checkpointer.save(step, engine, scheduler, data)

        summary = metrics.summary()
        if d.is_main:
            (Path(config.checkpoint.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
    finally:
        dist.destroy_process_group()


def launch(config: Config, argv: list[str]) -> int:
    """Start this command's processes through torch.distributed.run (torchrun)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    from lasp.launch.mesh import set_communication_defaults

    set_communication_defaults()
    launch = config.launch
    args = ["--nproc-per-node", str(resolve_nproc_per_node(config)), "--nnodes", launch.nnodes,
            "--max-restarts", str(launch.max_restarts)]
    if launch.rdzv_endpoint:
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", launch.rdzv_endpoint, "--rdzv-id", launch.rdzv_id]
    else:
        args += ["--standalone"]
    try:
        torchrun([*args, "-m", "lasp.launch.train", *argv])
    except ChildFailedError:
        return 1  # torchrun has printed which rank failed and why
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        config = load_config(argv)
        validate(config, planned_world_size(config))
    except ValueError as error:
        print(f"lasp-train: error: {error}", file=sys.stderr)
        return 2
    if not under_torchrun() and (resolve_nproc_per_node(config) > 1 or config.launch.nnodes != "1"
                                 or config.launch.max_restarts > 0):
        return launch(config, argv)
    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
