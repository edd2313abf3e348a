"""softmax_attention: every backend against a naive float64 reference, masks, GQA, bad input.

The reference loops over query rows and lists the keys each may see from the contract
written out directly (lower-right-aligned causal mask per document), so it shares no
mask code with the kernel. CPU: the math backend (values and gradients), SDPA's CPU path
(no documents) and flex_attention's eager forward (flex has no CPU backward). GPU tier:
every backend available there in bf16 against the math backend in fp32.
"""

import warnings

import pytest
import torch

from lasp.kernels.softmax_attention import flash_attn_available, pick_backend, softmax_attention
from tests.utils import rel_err


def naive_attention(q, k, v, scale, causal, cu_q=None, cu_k=None):
    """(o [B,Tq,Hq,D], lse [B,Hq,Tq]) row by row; differentiable; rows that see nothing get 0, -inf."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    cu_q = [0, Tq] if cu_q is None else cu_q.tolist()
    cu_k = [0, Tk] if cu_k is None else cu_k.tolist()
    rows, lses = [], []
    for b in range(B):
        for h in range(Hq):
            kh, vh = k[b, :, h // (Hq // Hkv)], v[b, :, h // (Hq // Hkv)]
            for d in range(len(cu_q) - 1):
                for i in range(cu_q[d], cu_q[d + 1]):
                    last = i + cu_k[d + 1] - cu_q[d + 1] if causal else cu_k[d + 1] - 1
                    keys = list(range(cu_k[d], min(last, cu_k[d + 1] - 1) + 1))
                    if not keys:
                        rows.append(q.new_zeros(D))
                        lses.append(q.new_tensor(float("-inf")))
                        continue
                    s = (kh[keys] @ q[b, i, h]) * scale
                    rows.append(torch.softmax(s, 0) @ vh[keys])
                    lses.append(torch.logsumexp(s, 0))
    o = torch.stack(rows).view(B, Hq, Tq, D).transpose(1, 2)
    return o, torch.stack(lses).view(B, Hq, Tq)


def _inputs(B, Tq, Tk, Hq, Hkv, D, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    make = lambda *s: torch.randn(*s, dtype=dtype, device=device, generator=g).requires_grad_()  # noqa: E731
    return make(B, Tq, Hq, D), make(B, Tk, Hkv, D), make(B, Tk, Hkv, D), \
        torch.randn(B, Tq, Hq, D, dtype=dtype, device=device, generator=g)


# (B, Tq, Tk, Hq, Hkv, D, cu_q, cu_k): square, offset (Tq < Tk), GQA and MQA, documents
# with an empty one, documents whose query part is a suffix of their key part (as in LASP-2H).
CASES = {
    "square-mha": (2, 9, 9, 2, 2, 16, None, None),
    "offset-gqa": (2, 5, 13, 4, 2, 16, None, None),
    "offset-mqa-d64": (1, 6, 11, 3, 1, 64, None, None),
    "docs-square": (1, 12, 12, 4, 2, 16, [0, 3, 3, 8, 12], [0, 3, 3, 8, 12]),
    "docs-suffix": (1, 7, 15, 2, 1, 16, [0, 0, 2, 2, 7], [0, 4, 10, 10, 15]),
}


def _case(name, device="cpu", dtype=torch.float64):
    B, Tq, Tk, Hq, Hkv, D, cu_q, cu_k = CASES[name]
    q, k, v, do = _inputs(B, Tq, Tk, Hq, Hkv, D, dtype, device)
    to_cu = lambda c: None if c is None else torch.tensor(c, dtype=torch.int32, device=device)  # noqa: E731
    return q, k, v, do, to_cu(cu_q), to_cu(cu_k)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", list(CASES))
def test_math_matches_naive_values_lse_and_gradients(name, causal):
    q, k, v, do, cu_q, cu_k = _case(name)
    scale = 0.3
    o, lse = softmax_attention(q, k, v, scale=scale, causal=causal, cu_seqlens_q=cu_q,
                               cu_seqlens_k=cu_k, return_lse=True, backend="math")
    o_ref, lse_ref = naive_attention(q, k, v, scale, causal, cu_q, cu_k)
    assert rel_err(o, o_ref) < 1e-12 and rel_err(lse, lse_ref) < 1e-12
    dlse = torch.randn_like(lse)
    got = torch.autograd.grad((o, lse), (q, k, v), (do, dlse))
    want = torch.autograd.grad((o_ref, lse_ref), (q, k, v), (do, dlse))
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", ["square-mha", "offset-gqa", "offset-mqa-d64"])
def test_sdpa_on_cpu_matches_naive(name, causal):
    q, k, v, do, _, _ = _case(name)
    o = softmax_attention(q, k, v, causal=causal, backend="sdpa")
    o_ref, _ = naive_attention(q, k, v, q.shape[-1] ** -0.5, causal)
    assert rel_err(o, o_ref) < 1e-12
    for a, b in zip(torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(o_ref, (q, k, v), do)):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", list(CASES))
def test_flex_forward_on_cpu_matches_naive(name, causal):
    """Checks the block-mask construction; flex_attention has no CPU backward."""
    q, k, v, _, cu_q, cu_k = _case(name)
    check_flex_forward(q.detach(), k.detach(), v.detach(), causal, cu_q, cu_k)


def check_flex_forward(q, k, v, causal, cu_q, cu_k):
    """flex's eager forward (CPU) against the naive reference, o and lse."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is unfused
        o, lse = softmax_attention(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                   return_lse=True, backend="flex")
    o_ref, lse_ref = naive_attention(q, k, v, q.shape[-1] ** -0.5, causal, cu_q, cu_k)
    seen = lse_ref.isfinite()                           # queries that see no key have lse −inf
    assert torch.equal(lse.isfinite(), seen) and rel_err(lse[seen], lse_ref[seen]) < 1e-12
    assert rel_err(o, o_ref) < 1e-12


