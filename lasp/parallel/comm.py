"""The collectives of sequence parallelism, in one place: one name per collective whatever the
torch version, the differentiable gather, and gloo's CUDA path.

- torch >= 2.13 renames `all_gather_into_tensor` / `reduce_scatter_tensor` (deprecated there)
  to `all_gather_single` / `reduce_scatter_single`; torch 2.11 has only the old names.
  `all_gather_into_tensor` and `reduce_scatter_tensor` here call whichever exists.
- `all_gather(x, group)` is differentiable: its backward reduce-scatters (sums) the gradient,
  the right gradient under the SP loss contract (the ranks' losses add up, `lasp.loss`).
- **gloo with CUDA tensors** is how the multi-rank GPU tests run several ranks on ONE GPU
  (`LASP_SHARED_GPU=1`, tests/distributed.py; NCCL refuses two ranks on one device). gloo
  moves CUDA tensors through pinned host memory, and its worker thread synchronises the
  copy streams, which `lasp.no_host_sync()` would report as a host sync of lasp's. Such a
  collective therefore runs to completion inside `_gloo_host_copies()`, which lifts the CUDA
  sync check for that one call and restores it (its work handle is already done). gloo
  hands point-to-point buffers to its TCP transport by pointer, so it has no CUDA
  `send`/`recv`: `send`, `recv` and `shift` copy through host memory here instead. Nothing
  else is exempt, and NCCL (and gloo on CPU) runs every call as asked.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_reduce = dist.all_reduce


class _Done:
    """The work handle of a collective that has already completed."""

    def wait(self) -> bool:
        return True


def through_host(x: torch.Tensor, group=None) -> bool:
    """Whether a collective on `x` over `group` goes through host memory (gloo with a CUDA tensor)."""
    return x.is_cuda and dist.get_backend(group) == "gloo"


@contextlib.contextmanager
def _gloo_host_copies():
    """Lift the CUDA sync check (`lasp.no_host_sync`) for one gloo collective on CUDA tensors:
    gloo's worker thread synchronises its device-to-host copy streams (module docstring)."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _run(collective, *tensors, group, async_op, **kwargs):
    if through_host(tensors[0], group):
        with _gloo_host_copies():
            collective(*tensors, group=group, **kwargs)  # blocks until gloo's copies are back on the device
        return _Done() if async_op else None
    return collective(*tensors, group=group, async_op=async_op, **kwargs)


def all_gather_into_tensor(output: torch.Tensor, input: torch.Tensor, group=None, async_op: bool = False):
    """output [W·n, ...] = every rank's input [n, ...] in rank order (a work handle if `async_op`)."""
    return _run(_all_gather_single, output, input, group=group, async_op=async_op)


def reduce_scatter_tensor(output: torch.Tensor, input: torch.Tensor, group=None, async_op: bool = False):
    """output [n, ...] = this rank's block of the sum over ranks of input [W·n, ...]."""
    return _run(_reduce_scatter_single, output, input, group=group, async_op=async_op)


def all_reduce(tensor: torch.Tensor, group=None, async_op: bool = False):
    """Sum `tensor` over the group, in place."""
    return _run(_all_reduce, tensor, group=group, async_op=async_op)


def sum_tensor(x: torch.Tensor, group=None) -> torch.Tensor:
    """A new tensor holding the sum of `x` over the group (`x` is left as it is); stays on the device."""
    total = x.detach().clone()
    all_reduce(total, group)
    return total


def send(tensor: torch.Tensor, group_dst: int, group=None) -> None:
    """Send `tensor` to rank `group_dst` of the group (blocking)."""
    if through_host(tensor, group):
        with _gloo_host_copies():
            dist.send(tensor.cpu(), group=group, group_dst=group_dst)
        return
    dist.send(tensor, group=group, group_dst=group_dst)


def recv(tensor: torch.Tensor, group_src: int, group=None) -> None:
    """Receive into `tensor` from rank `group_src` of the group (blocking)."""
    if through_host(tensor, group):
        with _gloo_host_copies():
            host = torch.empty_like(tensor, device="cpu")
            dist.recv(host, group=group, group_src=group_src)
            tensor.copy_(host)
        return
    dist.recv(tensor, group=group, group_src=group_src)


def send_recv(sends: dict, recvs: dict, group=None) -> None:
    """One batch of point-to-point messages, {group rank: tensor}: sends `sends`, fills the
    buffers of `recvs` in place, and returns when all are done (through host memory on
    gloo's CUDA path, like `send` and `recv`)."""
    if not sends and not recvs:
        return
    peer = (lambda i: i) if group is None else (lambda i: dist.get_global_rank(group, i))
    host = through_host(next(iter({**sends, **recvs}.values())), group)
    with _gloo_host_copies() if host else contextlib.nullcontext():
        outgoing = {r: x.cpu() for r, x in sends.items()} if host else sends
        incoming = {r: torch.empty_like(x, device="cpu") for r, x in recvs.items()} if host else recvs
        ops = ([dist.P2POp(dist.isend, x, peer(r), group) for r, x in outgoing.items()]
               + [dist.P2POp(dist.irecv, x, peer(r), group) for r, x in incoming.items()])
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        if host:
            for r, x in recvs.items():
                x.copy_(incoming[r])


def shift(x: torch.Tensor, group=None) -> tuple[torch.Tensor, list]:
    """Start sending `x` to the next rank of the ring and receiving the previous rank's.

    Returns (buffer, work handles): the buffer holds the previous rank's `x` once every
    handle has been waited for (no handles on gloo's CUDA path, which completes at once).
    """
    W, r = dist.get_world_size(group), dist.get_rank(group)
    peer = (lambda i: i) if group is None else (lambda i: dist.get_global_rank(group, i))
    if through_host(x, group):
        with _gloo_host_copies():
            host = x.cpu()
            received = torch.empty_like(host)
            works = dist.batch_isend_irecv([dist.P2POp(dist.isend, host, peer((r + 1) % W), group),
                                            dist.P2POp(dist.irecv, received, peer((r - 1) % W), group)])
            for work in works:
                work.wait()
            return received.to(x.device), []
    received = torch.empty_like(x)
    works = dist.batch_isend_irecv([dist.P2POp(dist.isend, x, peer((r + 1) % W), group),
                                    dist.P2POp(dist.irecv, received, peer((r - 1) % W), group)])
    return received, works


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = x.new_empty(dist.get_world_size(group) * x.shape[0], *x.shape[1:])
        all_gather_into_tensor(out, x, group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = grad.new_empty(grad.shape[0] // dist.get_world_size(ctx.group), *grad.shape[1:])
        reduce_scatter_tensor(out, grad, ctx.group)
        return out, None


def all_gather(x: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's `x` [n, ...] stacked in rank order, [W·n, ...]; differentiable.

    The backward returns this rank's block of the gradient SUMMED over the ranks: each rank's
    loss uses the gathered tensor, and the losses add up (lasp's SP loss contract). If every
    rank computes one and the same loss from the gathered tensor, that is W times its gradient.
    """
    return _AllGather.apply(x, group)
