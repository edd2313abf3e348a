"""The exchange of segment summaries between sequence-parallel ranks: LASP-2 and LASP-1.

A *chain* visits the global segments in order (or in reverse order). Each segment maps
the value entering it to the value leaving it affinely (DESIGN.md §1)::

    S_out = exp(a) · S_in + U          (U: [B,H,K,V] state summary, a: [B,H] log-decay)

and the chain starts from zero. An exchange takes this rank's summaries of its local
segments for C chains, `states [nseg, C, B, H, K, V]` and `log_decays [nseg, C, B, H]`,
and returns the value entering each local segment, `[nseg, C, B, H, K, V]`, in the
dtype of the states (fp32, float64 for float64 inputs). Causal attention uses one
chain; bidirectional attention a forward and a reverse chain (`reverse` flags).

The backward is the same chain walked the other way: with G the gradient of the value
entering segment s (total, through every later segment),

    G_s = dS_in_s + exp(a_s) · G_next        dU_s = G_next        da_s = <G_next, exp(a_s) · S_in_s>

so it reuses the forward walk on the incoming-state gradients.

Two ways to walk:

- `all_gather_scan` (LASP-2): ONE all-gather of every rank's summaries (states and
  log-decays packed in one buffer), then each rank walks the gathered summaries
  locally, in fp32, up to its last segment. The backward all-gathers the incoming-state
  gradients once. Bytes per rank are independent of the sequence length.
- `ring_scan` (LASP-1, the baseline): the running value is handed point-to-point from
  the owner of each segment to the owner of the next (with zigzag the chain goes up the
  ranks and back down), so ranks wait on each other in turn.

No host synchronisation: tensor values never reach Python. On CUDA the all-gather runs
on a side stream ordered by events, so the host never blocks on it and the compute
stream waits only where the result is used; `overlap=False` forces it synchronous
(issued on the compute stream, then the host waits for it), for benchmarks.
`bytes_sent` counts the payload this process sent (for benchmarks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

bytes_sent = 0
_side_streams: dict = {}
# torch >= 2.13 renames all_gather_into_tensor (deprecated there) to all_gather_single.
_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _step(value, log_decay, summary):
    """One segment of a chain: exp(a) · value + U (value None is the zero state)."""
    if value is None:
        return summary
    return log_decay.exp()[..., None, None] * value + summary


def _order(layout, reverse: bool) -> list[int]:
    order = list(range(layout.num_segments))
    return order[::-1] if reverse else order


def _count(x: torch.Tensor) -> None:
    global bytes_sent
    bytes_sent += x.numel() * x.element_size()


def _all_gather(x: torch.Tensor, group, overlap: bool) -> torch.Tensor:
    """All ranks' `x` (contiguous), stacked: [W, *x.shape]."""
    _count(x)
    out = x.new_empty(dist.get_world_size(group) * x.numel())
    stacked = out.view(-1, *x.shape)
    if not x.is_cuda:
        _gather_into(out, x.flatten(), group=group, async_op=True).wait()
        return stacked
    compute = torch.cuda.current_stream(x.device)
    if not overlap:
        _gather_into(out, x.flatten(), group=group)
        compute.synchronize()
        return stacked
    side = _side_streams.setdefault(x.device, torch.cuda.Stream(x.device))
    side.wait_stream(compute)              # the summaries are written
    with torch.cuda.stream(side):
        _gather_into(out, x.flatten(), group=group)
    # Both buffers were allocated on the compute stream: keep them until the side stream is done.
    x.record_stream(side)
    out.record_stream(side)
    compute.wait_stream(side)              # a device-side wait: the host goes on
    return stacked


def _gathered_walk(layout, order, log_decays, summaries, group):
    """Walk a chain over gathered summaries ([W, nseg, ...], indexed by rank and local
    slot); yield (local slot, value entering it) for this rank's segments, stopping
    after the last of them."""
    slots = [(layout.owner(s), layout.segments_of(layout.owner(s)).index(s)) for s in order]
    last = max(p for p, (rank, _) in enumerate(slots) if rank == layout.rank)
    value = None
    for p, (rank, i) in enumerate(slots[:last + 1]):
        if rank == layout.rank:
            yield i, value
        if p < last:
            value = _step(value, log_decays[rank, i], summaries[rank, i])


