"""The job's ranks as a data-parallel × sequence-parallel mesh (torchtitan's `ParallelDims`).

Ranks are laid out row-major: the SP group of a rank is `sp` consecutive ranks (one node's
fast links), and each SP group reads one data-parallel shard. One DeviceMesh names three
dimensions: `dp` (the groups that read different data: the token count of the global batch
is summed over it), `sp` (the ranks that share one sequence: LASP-2 / LASP-2H run over it)
and `dp_sp`, the two flattened (`ParallelMesh` holds all three): every rank holds the same
model, so FSDP shards parameters over all of them and the loss is summed over all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class ParallelDims:
    """`dp` data-parallel groups of `sp` sequence-parallel ranks each; checked when made."""

    dp: int
    sp: int

    def __post_init__(self):
        for name in ("dp", "sp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelDims {name} must be a positive int, got {value!r}")

    @classmethod
    def for_world(cls, world_size: int, sp: int) -> ParallelDims:
        """The dims of `world_size` ranks in SP groups of `sp` (ValueError if `sp` does not divide it)."""
        if isinstance(sp, bool) or not isinstance(sp, int) or sp < 1:
            raise ValueError(f"sp must be a positive int, got {sp!r}")
        if world_size % sp:
            raise ValueError(f"sp {sp} does not divide the world size {world_size}")
        return cls(world_size // sp, sp)

    @property
    def world_size(self) -> int:
        return self.dp * self.sp

    def build_mesh(self, device_type: str) -> ParallelMesh:
        """The mesh over this job's process group (initialised, of `world_size` ranks)."""
        if dist.get_world_size() != self.world_size:
            raise ValueError(f"ParallelDims(dp={self.dp}, sp={self.sp}) needs {self.world_size} ranks; the process "
                             f"group has {dist.get_world_size()}")
        mesh = init_device_mesh(device_type, (self.dp, self.sp), mesh_dim_names=("dp", "sp"))
        return ParallelMesh(self, mesh, mesh["dp", "sp"]._flatten(mesh_dim_name="dp_sp"))


@dataclass(frozen=True)
class ParallelMesh:
    """One (dp, sp) DeviceMesh and its flattened `dp_sp` (torch >= 2.11 wants the flattened mesh
    kept by its maker rather than sliced from the root): `mesh["dp"]`, `mesh["sp"]`,
    `mesh["dp_sp"]` and their process groups `mesh.group(name)`."""

    dims: ParallelDims
    root: DeviceMesh
    dp_sp: DeviceMesh

    def __getitem__(self, name: str) -> DeviceMesh:
        if name == "dp_sp":
            return self.dp_sp
        if name not in ("dp", "sp"):
            raise KeyError(f"the mesh has the dims dp, sp and dp_sp, not {name!r}")
        return self.root[name]

    def group(self, name: str):
        return self[name].get_group()

    def local_rank(self, name: str) -> int:
        return self[name].get_local_rank()
