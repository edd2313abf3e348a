"""The attention ops a layer calls: sequence-parallel under a layout, single-device without.

Under a `SequenceLayout` the linear op is LASP-2, the softmax op LASP-2H and the
Mixture-of-Memories ops their LASP-2 forms (`lasp.parallel.mom`); without one (the whole
sequence is local) they are the single-device kernels of `lasp.kernels`. Tensors are
[B, T, H, D]; `cu_seqlens` describes the whole packed sequence.

Under torch.compile the single-device ops compile into their caller's graph (the Triton
kernels are custom ops: `lasp.kernels.compiled`); the sequence-parallel ones break it and
run eagerly (`eager_under_compile`).
"""

from __future__ import annotations

from lasp.kernels import linear_attention
from lasp.kernels.compiled import eager_under_compile
from lasp.kernels.mom import load_balancing_loss, mixture_of_memories
from lasp.kernels.softmax_attention import softmax_attention
from lasp.parallel.lasp2 import lasp2_linear_attention
from lasp.parallel.lasp2h import lasp2h_attention
from lasp.parallel.mom import lasp2_load_balancing_loss, lasp2_mixture_of_memories


def linear_attention_op(q, k, v, g=None, g_gamma=None, *, gk=None, beta=None, scale=None, layout=None,
                        group=None, cu_seqlens=None):
    """Causal linear attention of the local tokens (LASP-2 across the group under a layout).
    At most one decay: `g_gamma` [H], `g` [B, T, H] or `gk` [B, T, H, K] (log-decays ≤ 0);
    `beta` [B, T, H] selects the delta rule (keys normalised by the caller)."""
    if layout is None:
        return linear_attention(q, k, v, g, g_gamma, gk=gk, beta=beta, scale=scale, cu_seqlens=cu_seqlens)[0]
    return _lasp2_linear_attention(q, k, v, g, g_gamma, gk=gk, beta=beta, layout=layout, group=group, scale=scale,
                                   cu_seqlens=cu_seqlens)


def softmax_attention_op(q, k, v, *, scale=None, layout=None, group=None, cu_seqlens=None):
    """Causal softmax attention of the local queries (LASP-2H under a layout); GQA k, v."""
    if layout is None:
        return softmax_attention(q, k, v, scale=scale, causal=True, cu_seqlens_q=cu_seqlens,
                                 cu_seqlens_k=cu_seqlens)
    return _lasp2h_attention(q, k, v, layout=layout, group=group, scale=scale, cu_seqlens=cu_seqlens)


def mixture_of_memories_op(q, k, v, weights, plan, g=None, g_gamma=None, *, beta=None, layout=None, group=None,
                           cu_seqlens=None):
    """MoM linear attention of the local tokens (`lasp.kernels.mixture_of_memories`;
    LASP-2 over every memory's chain under a layout, `plan` from `lasp.parallel.local_plan`)."""
    if layout is None:
        return mixture_of_memories(q, k, v, weights, plan, g, g_gamma, beta=beta)[0]
    return _lasp2_mixture_of_memories(q, k, v, weights, plan, g, g_gamma, beta=beta, layout=layout, group=group,
                                      cu_seqlens=cu_seqlens)


def load_balancing_loss_op(probs, indices, *, layout=None, group=None):
    """MoM's load-balancing loss: of the local tokens, or under a layout this rank's share
    of the whole sequence's (`lasp.parallel.lasp2_load_balancing_loss`: it all-reduces the
    routing counts)."""
    if layout is None:
        return load_balancing_loss(probs, indices)
    return _lasp2_load_balancing_loss(probs, indices, layout=layout, group=group)


# The sequence-parallel ops, run eagerly under torch.compile (a graph break at each call).
_lasp2_linear_attention = eager_under_compile(lasp2_linear_attention)
_lasp2h_attention = eager_under_compile(lasp2h_attention)
_lasp2_mixture_of_memories = eager_under_compile(lasp2_mixture_of_memories)
_lasp2_load_balancing_loss = eager_under_compile(lasp2_load_balancing_loss)