# Longer than one 128-token flex block, lengths not multiples of it: (Tq, Tk, cu_q, cu_k).
BLOCK_CASES = {
    "square": (300, 300, None, None),
    "offset": (200, 520, None, None),
    "docs-square": (400, 400, [0, 5, 140, 140, 390, 400], [0, 5, 140, 140, 390, 400]),
    "docs-suffix": (300, 700, [0, 0, 100, 290, 300], [0, 200, 450, 600, 700]),
}


def _block_sets(num, idx):
    return {(i, int(idx[0, 0, i, t])) for i in range(num.shape[-1]) for t in range(int(num[0, 0, i]))}


# Every case with a mask: without documents only the causal one has a block mask.
BLOCK_MASKS = [(name, causal) for name in BLOCK_CASES for causal in (True, False)
               if causal or BLOCK_CASES[name][2] is not None]


@pytest.mark.parametrize("name, causal", BLOCK_MASKS)
def test_flex_block_mask_lists_every_visible_block(name, causal):
    """`_block_mask` from the key ranges: full blocks exactly the all-visible ones, every
    block with a visible pair listed once, and no extra block where the ranges leave no
    gap (aligned documents); flex's forward with it equals the naive reference."""
    from lasp.kernels.softmax_attention import FLEX_BLOCK, _block_mask, _dense_mask, _mask_spec
    Tq, Tk, cu_q, cu_k = BLOCK_CASES[name]
    to_cu = lambda c: None if c is None else torch.tensor(c, dtype=torch.int32)  # noqa: E731
    cu_q, cu_k = to_cu(cu_q), to_cu(cu_k)
    spec = _mask_spec(Tq, Tk, causal, cu_q, cu_k, "cpu")
    bm = _block_mask(spec, lambda b, h, i, j: i >= 0, Tq, Tk, "cpu")
    partial, full = _block_sets(bm.kv_num_blocks, bm.kv_indices), _block_sets(bm.full_kv_num_blocks,
                                                                             bm.full_kv_indices)
    dense = _dense_mask(spec, Tk)
    nq, nk = -(-Tq // FLEX_BLOCK), -(-Tk // FLEX_BLOCK)
    tiles = {(i, j): dense[i * FLEX_BLOCK:(i + 1) * FLEX_BLOCK, j * FLEX_BLOCK:(j + 1) * FLEX_BLOCK]
             for i in range(nq) for j in range(nk)}
    visible = {ij for ij, tile in tiles.items() if tile.any()}
    whole = {(i, j) for (i, j), tile in tiles.items() if tile.all() and (j + 1) * FLEX_BLOCK <= Tk}
    assert full == whole and not partial & full
    assert visible <= partial | full
    if name in ("square", "docs-square"):
        assert partial | full == visible
    q, k, v, _ = _inputs(1, Tq, Tk, 2, 1, 16)
    check_flex_forward(q.detach(), k.detach(), v.detach(), causal, cu_q, cu_k)


def test_queries_that_see_no_key_give_zero_and_finite_gradients():
    q, k, v, do = _inputs(1, 6, 4, 2, 1, 8)       # causal with Tq > Tk: rows 0, 1 see nothing
    o, lse = softmax_attention(q, k, v, causal=True, return_lse=True, backend="math")
    assert torch.equal(o[:, :2], torch.zeros_like(o[:, :2])) and torch.isinf(lse[..., :2]).all()
    o_ref, _ = naive_attention(q, k, v, 8 ** -0.5, True)
    assert rel_err(o, o_ref) < 1e-12
    grads = torch.autograd.grad((o, lse.masked_fill(lse.isinf(), 0)), (q, k, v), (do, torch.ones_like(lse)))
    assert all(torch.isfinite(g).all() for g in grads)


def test_auto_backend_on_cpu_is_math_and_keeps_dtype():
    q, k, v, _ = _inputs(1, 4, 4, 2, 2, 8, dtype=torch.bfloat16)
    assert pick_backend(None, q, documents=True, return_lse=True) == "math"
    assert softmax_attention(q, k, v).dtype == torch.bfloat16


def _qkv(Tq=4, Tk=4, Hq=2, Hkv=2, D=8):
    q, k, v, _ = _inputs(1, Tq, Tk, Hq, Hkv, D)
    return dict(q=q.detach(), k=k.detach(), v=v.detach())


BAD = [
    (dict(k=torch.randn(1, 4, 3, 8, dtype=torch.float64), v=torch.randn(1, 4, 3, 8, dtype=torch.float64)),
     ValueError, "multiple of the key/value heads"),
    (dict(v=torch.randn(1, 5, 2, 8, dtype=torch.float64)), ValueError, "k and v must have one shape"),
    (dict(k=torch.randn(1, 4, 2, 4, dtype=torch.float64), v=torch.randn(1, 4, 2, 4, dtype=torch.float64)),
     ValueError, "D=8 as in q"),
    (dict(q=torch.randn(1, 4, 2, 8)), TypeError, "share one dtype"),
    (dict(q=torch.randn(4, 2, 8, dtype=torch.float64)), ValueError, "q must have 4 dimensions"),
    (dict(cu_seqlens_q=torch.tensor([0, 4])), ValueError, "both cu_seqlens_q and cu_seqlens_k"),
    (dict(cu_seqlens_q=torch.tensor([0, 4]), cu_seqlens_k=torch.tensor([0, 2, 4])), ValueError,
     "same documents"),
    (dict(cu_seqlens_q=torch.tensor([0, 3]), cu_seqlens_k=torch.tensor([0, 4])), ValueError, "end at T=4"),
    (dict(cu_seqlens_q=torch.tensor([0, 4]), cu_seqlens_k=torch.tensor([0, 4]), backend="sdpa"), ValueError,
     "no document masks"),
    (dict(return_lse=True, backend="sdpa"), ValueError, "log-sum-exp"),
    (dict(backend="triton"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("change, error, match", BAD)
def test_bad_inputs_raise(change, error, match):
    args = {**_qkv(), **change}
    with pytest.raises(error, match=match):
        softmax_attention(**args)


@pytest.mark.skipif(flash_attn_available(), reason="flash-attn is installed")
def test_flash_attn_backend_needs_the_package():
    with pytest.raises(ValueError, match="flash-attn package"):
        softmax_attention(**_qkv(), backend="flash_attn")


@pytest.fixture
def many_flex_shapes(monkeypatch):
    """flex compiles per shape and mask kind: keep every variant of these tests compiled."""
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", 64)


def _gpu_backends():
    return ["sdpa", "flex"] + (["flash_attn"] if flash_attn_available() else [])


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_backends_match_fp32_math(causal, documents, D, many_flex_shapes):
    """bf16 on CUDA, GQA, a key block longer than the query block (as in LASP-2H)."""
    Tq, Tk = 384, 1000
    q, k, v, do = _inputs(1, Tq, Tk, 8, 2, D, dtype=torch.bfloat16, device="cuda")
    cu = {}
    if documents:
        cu = dict(cu_seqlens_q=torch.tensor([0, 0, 100, 384], dtype=torch.int32, device="cuda"),
                  cu_seqlens_k=torch.tensor([0, 300, 716, 1000], dtype=torch.int32, device="cuda"))
    o_ref = softmax_attention(q.float(), k.float(), v.float(), causal=causal, backend="math", **cu)
    want = torch.autograd.grad(o_ref, (q, k, v), do.float())
    for backend in _gpu_backends():
        if documents and backend == "sdpa":
            continue
        o = softmax_attention(q, k, v, causal=causal, backend=backend, **cu)
        assert rel_err(o, o_ref) < 1e-2, backend
        for a, b in zip(torch.autograd.grad(o, (q, k, v), do), want):
            assert rel_err(a, b) < 1e-2, backend


@pytest.mark.gpu
def test_gpu_flex_lse_matches_fp32_math(many_flex_shapes):
    q, k, v, _ = _inputs(1, 256, 640, 4, 1, 128, dtype=torch.bfloat16, device="cuda")
    _, lse = softmax_attention(q, k, v, return_lse=True, backend="flex")
    _, lse_ref = softmax_attention(q.float(), k.float(), v.float(), return_lse=True, backend="math")
    assert rel_err(lse, lse_ref) < 1e-2
