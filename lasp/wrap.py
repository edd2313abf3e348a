"""`lasp.parallelize`: make an existing model sequence-parallel in one call.

    model = lasp.parallelize(model, group, kind="zigzag")   # the same object, now sequence-parallel
    layout = SequenceLayout(T, group.size(), group.rank(), "zigzag")
    batch = lasp.shard_batch(input_ids, layout=layout, cu_seqlens=cu)   # from the whole batch
    loss = lasp.causal_lm_loss(model, batch)   # local token-loss sum ÷ valid tokens of the whole batch
    loss.backward(); lasp.sum_gradients(model, group)   # or let FSDP/DDP reduce (see lasp.loss)

Supports lasp's own models and the Hugging Face causal LMs of
`lasp.integrations.hf.SUPPORTED_MODEL_TYPES` (Llama, Qwen2/3, Mistral, Mixtral, Qwen2/3-MoE and
the linear-attention hybrids).
Each forward takes this rank's tokens and builds the batch's layout from their number,
so one parallelized model trains on sequences of any length that W divides.
"""

from __future__ import annotations

import torch.distributed as dist

from lasp.layers.sequence import SPContext
from lasp.parallel.layout import SequenceLayout


def sp_context(group=None, kind: str = "contiguous") -> SPContext:
    """An SPContext from a ProcessGroup, a 1-D DeviceMesh, a SequenceLayout (its kind, checked
    against the default group), an SPContext, or None (the default group)."""
    if isinstance(group, SPContext):
        return group
    if isinstance(group, SequenceLayout):
        sp = SPContext.from_group(None, group.kind)
        if (sp.world_size, sp.rank) != (group.world_size, group.rank):
            raise ValueError(f"{group} does not match this process: rank {sp.rank} of {sp.world_size}")
        return sp
    if dist.is_available():
        from torch.distributed.device_mesh import DeviceMesh
        if isinstance(group, DeviceMesh):
            if group.ndim != 1:
                raise ValueError(f"pass the sequence-parallel dimension of the mesh (e.g. mesh['sp']), "
                                 f"got a {group.ndim}-D mesh")
            group = group.get_group()
    return SPContext.from_group(group, kind)


def parallelize(model, group=None, *, kind: str = "contiguous"):
    """Make `model` sequence-parallel over `group` with the `kind` layout; returns `model`.

    group: see `sp_context`. Raises ValueError for a model type lasp does not support.
    """
    sp = sp_context(group, kind)
    from lasp.models.linear_llama import LinearLlamaPreTrainedModel
    if isinstance(model, LinearLlamaPreTrainedModel):
        model.base_model.lasp_sp = sp
        return model
    from lasp.integrations.hf import parallelize_hf
    return parallelize_hf(model, sp)
