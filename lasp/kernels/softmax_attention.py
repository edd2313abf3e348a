"""`softmax_attention`: single-device softmax attention with offset causal and document masks.

The local step of LASP-2H (and of the ring baseline): a block of queries against a block
of keys that may be longer, where the queries are the LAST queries of the keys' span.
The contract follows flash-attn's variable-length convention, so every backend agrees:

- Without `cu_seqlens_*`: with `causal`, query i sees key j iff j <= i + (Tk − Tq)
  (the causal mask aligned to the lower-right corner; Tq == Tk is ordinary causal).
- With `cu_seqlens_q` / `cu_seqlens_k` (B = 1, the same number N of documents): query i
  of document d sees only keys of document d, and with `causal` the mask is aligned to
  the lower-right corner of each document's block: j <= i + cu_k[d+1] − cu_q[d+1].
- A query that sees no key gets output 0 and log-sum-exp −inf (math and flex backends).

Backends, chosen per call (`backend=None`):

- ``flash_attn``: the flash-attn package (optional extra), CUDA fp16/bf16; used first
  when it is installed. No log-sum-exp output.
- ``sdpa``: `torch.nn.functional.scaled_dot_product_attention` (flash / cuDNN /
  efficient kernels); lower-right causal masks through `causal_lower_right`, which torch
  runs on its flash (FA2) kernel, while a square causal call may get cuDNN. No document
  masks, no log-sum-exp.
- ``flex``: `torch.nn.attention.flex_attention` (compiled on CUDA, `dynamic=False`) with
  a block mask built on the device (`_block_mask`: no Tq×Tk mask, no compiled
  `create_block_mask`); document masks and a differentiable log-sum-exp. Its
  backward needs CUDA. Each new (shape, mask kind) compiles once; past torch's recompile
  limit (`torch._dynamo.config.cache_size_limit`, 8) torch falls back to an unfused flex
  that materialises the scores, so a process that runs many shapes must raise it.
- ``math``: plain torch (masked matmul–softmax–matmul in fp32, or fp64 for fp64 input);
  any device and dtype, every feature. The CPU path and the oracle of the others.

The masks are built on the device from `cu_seqlens` with `searchsorted`: no host sync.
GQA/MQA (H_q a multiple of H_kv; query head h uses key head h // (H_q / H_kv)) never
copies the keys, except the `sdpa` backend on torch < 2.5, which repeats them.
Values may be narrower or wider than queries and keys (Dv ≠ D, as in MLA): every backend
but ``flash_attn`` takes them (torch's sdpa dispatch skips its flash kernel by itself).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from lasp.kernels.checks import FLOAT_DTYPES, check_cu_seqlens, check_tensor

BACKENDS = ("flash_attn", "sdpa", "flex", "math")
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


# Looked up once, at import (not in a cached function: torch.compile would trace through it).
_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def flash_attn_available() -> bool:
    """Whether the optional flash-attn package is importable."""
    return _FLASH_ATTN


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def softmax_attention(q, k, v, *, scale=None, causal=True, cu_seqlens_q=None, cu_seqlens_k=None,
                      return_lse=False, backend=None):
    """Softmax attention of `q` against `k`, `v` under the lower-right-aligned masks above.

    Args:
        q: [B, Tq, H_q, D]; k: [B, Tk, H_kv, D]; v: [B, Tk, H_kv, Dv]; one floating dtype and device.
        scale: score scale, default D^-0.5.
        causal: apply the (lower-right aligned) causal mask.
        cu_seqlens_q, cu_seqlens_k: int [N+1] document offsets into q and k (B = 1);
            both or neither.
        return_lse: also return the log-sum-exp of the scaled scores, [B, H_q, Tq] in fp32
            (fp64 for fp64 input); differentiable (flex and math backends).
        backend: one of `BACKENDS`, or None to choose from the device, dtype and features.

    Returns o [B, Tq, H_q, Dv] in q's dtype, or (o, lse).
    """
    check_attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k)
    backend = pick_backend(backend, q, documents=cu_seqlens_q is not None, return_lse=return_lse, v=v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "flash_attn":
        return _flash_attn(q, k, v, scale, causal, cu_seqlens_q, cu_seqlens_k)
    if backend == "sdpa":
        return _sdpa(q, k, v, scale, causal)
    mask = _mask_spec(q.shape[1], k.shape[1], causal, cu_seqlens_q, cu_seqlens_k, q.device)
    run = _flex if backend == "flex" else _math
    o, lse = run(q, k, v, scale, mask)
    return (o, lse) if return_lse else o


def check_attention_inputs(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None) -> None:
    """Raise TypeError/ValueError for inputs outside the contract of `softmax_attention`."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, 4)
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be bf16, fp16, fp32 or fp64, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must have one shape [B,Tk,H_kv] (their head dims may differ), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    B, _, Hq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be [B,Tk,H_kv,D] with B={B}, D={D} as in q, got {tuple(k.shape)}")
    if Hq % k.shape[2]:
        raise ValueError(f"the query heads ({Hq}) must be a multiple of the key/value heads ({k.shape[2]})")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("pass both cu_seqlens_q and cu_seqlens_k, or neither")
    if cu_seqlens_q is not None:
        check_cu_seqlens(cu_seqlens_q, q)
        check_cu_seqlens(cu_seqlens_k, k)
        if cu_seqlens_q.shape != cu_seqlens_k.shape:
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same documents, got "
                             f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")


