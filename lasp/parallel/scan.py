"""The exchange of segment summaries between sequence-parallel ranks: LASP-2's all-gather,
its log-depth prefix scan, and the LASP-1 ring.

A *chain* visits the global segments in order (or in reverse order). Each segment maps
the value entering it to the value leaving it affinely (DESIGN.md §1)::

    S_out = A(S_in) + U          (U: [B,H,K,V] state summary, A: a `Transition`)

and the chain starts from zero. An exchange takes this rank's summaries of its local
segments for C chains, `states [nseg, C, B, H, K, V]` and `transitions` (a
`lasp.kernels.Transition` whose parameter is [nseg, C, B, H, ...], any kind), and
returns the value entering each local segment, `[nseg, C, B, H, K, V]`, in the dtype of
the states (fp32, float64 for float64 inputs). Causal attention uses one chain;
bidirectional attention a forward and a reverse chain (`reverse` flags).

The backward is the same chain walked the other way with the transposed transitions:
with G the gradient of the value entering segment s (total, through every later
segment),

    G_s = dS_in_s + Aᵀ_s(G_next)        dU_s = G_next        dA_s = ∂<G_next, A_s(S_in_s)>/∂A_s

so it reuses the forward walk on the incoming-state gradients. All transition math is
the `Transition`'s: this module only orders, exchanges and walks.

Three ways to walk, each an exchange class built per call as `Exchange(layout, group,
reverse)`, and `AutoExchange`, which picks `AllGatherScan` or `PrefixScan` per call:

- `AllGatherScan` (LASP-2): ONE all-gather of every rank's summaries (states and
  transitions packed in one buffer), then each rank walks the gathered summaries
  locally, in fp32, up to its last segment. The backward all-gathers the incoming-state
  gradients once. Bytes per rank are independent of the sequence length.
- `RingScan` (LASP-1, the baseline): the running value is handed point-to-point from
  the owner of each segment to the owner of the next (with zigzag the chain goes up the
  ranks and back down), so ranks wait on each other in turn.
- `PrefixScan` (log-depth): recursive doubling (Hillis–Steele) over the chain's global
  positions, point-to-point. Summaries compose associatively, an earlier (A₁, U₁) then a
  later (A₂, U₂) being

      (A₁, U₁) · (A₂, U₂) = (A₂ ∘ A₁, A₂(U₁) + U₂)          (`Transition.then`, `apply`)

  In round d = 1, 2, 4, … < S (S segments) position p sends its running summary R_p (of
  positions p−2d+1 … p, clipped at 0) to position p + d and receives R_{p−d}; it keeps
  R_p ← R_{p−d} · R_p and its exclusive prefix E_p ← R_{p−d} · E_p. The ranges received
  over the rounds tile 0 … p−1 nearest first, so after ⌈log2 S⌉ rounds E_p is the
  composition of every summary before p and its state part is the value entering p (the
  chain starts from zero). Each rank handles its 1 (contiguous) or 2 (zigzag) positions
  per chain, all chains in the same rounds, one message per peer and round. The backward
  is the same scan in the opposite order over the summaries (Aᵀ_s, dS_in_s): the
  recurrence for G above is that chain, and its exclusive prefix at s is G_next = dU_s;
  dA_s follows from `apply_backward`. Composing in the opposite order is what the
  transposes need: (A₂ ∘ A₁)ᵀ = A₁ᵀ ∘ A₂ᵀ. A rank sends at most nseg·C summaries in each
  of ⌈log2 S⌉ rounds per direction, where the all-gather brings it W·nseg·C; it is
  synchronous like the ring (each round needs the previous one).

Which one LASP-2 uses: `AutoExchange` applies `default_exchange(world_size,
state_bytes)`, the crossover projected by `benchmarks/scaling.py` (all-gather below 32
ranks, or 16 with states of 8 MiB or more; the prefix scan above).

An exchange comes in two halves per direction so that the caller can run independent
work while the collective is in flight (`lasp.parallel.lasp2` runs the local kernels
there)::

    pending = exchange.start(states, transitions)          # the collective is issued
    incoming, saved = exchange.finish(pending)              # waits for it, walks the chain
    pending = exchange.start_backward(d_incoming)
    d_states, d_transitions = exchange.finish_backward(pending, saved)   # d param or None

`all_gather_scan`, `ring_scan` and `prefix_scan` run one class each as one
differentiable op.

No host synchronisation: tensor values never reach Python. An all-gather is issued
asynchronously: on CUDA on a side stream ordered after the work already queued, so the
compute stream goes on and waits (device-side) only in `finish`; on gloo as an async
work handle waited in `finish`. `overlap=False` forces it synchronous (issued on the
compute stream, then the host waits for it), for benchmarks. The ring and the prefix
scan are synchronous (their halves run in `finish`); gloo moves their CUDA tensors
through host memory (`lasp.parallel.comm`). `bytes_sent` counts the payload this
process sent (for benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from lasp.kernels.transition import Transition
from lasp.parallel import comm
from lasp.parallel.layout import SequenceLayout

bytes_sent = 0
_side_streams: dict = {}


def _step(value, transition, summary, transpose=False):
    """One segment of a chain: A(value) + U, or Aᵀ(value) + U walking gradients back
    (value None is the zero state)."""
    if value is None:
        return summary
    return (transition.apply_transpose(value) if transpose else transition.apply(value)) + summary


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
            self.work = comm.all_gather_into_tensor(self.out, x.flatten(), group=group, async_op=overlap)
            return
        compute = torch.cuda.current_stream(x.device)
        if not overlap:
            comm.all_gather_into_tensor(self.out, x.flatten(), group=group)
            compute.synchronize()
            return
        if x.device not in _side_streams:
            _side_streams[x.device] = torch.cuda.Stream(x.device)
        self.stream = _side_streams[x.device]
        self.stream.wait_stream(compute)             # x is written
        with torch.cuda.stream(self.stream):
            comm.all_gather_into_tensor(self.out, x.flatten(), group=group)
        # Both buffers were allocated on the compute stream: keep them until the side stream is done.
        x.record_stream(self.stream)
        self.out.record_stream(self.stream)

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        if self.stream is not None:                  # a device-side wait: the host goes on
            torch.cuda.current_stream(self.out.device).wait_stream(self.stream)
        return self.out.view(-1, *self.shape)


def _gathered_walk(layout, order, transitions, summaries, group, transpose):
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
            value = _step(value, transitions.select((rank, i)), summaries[rank, i], transpose)


def _ring_walk(layout, order, transitions, summaries, group, transpose):
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
                value = _step(value, transitions.select(i), summaries[i], transpose).contiguous()
        if p + 1 == len(order):
            break
        dst = layout.owner(order[p + 1])
        if src == dst:
            continue
        if layout.rank == src:
            _count(value)
            comm.send(value, dst, group)
            value = None
        elif layout.rank == dst:
            value = summaries.new_empty(summaries.shape[1:])
            comm.recv(value, src, group)


def _chain(transitions, chain_dim, c):
    return transitions if transitions.param is None else Transition(
        transitions.kind, transitions.param.select(chain_dim, c))


def _incoming(walk, layout, group, reverse, transitions, summaries, chain_dim):
    """The value entering each local segment in each chain: [nseg, C, ...]."""
    incoming = summaries.new_zeros(summaries.shape[chain_dim - 1:])
    for c, rev in enumerate(reverse):
        for i, value in walk(layout, _order(layout, rev), _chain(transitions, chain_dim, c),
                             summaries.select(chain_dim, c), group, False):
            if value is not None:
                incoming[i, c] = value
    return incoming


def _summary_grads(walk, layout, group, reverse, transitions, d_incoming, incoming, local, chain_dim):
    """Gradients of the local summaries (states, transition parameter or None) from the
    incoming-state gradients (module docstring); `local`: this rank's transitions."""
    d_states = torch.zeros_like(incoming)
    d_param = None if local.param is None else torch.zeros_like(local.param)
    for c, rev in enumerate(reverse):
        for i, grad in walk(layout, _order(layout, not rev), _chain(transitions, chain_dim, c),
                            d_incoming.select(chain_dim, c), group, True):
            if grad is not None:
                d_states[i, c] = grad
                if d_param is not None:
                    d_param[i, c] = local.select((i, c)).apply_backward(grad, incoming[i, c])[1]
    return d_states, d_param


