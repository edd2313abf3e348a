"""Single-device math: chunkwise linear attention (Triton) and its pure-torch oracle,
Mixture-of-Memories on top of it, and the local softmax-attention backends that LASP-2H
runs on each rank. Single-device only: `lasp.parallel` composes these ops across ranks
(no collectives here).

Where things are:

    linear_attention.py   the public op: validates once, picks the family and backend
    transition.py         `Transition`: what a token or a run of tokens does to the state
    naive.py              the token-by-token recurrence of every family (the spec)
    state.py              how an incoming state reaches a run's outputs
    common/               what families share: launch table, span plans, Triton tiles,
                          the span scan, the torch loop over documents and TorchPhases
    scalar/               plain, g_gamma, g: chunk.py (torch form) and triton.py
    diagonal/             gk (per-key decay): chunk.py and triton.py
    delta/                the delta rule (beta; with none, g or gk): wy.py (UT-transform
                          pieces), chunk.py (torch form, run_transitions, the affine
                          run), triton.py
    mom.py, triton_mom.py Mixture-of-Memories
    softmax_attention.py  local softmax attention for LASP-2H

Glossary (each word means one thing in lasp):

    chunk       the C tokens a kernel tiles (`common.launch.CHUNK_SIZE`; per Triton family
                `FAMILY_CHUNK`)
    span        consecutive chunks one Triton program walks
    segment     a `lasp.parallel.SequenceLayout` unit (W or 2W per sequence); never
                used inside a kernel
    document    one `cu_seqlens` entry (an unpacked row counts as one); no state
                crosses a document start
    row         the batch index b
    sequence    the whole `seq_len` sample before sharding
    transition  the linear map A a token or a run applies to the state
    summary     a run's `(A, S_loc)`: its transition and its zero-start final state
    stream      MoM: one memory's routed tokens within one document
"""

from lasp.kernels.linear_attention import linear_attention, linear_attention_phases
from lasp.kernels.mom import (MoMPlan, load_balancing_loss, mixture_of_memories, mom_dispatch, mom_projection,
                              mom_reference, mom_route, mom_state_output)
from lasp.kernels.naive import naive_linear_attention
from lasp.kernels.scalar.chunk import chunk_linear_attention
from lasp.kernels.softmax_attention import softmax_attention
from lasp.kernels.state import state_output
from lasp.kernels.transition import Transition, run_transition

__all__ = [
    "linear_attention",
    "linear_attention_phases",
    "naive_linear_attention",
    "chunk_linear_attention",
    "Transition",
    "run_transition",
    "state_output",
    "softmax_attention",
    "mom_route",
    "mom_dispatch",
    "MoMPlan",
    "mom_projection",
    "mixture_of_memories",
    "mom_reference",
    "mom_state_output",
    "load_balancing_loss",
]