def pick_backend(backend, q, *, documents: bool, return_lse: bool, v=None) -> str:
    """The backend `softmax_attention` runs for `q` and values `v` (validating an explicit choice)."""
    cuda = q.device.type == "cuda"
    half = q.dtype in (torch.float16, torch.bfloat16)
    flash = flash_attn_available() and cuda and half and (v is None or v.shape[-1] == q.shape[-1])
    if backend is None:
        if not cuda or q.dtype == torch.float64:
            return "math"
        if return_lse:
            return "flex"
        if flash:
            return "flash_attn"
        return "flex" if documents else "sdpa"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "flash_attn" and not flash:
        raise ValueError("backend='flash_attn' needs the flash-attn package, CUDA fp16/bf16 tensors and "
                         "values as wide as the queries")
    if backend == "sdpa" and documents:
        raise ValueError("backend='sdpa' has no document masks: use 'flex', 'flash_attn' or 'math'")
    if return_lse and backend in ("flash_attn", "sdpa"):
        raise ValueError(f"backend={backend!r} returns no differentiable log-sum-exp: use 'flex' or 'math'")
    return backend


def _mask_spec(Tq, Tk, causal, cu_q, cu_k, device):
    """The mask as per-token tensors, built on the device: (last, doc_q, doc_k).

    last[i]: the last key query i may see (None without `causal`); doc_q[i], doc_k[j]:
    document indices (None without documents). Query i sees key j iff
    j <= last[i] and doc_q[i] == doc_k[j].
    """
    rows = torch.arange(Tq, device=device)
    if cu_q is None:
        return (rows + (Tk - Tq) if causal else None), None, None
    cu_q, cu_k = cu_q.long(), cu_k.long()
    doc_q = torch.searchsorted(cu_q, rows, right=True) - 1
    doc_k = torch.searchsorted(cu_k, torch.arange(Tk, device=device), right=True) - 1
    last = rows + (cu_k[1:] - cu_q[1:])[doc_q] if causal else None
    return last, doc_q, doc_k


def _dense_mask(mask, Tk):
    """[Tq, Tk] boolean "may see" matrix, or None when every query sees every key."""
    last, doc_q, doc_k = mask
    allowed = None
    if last is not None:
        allowed = torch.arange(Tk, device=last.device) <= last[:, None]
    if doc_q is not None:
        same = doc_q[:, None] == doc_k[None, :]
        allowed = same if allowed is None else allowed & same
    return allowed