@dataclass(frozen=True)
class AllGatherScan:
    """LASP-2 exchange: one all-gather per direction, then a local fp32 scan."""

    layout: SequenceLayout
    group: object = None
    reverse: tuple = (False,)
    overlap: bool = True

    def start(self, states, transitions):
        """Issue the all-gather of the summaries, states and transitions in one buffer."""
        buffer = torch.cat([states.flatten(), transitions.pack().to(states)])
        shape = None if transitions.param is None else transitions.param.shape
        return _Gather(buffer, self.group, self.overlap), states.shape, transitions, shape

    def finish(self, pending):
        """(incoming [nseg, C, ...], saved): `saved` is what the backward needs."""
        gather, state_shape, local, shape = pending
        gathered = gather.wait()
        n = state_shape.numel()
        all_states = gathered[:, :n].view(-1, *state_shape)
        # A copy, so that what the backward keeps is not the whole gathered buffer.
        everyone = local.unpack(gathered[:, n:].clone(), (-1, *shape) if shape else None)
        incoming = _incoming(_gathered_walk, self.layout, self.group, self.reverse, everyone, all_states, 2)
        return incoming, (everyone, incoming)

    def start_backward(self, d_incoming):
        return _Gather(d_incoming.contiguous(), self.group, self.overlap)

    def finish_backward(self, pending, saved):
        """(d states, d transition parameter or None) of this rank's summaries."""
        everyone, incoming = saved
        return _summary_grads(_gathered_walk, self.layout, self.group, self.reverse, everyone,
                              pending.wait(), incoming, everyone.select(self.layout.rank), 2)


