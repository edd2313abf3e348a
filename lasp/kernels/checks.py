"""Argument checks shared by the kernels and the parallel ops.

Shape and dtype errors raise at once. Checks on tensor *values* (log-decays ≤ 0,
`cu_seqlens` increasing) must not synchronise the host with the GPU, so on CUDA they
become device-side asserts (`torch._assert_async`): a violation stops the program at
the next launch instead of producing a silent wrong result. On CPU they raise
`ValueError` immediately, except under `torch.compile`, which traces them as device
asserts too (a Python branch on a tensor's value would break its graph).
"""

from __future__ import annotations

import torch

from lasp.kernels.transition import Transition, token_transitions

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def check_value(condition: torch.Tensor, message: str) -> None:
    """Assert a boolean tensor is all true without a host sync on CUDA."""
    condition = condition.all()
    if condition.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(condition):
            raise ValueError(message)
    else:
        torch._assert_async(condition, message)


def check_log_decays(name: str, x: torch.Tensor) -> None:
    """`x` finite and ≤ 0 everywhere, in one reduction pass over it (`torch.aminmax`; a NaN
    propagates into both ends and fails the check): on a [B,T,H,K] gk of 1×32K×16×128 the
    elementwise form took 0.33 ms of a 7.9 ms step (H100)."""
    if x.numel():
        low, high = torch.aminmax(x)
        check_value((high <= 0) & (low > float("-inf")),
                    f"{name} holds log-decays and must be finite and <= 0 everywhere (no -inf: "
                    f"to reset the state, start a new document with cu_seqlens)")


def check_finite(name: str, x: torch.Tensor) -> None:
    """`x` finite everywhere, in one reduction pass (as `check_log_decays`)."""
    if x.numel():
        low, high = torch.aminmax(x)
        check_value((low > float("-inf")) & (high < float("inf")), f"{name} must be finite everywhere")


def check_tensor(name: str, x, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def check_qkv(q, k, v) -> None:
    """q, k: [B,T,H,K]; v: [B,T,H,V]; one floating dtype and device."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, 4)
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be bf16, fp16, fp32 or fp64, got {x.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"k must have the shape of q [B,T,H,K]={tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B,T,H,V] with B,T,H={tuple(q.shape[:3])}, got {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def check_decay(q, *, g=None, g_gamma=None, gk=None, causal: bool = True) -> Transition:
    """The decay arguments of `linear_attention` as per-token transitions.

    g: [B,T,H] per-token log-decay; g_gamma: [H] per-head log-decay (returned expanded
    to [B,T,H]); gk: [B,T,H,K] per-key log-decay. At most one; natural logs, finite and
    ≤ 0 (checked on the device without a host sync on CUDA). Parameters keep their dtype.
    """
    given = [name for name, x in (("g", g), ("g_gamma", g_gamma), ("gk", gk)) if x is not None]
    if len(given) > 1:
        raise ValueError(f"pass at most one of g (per-token decay), g_gamma (fixed decay) and gk "
                         f"(per-key decay), got {' and '.join(given)}")
    if not causal and given:
        raise ValueError(f"causal=False supports plain linear attention only: {given[0]} must be None")
    B, T, H, K = q.shape
    for name, x, shape in (("g", g, (B, T, H)), ("g_gamma", g_gamma, (H,)), ("gk", gk, (B, T, H, K))):
        if x is None:
            continue
        check_tensor(name, x, len(shape))
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor of natural-log decays, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on {q.device}, got {x.device}")
        check_log_decays(name, x)
    if g_gamma is not None:
        g = g_gamma[None, None, :].expand(B, T, H)
    return token_transitions(g, gk)


def check_beta(beta, q, causal: bool) -> None:
    """beta: [B,T,H] write strength of the delta rule (causal only); finite."""
    if beta is None:
        return
    if not causal:
        raise ValueError("causal=False supports plain linear attention only: beta must be None")
    check_tensor("beta", beta, 3)
    if tuple(beta.shape) != tuple(q.shape[:3]):
        raise ValueError(f"beta must have shape {tuple(q.shape[:3])} [B,T,H], got {tuple(beta.shape)}")
    if not beta.is_floating_point():
        raise TypeError(f"beta must be a floating tensor, got {beta.dtype}")
    if beta.device != q.device:
        raise ValueError(f"beta must be on {q.device}, got {beta.device}")
    check_finite("beta", beta)


def check_cu_seqlens(cu_seqlens, q) -> int:
    """Packed input: B == 1 and cu_seqlens int [N+1] from 0 to T, non-decreasing. Returns N."""
    B, T = q.shape[:2]
    check_tensor("cu_seqlens", cu_seqlens, 1)
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if B != 1:
        raise ValueError(f"cu_seqlens needs packed input with batch size 1, got B={B}")
    if cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must hold at least two offsets [0, ..., T]")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be on {q.device}, got {cu_seqlens.device}")
    ends_ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == T)
    check_value(ends_ok, f"cu_seqlens must start at 0 and end at T={T}")
    check_value(cu_seqlens[1:] >= cu_seqlens[:-1], "cu_seqlens must be non-decreasing")
    return cu_seqlens.numel() - 1


def check_state(name: str, state, shape) -> None:
    """A state tensor [N,H,K,V] in a floating dtype, on the inputs' device."""
    if state is None:
        return
    check_tensor(name, state, 4)
    if tuple(state.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape [N,H,K,V]={tuple(shape)}, got {tuple(state.shape)}")
    if not state.is_floating_point():
        raise TypeError(f"{name} must be floating (fp32 recommended), got {state.dtype}")
