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

Two ways to walk, each an exchange class built per call as `Exchange(layout, group,
reverse)`:

- `AllGatherScan` (LASP-2): ONE all-gather of every rank's summaries (states and
  log-decays packed in one buffer), then each rank walks the gathered summaries
  locally, in fp32, up to its last segment. The backward all-gathers the incoming-state
  gradients once. Bytes per rank are independent of the sequence length.
- `RingScan` (LASP-1, the baseline): the running value is handed point-to-point from
  the owner of each segment to the owner of the next (with zigzag the chain goes up the
  ranks and back down), so ranks wait on each other in turn.

An exchange comes in two halves per direction so that the caller can run independent
work while the collective is in flight (`lasp.parallel.lasp2` runs the local kernels
there)::

    pending = exchange.start(states, log_decays)           # the collective is issued
    incoming, saved = exchange.finish(pending)              # waits for it, walks the chain
    pending = exchange.start_backward(d_incoming)
    d_states, d_log_decays = exchange.finish_backward(pending, saved)

`all_gather_scan` and `ring_scan` are the same exchanges as one differentiable op.

No host synchronisation: tensor values never reach Python. An all-gather is issued
asynchronously: on CUDA on a side stream ordered after the work already queued, so the
compute stream goes on and waits (device-side) only in `finish`; on gloo as an async
work handle waited in `finish`. `overlap=False` forces it synchronous (issued on the
compute stream, then the host waits for it), for benchmarks. The ring is synchronous
(its halves run in `finish`). `bytes_sent` counts the payload this process sent (for
benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from lasp.parallel.layout import SequenceLayout

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


class _Gather:
    """One all-gather of a contiguous `x` in flight; `wait()` returns all ranks' `x` stacked,
    [W, *x.shape], ready for use on the current stream (module docstring)."""

    def __init__(self, x: torch.Tensor, group, overlap: bool):
        _count(x)
        self.shape = x.shape
        self.out = x.new_empty(dist.get_world_size(group) * x.numel())
        self.work = self.stream = None
        if not x.is_cuda:
            self.work = _gather_into(self.out, x.flatten(), group=group, async_op=overlap)
            return
        compute = torch.cuda.current_stream(x.device)
        if not overlap:
            _gather_into(self.out, x.flatten(), group=group)
            compute.synchronize()
            return
        if x.device not in _side_streams:
            _side_streams[x.device] = torch.cuda.Stream(x.device)
        self.stream = _side_streams[x.device]
        self.stream.wait_stream(compute)             # x is written
        with torch.cuda.stream(self.stream):
            _gather_into(self.out, x.flatten(), group=group)
        # Both buffers were allocated on the compute stream: keep them until the side stream is done.
        x.record_stream(self.stream)
        self.out.record_stream(self.stream)

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        if self.stream is not None:                  # a device-side wait: the host goes on
            torch.cuda.current_stream(self.out.device).wait_stream(self.stream)
        return self.out.view(-1, *self.shape)


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


@dataclass(frozen=True)
class AllGatherScan:
    """LASP-2 exchange: one all-gather per direction, then a local fp32 scan."""

    layout: SequenceLayout
    group: object = None
    reverse: tuple = (False,)
    overlap: bool = True

    def start(self, states, log_decays):
        """Issue the all-gather of the summaries, states and log-decays in one buffer."""
        buffer = torch.cat([states.flatten(), log_decays.flatten()])
        return _Gather(buffer, self.group, self.overlap), states.shape, log_decays.shape

    def finish(self, pending):
        """(incoming [nseg, C, ...], saved): `saved` are the tensors the backward needs."""
        gather, state_shape, log_decay_shape = pending
        gathered = gather.wait()
        n = state_shape.numel()
        all_states = gathered[:, :n].view(-1, *state_shape)
        all_log_decays = gathered[:, n:].view(-1, *log_decay_shape)
        incoming = _incoming(_gathered_walk, self.layout, self.group, self.reverse, all_log_decays,
                             all_states, 2)
        # A copy, so that what the backward keeps is not the whole gathered buffer.
        return incoming, (all_log_decays.clone(), incoming)

    def start_backward(self, d_incoming):
        return _Gather(d_incoming.contiguous(), self.group, self.overlap)

    def finish_backward(self, pending, saved):
        """(d states, d log_decays) of this rank's summaries."""
        all_log_decays, incoming = saved
        return _summary_grads(_gathered_walk, self.layout, self.group, self.reverse, all_log_decays,
                              pending.wait(), incoming, all_log_decays[self.layout.rank], 2)


@dataclass(frozen=True)
class RingScan:
    """LASP-1 exchange: the running state handed rank to rank along the chain (synchronous:
    `start` only keeps the summaries, `finish` walks the ring)."""

    layout: SequenceLayout
    group: object = None
    reverse: tuple = (False,)

    def start(self, states, log_decays):
        return states.contiguous(), log_decays

    def finish(self, pending):
        states, log_decays = pending
        incoming = _incoming(_ring_walk, self.layout, self.group, self.reverse, log_decays, states, 1)
        return incoming, (log_decays, incoming)

    def start_backward(self, d_incoming):
        return d_incoming.contiguous()

    def finish_backward(self, pending, saved):
        log_decays, incoming = saved
        return _summary_grads(_ring_walk, self.layout, self.group, self.reverse, log_decays, pending,
                              incoming, log_decays, 1)


class _Exchange(torch.autograd.Function):
    """An exchange's two halves back to back, differentiable in the states and log-decays."""

    @staticmethod
    def forward(ctx, states, log_decays, exchange):
        incoming, saved = exchange.finish(exchange.start(states, log_decays))
        ctx.save_for_backward(*saved)
        ctx.exchange = exchange
        return incoming

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_incoming):
        exchange = ctx.exchange
        grads = exchange.finish_backward(exchange.start_backward(d_incoming), ctx.saved_tensors)
        return (*grads, None)


def all_gather_scan(states, log_decays, layout, group=None, reverse=(False,), overlap=True):
    """LASP-2 exchange as one differentiable op: states [nseg, C, B, H, K, V] and log-decays
    [nseg, C, B, H] of this rank's segments -> the value entering each, [nseg, C, B, H, K, V]."""
    return _Exchange.apply(states, log_decays, AllGatherScan(layout, group, tuple(reverse), overlap))


def ring_scan(states, log_decays, layout, group=None, reverse=(False,)):
    """LASP-1 exchange as one differentiable op (arguments as `all_gather_scan`)."""
    return _Exchange.apply(states, log_decays, RingScan(layout, group, tuple(reverse)))