@dataclass(frozen=True)
class RingScan:
    """LASP-1 exchange: the running state handed rank to rank along the chain (synchronous:
    `start` only keeps the summaries, `finish` walks the ring)."""

    layout: SequenceLayout
    group: object = None
    reverse: tuple = (False,)

    def start(self, states, transitions):
        return states.contiguous(), transitions

    def finish(self, pending):
        states, transitions = pending
        incoming = _incoming(_ring_walk, self.layout, self.group, self.reverse, transitions, states, 1)
        return incoming, (transitions, incoming)

    def start_backward(self, d_incoming):
        return d_incoming.contiguous()

    def finish_backward(self, pending, saved):
        transitions, incoming = saved
        return _summary_grads(_ring_walk, self.layout, self.group, self.reverse, transitions, pending,
                              incoming, transitions, 1)


def _compose(earlier, later):
    """The summary (A, U) of `earlier` followed by `later` (module docstring); None is the
    empty run."""
    if earlier is None or later is None:
        return later if earlier is None else earlier
    return earlier[0].then(later[0]), later[0].apply(earlier[1]) + later[1]


def _p2p(sends: dict, recvs: dict, group) -> None:
    """One round of point-to-point messages, {group rank: tensor} (`comm.send_recv`)."""
    for x in sends.values():
        _count(x)
    comm.send_recv(sends, recvs, group)