def _math(q, k, v, scale, mask):
    """Masked matmul–softmax–matmul; every key head serves its G query heads by broadcasting."""
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh = q.to(work).unflatten(2, (Hkv, Hq // Hkv)).permute(0, 2, 3, 1, 4)   # [B, Hkv, G, Tq, D]
    kh = k.to(work).transpose(1, 2).unsqueeze(2)                            # [B, Hkv, 1, Tk, D]
    vh = v.to(work).transpose(1, 2).unsqueeze(2)
    s = (qh @ kh.transpose(-1, -2)) * scale
    allowed = _dense_mask(mask, k.shape[1])
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    # The row maximum only stabilises exp(); lse and p do not depend on it, so it is detached.
    # Rows that see no key are kept finite here and given o = 0, lse = -inf below.
    m = s.detach().amax(-1, keepdim=True)
    m = m.masked_fill(m == float("-inf"), 0.0)
    e = (s - m).exp()
    denom = e.sum(-1, keepdim=True)
    empty = denom == 0
    denom = denom.masked_fill(empty, 1.0)
    o = (e / denom) @ vh                                                    # [B, Hkv, G, Tq, Dv]
    lse = (m + denom.log()).masked_fill(empty, float("-inf")).squeeze(-1)
    return o.permute(0, 3, 1, 2, 4).flatten(2, 3).to(q.dtype), lse.flatten(1, 2)


FLEX_BLOCK = 128  # flex_attention's default block size (tokens per side of a block)


def _visible_keys(mask, Tq, Tk, device):
    """Each query's visible keys as one range [first, last] (last < first: none).

    Both mask kinds give a range: a document's keys are contiguous, and the causal
    bound cuts the range's end.
    """
    last, doc_q, doc_k = mask
    if doc_q is None:
        first = torch.zeros(Tq, dtype=torch.int64, device=device)
        end = torch.full((Tq,), Tk - 1, dtype=torch.int64, device=device)
    else:
        first = torch.searchsorted(doc_k, doc_q)
        end = torch.searchsorted(doc_k, doc_q, right=True) - 1
    if last is not None:
        end = torch.minimum(end, last)
    return first, end


def _block_mask(mask, mask_mod, Tq, Tk, device):
    """The flex BlockMask of the mask, built on the device from the key ranges.

    torch's `create_block_mask` evaluates the mask on every block and sorts the blocks;
    compiled, its Triton sort takes minutes to compile at some lengths (32K tokens on
    torch 2.11, pytorch#182060), and uncompiled it materialises the Tq×Tk mask. Here each
    query block's keys span one range of key blocks: the blocks every query of the block
    sees whole are *full* (no mask_mod), the rest of the range is partial (mask_mod).
    """
    from torch.nn.attention.flex_attention import BlockMask

    B = FLEX_BLOCK
    nq, nk, pad = -(-Tq // B), -(-Tk // B), -Tq % B
    first, end = _visible_keys(mask, Tq, Tk, device)
    sees = end >= first

    def per_block(x, pad_value, reduce):
        return reduce(F.pad(x, (0, pad), value=pad_value).view(nq, B), 1)

    # Union of the block's ranges (queries that see nothing and padding left out) ...
    lo = per_block(torch.where(sees, first, Tk), Tk, torch.amin) // B
    hi = per_block(torch.where(sees, end, -1), -1, torch.amax) // B
    hi = torch.maximum(hi, lo - 1)
    # ... and the key blocks inside every query's range.
    full_lo = (per_block(first, 0, torch.amax) + B - 1) // B
    full_hi = (per_block(end, Tk, torch.amin) + 1) // B - 1
    has_full = full_hi >= full_lo
    full_lo, full_hi = torch.where(has_full, full_lo, hi + 1), torch.where(has_full, full_hi, hi)
    before, after = full_lo - lo, hi - full_hi           # partial blocks on either side
    t = torch.arange(nk, device=device)
    partial = torch.where(t < before[:, None], lo[:, None] + t, full_hi[:, None] + 1 + t - before[:, None])
    full = full_lo[:, None] + t

    def blocks(x):
        return x.to(torch.int32)[None, None]

    return BlockMask.from_kv_blocks(
        blocks(before + after), blocks(partial.clamp(0, nk - 1)), blocks(full_hi - full_lo + 1),
        blocks(full.clamp(0, nk - 1)), BLOCK_SIZE=B, mask_mod=mask_mod, seq_lengths=(Tq, Tk))


def _flex(q, k, v, scale, mask):
    from torch.nn.attention.flex_attention import flex_attention

    Tq, Tk = q.shape[1], k.shape[1]
    last, doc_q, doc_k = mask
    cuda = q.device.type == "cuda"
    if doc_q is None and last is None:
        block_mask = None
    else:
        if doc_q is None:
            def mask_mod(b, h, i, j):
                return j <= last[i]
        elif last is None:
            def mask_mod(b, h, i, j):
                return doc_q[i] == doc_k[j]
        else:
            def mask_mod(b, h, i, j):
                return (j <= last[i]) & (doc_q[i] == doc_k[j])
        block_mask = _block_mask(mask, mask_mod, Tq, Tk, q.device)
    run = _compiled_flex() if cuda else flex_attention
    o, lse = run(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                 scale=scale, enable_gqa=q.shape[2] != k.shape[2], return_lse=True)
    return o.transpose(1, 2), lse


def _sdpa(q, k, v, scale, causal):
    from torch.nn.attention.bias import causal_lower_right

    Tq, Tk = q.shape[1], k.shape[1]
    groups = q.shape[2] // k.shape[2]
    gqa = {}
    if groups > 1 and _SDPA_HAS_GQA:
        gqa = {"enable_gqa": True}
    elif groups > 1:
        k, v = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
    mask = causal_lower_right(Tq, Tk) if causal and Tq != Tk else None
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, is_causal=causal and Tq == Tk, scale=scale, **gqa)
    return o.transpose(1, 2)


def _flash_attn(q, k, v, scale, causal, cu_q, cu_k):
    """flash-attn ≥ 2.1: causal masks are lower-right aligned per sequence, as in our contract."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if cu_q is None:
        return flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)
    # max_seqlen_* only size the launch: the totals bound them without reading cu_seqlens.
    o = flash_attn_varlen_func(q[0], k[0], v[0], cu_q.int(), cu_k.int(), q.shape[1], k.shape[1],
                               softmax_scale=scale, causal=causal)
    return o.unsqueeze(0)
