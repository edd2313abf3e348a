"""The load-balancing loss of a transformers MoE model under sequence parallelism.

transformers adds ``router_aux_loss_coef × load_balancing_loss_func(router_logits)`` to a
MoE model's loss when ``config.output_router_logits`` is set (Mixtral, Qwen2/3-MoE, MiniMax,
Qwen3-Next, Granite-MoE-hybrid, ... all share that function). Its fractions are over the
tokens it sees, so on a shard it would balance each rank's tokens, not the sequence's.
`router_aux_loss` gives this rank's share of the WHOLE sequence's loss instead (lasp's
Mixture-of-Memories way: `lasp.parallel.mom.lasp2_load_balancing_loss`): the routing
counts are summed over the SP group (no gradient), the router probabilities stay local,
so the ranks' shares and their gradients sum to the single-process loss.
"""

from __future__ import annotations

import torch

from lasp.kernels.mom import mom_route
from lasp.parallel.mom import lasp2_load_balancing_loss


def routes_aux_loss(model) -> bool:
    """Whether `model`'s own forward adds a load-balancing loss (a transformers MoE model whose
    config asks for its router logits)."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "output_router_logits", False)) and hasattr(config, "router_aux_loss_coef")


def router_aux_loss(model, router_logits, local_len: int) -> torch.Tensor:
    """This rank's share of transformers' load-balancing loss of the whole sequence:
    E · Σ_e f_e · P_e, f_e the top-k assignments to expert e per token and P_e its mean
    router probability, both over every MoE layer and every token of every rank.

    router_logits: the decoder's, one [N_local, E] (or [B, T_local, E]) tensor per MoE
    layer; `local_len`: this rank's tokens per row. Computed in fp32 or wider.
    """
    if not router_logits:
        raise ValueError(f"{type(model).__name__}: output_router_logits is set but its decoder returned no "
                         "router logits")
    top_k = model.config.num_experts_per_tok
    logits = torch.stack([layer.reshape(-1, layer.shape[-1]) for layer in router_logits])   # [layers, N_local, E]
    _, indices, probs = mom_route(logits, top_k)
    context = getattr(model.base_model, "lasp_context", None)
    if context is None or context.sp.world_size == 1:
        return top_k * lasp2_load_balancing_loss(probs, indices)
    layout = context.sp.local_layout(local_len)
    # lasp's fraction is per routed copy (÷ k), transformers' per token: × k.
    return top_k * lasp2_load_balancing_loss(probs, indices, layout=layout, group=context.sp.group)