def _doubling_scan(layout, group, orders, transitions, summaries):
    """The exclusive scan of `PrefixScan` (module docstring) over this rank's summaries
    (`transitions` [nseg, C, ...], `summaries` [nseg, C, B, H, K, V]) along the global
    segment orders of the C chains: the value entering each local segment in each chain,
    [nseg, C, B, H, K, V]. Every rank of the group takes part in every round."""
    S, rank = layout.num_segments, layout.rank
    position = [{s: p for p, s in enumerate(order)} for order in orders]
    # This rank's (chain, position, local slot), sorted: a message to a peer holds its
    # summaries in this order, which the receiver reproduces.
    items = sorted((c, position[c][s], i) for i, s in enumerate(layout.local_segments) for c in range(len(orders)))
    running = {(c, p): (transitions.select((i, c)), summaries[i, c]) for c, p, i in items}
    before = dict.fromkeys(running)                   # E_p; None: nothing before p yet
    template = transitions.select((0, 0))
    state_shape, n_state = summaries.shape[2:], summaries[0, 0].numel()
    size = n_state + (0 if template.param is None else template.param.numel())

    def flat(summary):
        return torch.cat([summary[1].reshape(-1), summary[0].pack().to(summary[1])])

    def unflat(buffer):
        shape = None if template.param is None else template.param.shape
        return template.unpack(buffer[n_state:], shape), buffer[:n_state].view(state_shape)

    d = 1
    while d < S:
        to, frm = {}, {}                              # peer -> keys (chain, position), in order
        for c, p, _ in items:
            if p + d < S:
                to.setdefault(layout.owner(orders[c][p + d]), []).append((c, p))
            if p >= d:
                frm.setdefault(layout.owner(orders[c][p - d]), []).append((c, p))
        recvs = {r: summaries.new_empty(len(keys) * size) for r, keys in frm.items() if r != rank}
        _p2p({r: torch.cat([flat(running[k]) for k in keys]) for r, keys in to.items() if r != rank},
             recvs, group)
        received = {}
        for r, keys in frm.items():
            for j, (c, p) in enumerate(keys):
                received[c, p] = running[c, p - d] if r == rank else unflat(recvs[r][j * size:(j + 1) * size])
        for key, summary in received.items():
            before[key] = _compose(summary, before[key])
            if 2 * d < S:                             # a later round sends it on
                running[key] = _compose(summary, running[key])
        d *= 2
    incoming = torch.zeros_like(summaries)
    for c, p, i in items:
        if before[c, p] is not None:
            incoming[i, c] = before[c, p][1]
    return incoming


@dataclass(frozen=True)
class PrefixScan:
    """Log-depth exchange: recursive doubling over the chains' global order, point-to-point,
    ⌈log2 S⌉ rounds per direction (synchronous: `start` only keeps the summaries, `finish`
    runs the rounds)."""

    layout: SequenceLayout
    group: object = None
    reverse: tuple = (False,)

    def _orders(self, backward: bool) -> list:
        return [_order(self.layout, rev != backward) for rev in self.reverse]

    def start(self, states, transitions):
        return states.contiguous(), transitions

    def finish(self, pending):
        states, transitions = pending
        incoming = _doubling_scan(self.layout, self.group, self._orders(False), transitions, states)
        return incoming, (transitions, incoming)

    def start_backward(self, d_incoming):
        return d_incoming.contiguous()

    def finish_backward(self, pending, saved):
        """The suffix scan of the incoming-state gradients with the transposed transitions
        gives each summary's G_next: its state's gradient, and its transition's through
        `apply_backward` (all local segments and chains at once)."""
        transitions, incoming = saved
        d_states = _doubling_scan(self.layout, self.group, self._orders(True), transitions.transposed(), pending)
        return d_states, transitions.apply_backward(d_states, incoming)[1]


PREFIX_SCAN_WORLD = 32
"""From this many ranks `default_exchange` picks `PrefixScan` whatever the state size."""
PREFIX_SCAN_LARGE_STATE = (16, 8 << 20)
"""(ranks, state bytes): from these ranks, states of at least these bytes pick `PrefixScan`."""


