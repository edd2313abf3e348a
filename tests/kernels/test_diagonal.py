"""GLA's per-key decay `gk`: the chunk form against the token loop, the Triton kernels
(interpreter, fp32, NaN-poisoned outputs) against the chunk form, every gradient by name.

Small chunks (16 tokens) and spans of 2 chunks keep the interpreter fast while covering
multi-chunk spans, multi-span documents and partial last chunks.
"""

import pytest
import torch
import torch.nn.functional as F

import lasp.kernels.diagonal.triton as dtri
from lasp.kernels import linear_attention, linear_attention_phases
from lasp.kernels.common.launch import chunk_for_head_dims
from lasp.kernels.diagonal import chunk_linear_attention
from lasp.kernels.naive import naive_linear_attention
from tests.bf16_interpreter import bf16_interpreter
from tests.utils import random_cu_seqlens, rel_err

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tier (CPU)")
SMALL = dict(chunk_size=16, span_chunks=2)
NAMES = ("dq", "dk", "dv", "dgk", "dh0")


def _inputs(B, T, H, K, V, *, n_states, dtype, strong=False, seed=0):
    """q, k, v, gk (fp32, or float64 for float64), h0 (or None): fresh, all requiring grad.
    `strong`: some key dims decay by e^-30 per token over a stretch."""
    gen = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v = (torch.randn(B, T, H, d, generator=gen).to(dtype) for d in (K, K, V))
    gk = F.logsigmoid(torch.randn(B, T, H, K, generator=gen) + 2.0).to(acc)
    if strong:
        gk[:, T // 4: T // 2, :, : K // 3] = -30.0
    h0 = None if n_states is None else torch.randn(n_states, H, K, V, generator=gen).to(acc)
    leaves = [q, k, v, gk, h0]
    return [None if x is None else x.requires_grad_() for x in leaves]


def _grads(outputs, leaves, cotangents):
    live = [x for x in leaves if x is not None]
    return torch.autograd.grad(outputs, live, cotangents)


def _check(B, T, H, K, V, *, lengths=None, with_h0=True, strong=False, dtype=torch.float32, tol=2e-5,
           out_tol=None, context=None, **kernel_kw):
    """Triton vs the float64 chunk form on the same inputs: o, final state, every gradient."""
    cu = None if lengths is None else random_cu_seqlens(lengths)
    n = B if cu is None else len(lengths)
    leaves = _inputs(B, T, H, K, V, n_states=n if with_h0 else None, dtype=dtype, strong=strong)
    q, k, v, gk, h0 = leaves
    scale = K ** -0.5
    gen = torch.Generator().manual_seed(1)
    d_o = torch.randn(B, T, H, V, generator=gen).to(dtype)
    d_s = torch.randn(n, H, K, V, generator=gen)
    if context is None:
        o, s = dtri.triton_linear_attention(q, k, v, gk, scale, h0, True, cu, **kernel_kw)
        got = _grads([o, s], leaves, [d_o, d_s])
    else:
        with context():
            o, s = dtri.triton_linear_attention(q, k, v, gk, scale, h0, True, cu, **kernel_kw)
            got = _grads([o, s], leaves, [d_o, d_s])
    ref = [None if x is None else x.detach().double().requires_grad_() for x in leaves]
    o_ref, s_ref = chunk_linear_attention(*ref[:4], scale=scale, initial_state=ref[4], output_final_state=True,
                                          cu_seqlens=cu)
    want = _grads([o_ref, s_ref], ref, [d_o.double(), d_s.double()])
    assert o.dtype == q.dtype and s.dtype == torch.float32 and s.shape == (n, H, K, V)
    errors = {"o": rel_err(o, o_ref), "final": rel_err(s, s_ref)}
    errors.update({name: rel_err(a, b) for name, a, b in zip(NAMES, got, want)})
    bad = {name: e for name, e in errors.items() if e > (out_tol if out_tol and name in ("o", "final") else tol)}
    assert not bad, f"relative errors above tolerance: {bad} (all: {errors})"
    return errors


# ------------------------------------------------------------------ torch chunk form


@pytest.mark.parametrize("lengths", [None, [1, 23, 0, 40]], ids=["rows", "packed"])
def test_chunk_form_matches_token_loop_float64(lengths):
    """Strong decay in places, partial chunks, empty and length-1 documents, h0 and final."""
    cu = None if lengths is None else random_cu_seqlens(lengths)
    B, T = (2, 45) if cu is None else (1, sum(lengths))
    n = B if cu is None else len(lengths)
    leaves = _inputs(B, T, 2, 8, 6, n_states=n, dtype=torch.float64, strong=True)
    kw = dict(scale=0.4, initial_state=leaves[4], output_final_state=True, cu_seqlens=cu)
    o_ref, s_ref = naive_linear_attention(*leaves[:3], gk=leaves[3], **kw)
    o, s = chunk_linear_attention(*leaves[:4], chunk_size=32, **kw)
    assert rel_err(o, o_ref) < 1e-12 and rel_err(s, s_ref) < 1e-12
    gen = torch.Generator().manual_seed(2)
    cot = [torch.randn(o.shape, generator=gen, dtype=torch.float64), torch.randn(s.shape, generator=gen, dtype=torch.float64)]
    for name, a, b in zip(NAMES, _grads([o, s], leaves, cot), _grads([o_ref, s_ref], leaves, cot)):
        assert rel_err(a, b) < 1e-12, name


# ------------------------------------------------------------------ Triton (interpreter)


@cpu_only
@pytest.mark.parametrize("T", [15, 77])
def test_triton_matches_chunk_form(T):
    """K ≠ V, lengths not multiples of the chunk, several spans per row."""
    _check(2, T, 2, 32, 16, **SMALL)


@cpu_only
def test_triton_packed_documents():
    """Length 1, empty, chunk- and span-boundary crossings."""
    lengths = [1, 17, 0, 40, 33, 5]
    _check(1, sum(lengths), 2, 16, 16, lengths=lengths, **SMALL)


@cpu_only
@pytest.mark.parametrize("exact_everywhere", [False, True], ids=["mixed", "exact"])
def test_triton_strong_decay(monkeypatch, exact_everywhere):
    """gk = −30 over a stretch: those chunks take the elementwise path, finite and exact.
    `exact`: every chunk takes it (the fast path's bound set below any decay)."""
    if exact_everywhere:
        monkeypatch.setattr(dtri, "FACTORED_LOG_DECAY", -1.0)
    _check(1, 64, 2, 16, 16, lengths=[40, 24], strong=True, **SMALL)


@cpu_only
@pytest.mark.parametrize("K, V, fuse", [(48, 48, True), (16, 80, False)])
def test_triton_head_dims(K, V, fuse):
    """Non-power-of-two head dims; the split dk/dv launches (K-tiles for dk, V-tiles for dv),
    which the family takes by default (`common.launch.FUSED_DKDV_MAX_ELEMENTS`); the fused
    one stays a knob."""
    x = torch.empty(1, 1, 1, 64, dtype=torch.bfloat16)
    assert not dtri.triton_phases(x, x, x, x, 1.0, None, None)[0].fuse_dkdv
    _check(1, 40, 1, K, V, fuse_dkdv=fuse, **SMALL)


@cpu_only
@pytest.mark.parametrize("chunk_size", [64, chunk_for_head_dims("diagonal", 128, 128)], ids=["64", "default"])
def test_triton_production_chunk_size(chunk_size):
    """The chunk the family takes by default (`common.launch.FAMILY_CHUNK`) and 64."""
    _check(1, 150, 1, 32, 32, with_h0=False, chunk_size=chunk_size, span_chunks=2)


@cpu_only
def test_triton_bf16_as_on_the_gpu():
    """The GPU tier's bf16 bounds at a small shape (the interpreter rounding as a GPU):
    chunk-local dgk keeps bf16 rounding from being amplified by long sums."""
    errors = _check(1, 512, 2, 32, 32, lengths=[300, 1, 211], dtype=torch.bfloat16, tol=5e-3, out_tol=3e-3,
                    context=bf16_interpreter, chunk_size=64, span_chunks=2)
    print(errors)


@cpu_only
def test_phases_as_lasp2_drives_them():
    """summarize | output | grad_q | grad_kvg, Triton against the torch phases, with a
    final-state gradient; gk without grad gives no dgk and refuses to make one."""
    leaves = _inputs(1, 50, 2, 16, 16, n_states=2, dtype=torch.float32)
    cu = random_cu_seqlens([21, 29])
    do = torch.randn(1, 50, 2, 16)
    d_final = torch.randn(2, 2, 16, 16)
    results = []
    for backend in ("triton", "torch"):
        args = [x.detach() if backend == "triton" else x.detach().double() for x in leaves]
        args[3].requires_grad_()
        phases, inputs = linear_attention_phases(*args[:3], gk=args[3], initial_state=args[4], cu_seqlens=cu,
                                                 backend=backend)
        final, saved = phases.summarize(*inputs[1:4], inputs[4])
        o = phases.output(*inputs[:4], saved)
        dq, partial = phases.grad_q(*inputs[:4], saved, do.to(o.dtype))
        rest = phases.grad_kvg(*inputs[:4], saved, partial, d_final.to(final.dtype))
        results.append((o, final, dq, *rest))
    for name, a, b in zip(("o", "final", *NAMES), *results):
        assert rel_err(a, b) < 2e-5, name

    phases, inputs = dtri.triton_phases(*(x.detach() for x in leaves[:4]), 0.25, None, None)
    final, saved = phases.summarize(*inputs[1:4], None)
    dq, partial = phases.grad_q(*inputs[:4], saved, do)
    assert phases.grad_kvg(*inputs[:4], saved, partial, None, want_dg=False, want_dh0=False)[2] is None
    with pytest.raises(RuntimeError, match="dgk was asked for"):
        phases.grad_kvg(*inputs[:4], saved, partial, None, want_dg=True)


@cpu_only
def test_public_op_routes_gk():
    q, k, v, gk, h0 = (x.detach() for x in _inputs(2, 30, 2, 16, 16, n_states=2, dtype=torch.float32))
    o, s = linear_attention(q, k, v, gk=gk, initial_state=h0, output_final_state=True, backend="triton")
    o_ref, s_ref = linear_attention(q, k, v, gk=gk, initial_state=h0, output_final_state=True, backend="torch")
    assert rel_err(o, o_ref) < 2e-5 and rel_err(s, s_ref) < 2e-5
