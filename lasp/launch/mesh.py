"""Processes, the data-parallel × sequence-parallel mesh, and the engine that shards the model.

Ranks form the (dp, sp) mesh of `lasp.parallel.mesh.ParallelDims`, row-major: the SP group
of a rank is `sp` consecutive ranks (one node's fast links), and each SP group reads one
data-parallel shard. Parameters, gradients and optimizer state are sharded over ALL ranks
(FSDP2 over the flattened `dp_sp` mesh, or DeepSpeed ZeRO): the SP ranks of a group hold the
same model, so for the optimizer they are data-parallel ranks like any other.

Gradients: each rank's loss is its local token-loss sum ÷ the valid tokens of the whole
global batch, so the gradient of the global mean loss is the SUM of the ranks' gradients.
FSDP2 sums them (its gradient divide factor is set to 1, torchtitan's way). DeepSpeed has
no such switch and always averages over its ranks, so its engine back-propagates the
loss × world size.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from lasp.parallel.mesh import ParallelDims, ParallelMesh


def set_communication_defaults() -> None:
    """Settings for long jobs, unless the user set them: NCCL aborts on async errors (so a
    hung collective fails and torchrun can restart) and never uses NVLink multicast (NVLS);
    torchrun does not share its rendezvous store with the workers (shared, a restarted
    worker can read its predecessor's addresses from it and fail to connect: pytorch#135712)."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Distributed:
    """This process's place in the job: its rank, device and the job's (dp, sp) mesh."""

    rank: int
    device: torch.device
    mesh: ParallelMesh

    @property
    def world_size(self) -> int:
        return self.mesh.dims.world_size

    @property
    def dp_size(self) -> int:
        return self.mesh.dims.dp

    @property
    def sp_size(self) -> int:
        return self.mesh.dims.sp

    @property
    def dp_rank(self) -> int:
        return self.mesh.local_rank("dp")

    @property
    def sp_rank(self) -> int:
        return self.mesh.local_rank("sp")

    @property
    def dp_group(self):
        return self.mesh.group("dp")

    @property
    def sp_mesh(self):
        return self.mesh["sp"]

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(sp_size: int, device_type: str, timeout: float, backend: str | None = None) -> Distributed:
    """Join the job's process group and build the (dp, sp) mesh.

    `backend`: nccl (default on CUDA) or gloo (default on CPU). Gloo on CUDA lets several
    processes of a node share a GPU: local rank r uses GPU r mod the node's GPUs (for tests
    on one GPU). A process started outside torchrun is a job of one (rank 0 of 1); a
    process group that is already initialised is used as it is.
    """
    set_communication_defaults()
    if "WORLD_SIZE" not in os.environ and not dist.is_initialized():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    backend = backend or ("nccl" if device_type == "cuda" else "gloo")
    device = torch.device("cpu")
    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if backend == "nccl" and local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} GPUs): "
                             "NCCL needs one GPU per process (--dist-backend gloo lets processes share one)")
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        torch.cuda.init()  # initialised, so DeviceMesh keeps this device rather than GPU LOCAL_RANK
    if not dist.is_initialized():  # (tests join their own group first)
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout),
                                device_id=device if backend == "nccl" else None)
    world_size, rank = dist.get_world_size(), dist.get_rank()
    try:
        dims = ParallelDims.for_world(world_size, sp_size)
    except ValueError as error:
        raise ValueError(f"--sp-size: {error}") from None
    return Distributed(rank=rank, device=device, mesh=dims.build_mesh(device_type))


def compute_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """--dtype: auto is bf16 on GPU and fp32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]


def sum_gradients_in(module) -> None:
    """Make the FSDP2 units of `module` SUM gradients over their ranks instead of averaging them:
    divide factor 1, reduced as plain SUMs (torch >= 2.8) rather than NCCL's PreMulSum, which gloo
    lacks and which has had bugs (pytorch#155903, #155904); SUM is also NCCL's zero-copy path."""
    from torch.distributed.fsdp import FSDPModule

    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)


class FSDPEngine:
    """FSDP2: each block (`model_blocks`) and then the whole model sharded over all ranks (the
    flattened `dp_sp` mesh), gradients summed (module docstring); compute in `dtype` (bf16 on
    GPU) with the model's own parameter dtype (fp32) kept for the optimizer, and gradients
    reduced in fp32 (or wider); checkpoints through torch.distributed.checkpoint."""

    def __init__(self, model, optimizer_fn, dist_state: Distributed, dtype: torch.dtype, grad_clip: float):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from lasp.launch.model import model_blocks

        mesh = dist_state.mesh["dp_sp"]
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.promote_types(dtype, torch.float32))
        for block in model_blocks(model):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        sum_gradients_in(model)
        self.model, self.optimizer, self.config = model, optimizer_fn(model.parameters()), model.config
        self.grad_clip = grad_clip

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor | None:
        """Clip, update, zero the gradients; returns the global gradient norm (a tensor, no sync)."""
        norm = None
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=path)

    def load(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])


class DeepSpeedEngine:
    """DeepSpeed ZeRO (stage --zero-stage) over all ranks; its own checkpoint format."""

    def __init__(self, model, optimizer_fn, dist_state: Distributed, dtype: torch.dtype, grad_clip: float,
                 zero_stage: int):
        import deepspeed
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": zero_stage}, "gradient_clipping": grad_clip,
                  "bf16": {"enabled": dtype == torch.bfloat16}, "steps_per_print": 1 << 62}
        self.optimizer = optimizer_fn(model.parameters())
        self.model, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=config,
                                                   dist_init_required=False)
        self.world_size, self.config = dist_state.world_size, model.config

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss * self.world_size)  # DeepSpeed averages over its ranks; the loss wants the sum

    def step(self) -> torch.Tensor | None:
        self.model.step()
        norm = self.model.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(norm)

    def save(self, path: str) -> None:
        self.model.save_checkpoint(path, tag="deepspeed", save_latest=False)

    def load(self, path: str) -> None:
        self.model.load_checkpoint(path, tag="deepspeed", load_lr_scheduler_states=False)


def build_engine(kind: str, model, optimizer_fn, dist_state: Distributed, dtype: torch.dtype, grad_clip: float,
                 zero_stage: int = 2):
    """The engine that shards `model` and its optimizer (`optimizer_fn(parameters)`) over the job."""
    if kind == "deepspeed":
        return DeepSpeedEngine(model, optimizer_fn, dist_state, dtype, grad_clip, zero_stage)
    return FSDPEngine(model, optimizer_fn, dist_state, dtype, grad_clip)
