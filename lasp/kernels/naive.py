"""The token-by-token recurrence of every family: the spec every faster form is tested against.

Per head (DESIGN.md §1), with the token's transition A_t (identity, exp(g_t), or
diag(exp(gk_t))) and, for the delta rule (`beta`), the write against the decayed state::

    S_t = A_t(S_{t-1}) + k_t v_tᵀ                          (no beta)
    S_t = A_t(S_{t-1}) + β_t k_t (v_t − k_tᵀ A_t(S_{t-1}))ᵀ    (beta)
    o_t = scale · q_tᵀ S_t

Slow and obviously right; any dtype (float64 for the oracle). States accumulate in
fp32, or float64 for float64 inputs. Each packed document (`cu_seqlens`) runs alone.
"""

from __future__ import annotations

import torch

from lasp.kernels.common.documents import accumulation_dtype, documents
from lasp.kernels.transition import token_transitions


def naive_linear_attention(q, k, v, g=None, *, gk=None, beta=None, scale, initial_state=None,
                           output_final_state=False, cu_seqlens=None, causal=True):
    """Token loop over already-validated arguments (`g` per token: a fixed decay arrives
    expanded). Returns `(o, final_state or None)`. Non-causal (plain only): every token
    reads its document's whole state (`initial_state` plus all keys and values)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = accumulation_dtype(q.dtype)
    tokens = token_transitions(g, gk).to(acc)
    o = torch.empty(B, T, H, V, dtype=acc, device=q.device)
    finals = []
    for n, (b, start, end) in enumerate(documents(B, T, cu_seqlens)):
        state = (q.new_zeros(H, K, V, dtype=acc) if initial_state is None else initial_state[n].to(acc))
        qs, ks, vs = (x[b, start:end].to(acc) for x in (q, k, v))
        if not causal:
            state = state + torch.einsum("thk,thv->hkv", ks, vs)
            o[b, start:end] = scale * torch.einsum("thk,hkv->thv", qs, state)
        for t in range(end - start) if causal else ():
            state = tokens.select((b, start + t)).apply(state)
            if beta is None:
                state = state + ks[t, :, :, None] * vs[t, :, None, :]
            else:
                error = vs[t] - torch.einsum("hk,hkv->hv", ks[t], state)
                state = state + beta[b, start + t].to(acc)[:, None, None] * ks[t, :, :, None] * error[:, None, :]
            o[b, start + t] = scale * torch.einsum("hk,hkv->hv", qs[t], state)
        finals.append(state)
    return o.to(q.dtype), torch.stack(finals) if output_final_state else None