def _ring_walk(layout, order, log_decays, summaries, group):
    """Walk a chain over this rank's own summaries ([nseg, ...]), handing the running
    value to the owner of the next segment point-to-point; yield (local slot, value
    entering it) for this rank's segments. Every rank must walk the whole chain."""
    value = None
    for p, s in enumerate(order):
        src = layout.owner(s)
        if src == layout.rank:
            i = layout.local_segments.index(s)
            yield i, value
            if p + 1 < len(order):
                value = _step(value, log_decays[i], summaries[i]).contiguous()
        if p + 1 == len(order):
            break
        dst = layout.owner(order[p + 1])
        if src == dst:
            continue
        if layout.rank == src:
            _count(value)
            dist.send(value, group=group, group_dst=dst)
            value = None
        elif layout.rank == dst:
            value = summaries.new_empty(summaries.shape[1:])
            dist.recv(value, group=group, group_src=src)


def _incoming(walk, layout, group, reverse, log_decays, summaries, chain_dim):
    """The value entering each local segment in each chain: [nseg, C, ...]."""
    incoming = summaries.new_zeros(summaries.shape[chain_dim - 1:])
    for c, rev in enumerate(reverse):
        for i, value in walk(layout, _order(layout, rev), log_decays.select(chain_dim, c),
                             summaries.select(chain_dim, c), group):
            if value is not None:
                incoming[i, c] = value
    return incoming


def _summary_grads(walk, layout, group, reverse, log_decays, d_incoming, incoming, local_log_decays,
                   chain_dim):
    """Gradients of the local summaries from the incoming-state gradients (module docstring)."""
    d_states = torch.zeros_like(incoming)
    d_log_decays = torch.zeros_like(local_log_decays)
    for c, rev in enumerate(reverse):
        for i, grad in walk(layout, _order(layout, not rev), log_decays.select(chain_dim, c),
                            d_incoming.select(chain_dim, c), group):
            if grad is not None:
                d_states[i, c] = grad
                d_log_decays[i, c] = ((grad * incoming[i, c]).sum((-2, -1))
                                      * local_log_decays[i, c].exp())
    return d_states, d_log_decays


class _AllGatherScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, states, log_decays, layout, group, reverse, overlap):
        n = states.numel()
        gathered = _all_gather(torch.cat([states.flatten(), log_decays.flatten()]),
                               group, overlap)
        all_states = gathered[:, :n].view(-1, *states.shape)
        all_log_decays = gathered[:, n:].view(-1, *log_decays.shape)
        incoming = _incoming(_gathered_walk, layout, group, reverse, all_log_decays, all_states, 2)
        ctx.save_for_backward(all_log_decays, incoming)
        ctx.args = layout, group, reverse, overlap
        return incoming

    @staticmethod
    def backward(ctx, d_incoming):
        all_log_decays, incoming = ctx.saved_tensors
        layout, group, reverse, overlap = ctx.args
        all_d = _all_gather(d_incoming.contiguous(), group, overlap)
        grads = _summary_grads(_gathered_walk, layout, group, reverse, all_log_decays, all_d, incoming,
                               all_log_decays[layout.rank], 2)
        return (*grads, None, None, None, None)


class _RingScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, states, log_decays, layout, group, reverse):
        states = states.contiguous()
        incoming = _incoming(_ring_walk, layout, group, reverse, log_decays, states, 1)
        ctx.save_for_backward(log_decays, incoming)
        ctx.args = layout, group, reverse
        return incoming

    @staticmethod
    def backward(ctx, d_incoming):
        log_decays, incoming = ctx.saved_tensors
        layout, group, reverse = ctx.args
        grads = _summary_grads(_ring_walk, layout, group, reverse, log_decays, d_incoming.contiguous(),
                               incoming, log_decays, 1)
        return (*grads, None, None, None)


def all_gather_scan(states, log_decays, layout, group=None, reverse=(False,), overlap=True):
    """LASP-2 exchange: one all-gather per direction, then a local fp32 scan."""
    return _AllGatherScan.apply(states, log_decays, layout, group, tuple(reverse), overlap)


def ring_scan(states, log_decays, layout, group=None, reverse=(False,)):
    """LASP-1 exchange: the running state handed rank to rank along the chain."""
    return _RingScan.apply(states, log_decays, layout, group, tuple(reverse))