def default_exchange(world_size: int, state_bytes: int) -> type:
    """The exchange class LASP-2 uses for `world_size` ranks exchanging `state_bytes` of
    states per rank, layer and direction (the summaries' state part, [nseg, C, B, H, K, V]):
    `PrefixScan` from `PREFIX_SCAN_WORLD` = 32 ranks, or from 16 ranks for states of
    8 MiB or more; `AllGatherScan` below.

    The crossover is where the projected scaling model (`benchmarks/scaling.py`, interim
    H100 calibration: NVLink 345 GB/s inside 8-GPU nodes, 45 GB/s per GPU across them,
    7 µs per walk or compose step) has the log-depth scan, which is not overlapped, beat
    what the all-gather plus its walk of W·nseg summaries leaves exposed beyond the output
    phase it hides behind (281 µs at 32K local tokens, overlap efficiency 0.8). With 1 MiB
    states: W = 16, 63 µs exposed against 117 µs of scan; W = 32, 351 against 166 µs;
    W = 256, 4.4 ms against 0.31 ms. With 16 MiB states: W = 8, 203 against 206 µs (a
    tie); W = 16, 747 against 604 µs (the crossover is 5.2 MiB). Shorter local sequences
    hide less (at 8K local tokens the scan wins from W = 16 for every size), longer ones
    more (from W = 64 at 128K).
    """
    for name, value in (("world_size", world_size), ("state_bytes", state_bytes)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if state_bytes < 0:
        raise ValueError(f"state_bytes must be >= 0, got {state_bytes}")
    ranks, large = PREFIX_SCAN_LARGE_STATE
    if world_size >= PREFIX_SCAN_WORLD or (world_size >= ranks and state_bytes >= large):
        return PrefixScan
    return AllGatherScan


@dataclass(frozen=True)
class AutoExchange:
    """The exchange `default_exchange` picks for the group's size and the summaries' state
    bytes, built at `start`. The backward picks again from the incoming-state gradients,
    which have the states' shape and dtype, so both directions use one exchange."""

    layout: SequenceLayout
    group: object = None
    reverse: tuple = (False,)

    def _pick(self, states):
        chosen = default_exchange(self.layout.world_size, states.numel() * states.element_size())
        return chosen(self.layout, self.group, self.reverse)

    def start(self, states, transitions):
        exchange = self._pick(states)
        return exchange, exchange.start(states, transitions)

    def finish(self, pending):
        exchange, inner = pending
        incoming, saved = exchange.finish(inner)
        return incoming, (exchange, saved)

    def start_backward(self, d_incoming):
        exchange = self._pick(d_incoming)
        return exchange, exchange.start_backward(d_incoming)

    def finish_backward(self, pending, saved):
        exchange, inner = pending
        return exchange.finish_backward(inner, saved[1])


class _Exchange(torch.autograd.Function):
    """An exchange's two halves back to back, differentiable in the states and the
    transitions' parameter."""

    @staticmethod
    def forward(ctx, states, param, kind, exchange):
        incoming, saved = exchange.finish(exchange.start(states, Transition(kind, param)))
        ctx.saved = saved
        ctx.exchange = exchange
        return incoming

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_incoming):
        exchange = ctx.exchange
        d_states, d_param = exchange.finish_backward(exchange.start_backward(d_incoming), ctx.saved)
        return d_states, d_param, None, None


def all_gather_scan(states, transitions, layout, group=None, reverse=(False,), overlap=True):
    """LASP-2 exchange as one differentiable op: states [nseg, C, B, H, K, V] and
    transitions ([nseg, C, B, H, ...]) of this rank's segments -> the value entering
    each, [nseg, C, B, H, K, V]."""
    return _Exchange.apply(states, transitions.param, transitions.kind,
                           AllGatherScan(layout, group, tuple(reverse), overlap))


def ring_scan(states, transitions, layout, group=None, reverse=(False,)):
    """LASP-1 exchange as one differentiable op (arguments as `all_gather_scan`)."""
    return _Exchange.apply(states, transitions.param, transitions.kind, RingScan(layout, group, tuple(reverse)))


def prefix_scan(states, transitions, layout, group=None, reverse=(False,)):
    """The log-depth exchange as one differentiable op (arguments as `all_gather_scan`)."""
    return _Exchange.apply(states, transitions.param, transitions.kind, PrefixScan(layout, group, tuple(reverse)))
