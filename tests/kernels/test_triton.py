"""The Triton backend against the torch oracle, outputs and every gradient.

CPU tier: the kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py) in float32
(fp16 once) against the float64 naive recurrence. Small chunks (16 tokens) and short
spans (2 chunks) keep the interpreter fast while exercising multi-chunk spans,
multi-span documents and partial last chunks; the production chunk size and span
length run too. Every kernel output starts as NaN (tests/conftest.py), so an element a kernel forgets fails.
`linear_attention_phases` runs phase by phase, as LASP-2 calls it, on both backends.

GPU tier (`gpu` marker): bf16 at real shapes against the fp32 oracle (float64 for the
strong-decay case), relative error ≤ 3e-3 for outputs and ≤ 5e-3 for every gradient, and
no host synchronisation.
"""

import contextlib

import pytest
import torch

import lasp.kernels.scalar.triton as tla
from lasp.kernels import linear_attention, linear_attention_phases, naive_linear_attention
from lasp.kernels.common import launch
from lasp.kernels.common.plan import make_span_plan
from lasp.kernels.common.scan import scan_spans
from lasp.kernels.scalar.chunk import chunk_linear_attention
from lasp.sync import no_host_sync
from tests.bf16_interpreter import bf16_interpreter
from tests.utils import grads, random_cu_seqlens, random_inputs, rel_err, run_twice

CPU = not torch.cuda.is_available()
cpu_only = pytest.mark.skipif(not CPU, reason="interpreter tier (CPU)")
FP32_TOL = 2e-5
GPU_OUT_TOL, GPU_GRAD_TOL = 3e-3, 5e-3  # the GPU tier's bounds (bf16 against the fp32 oracle)


def _check(B, T, H, K, V, decay="g", lengths=None, with_h0=True, final=True, dtype=torch.float32,
           tol=FP32_TOL, loss_on_output=True, device="cpu", oracle_dtype=torch.float64,
           out_tol=None, triton_context=contextlib.nullcontext, decay_grad=True, log_decay=None,
           tols=None, **kernel_kw):
    """Run triton and the oracle on the same fresh inputs; compare o, final state, grads.

    `triton_context` wraps the Triton forward and backward only (not the oracle).
    decay_grad=False: g is a fixed decay (no grad), which the kernels plan without dg.
    log_decay: g drawn around this value per token (±10%) instead of in (−2, 0).
    tols: bounds by name ("o", "dg", ...) that replace `tol` / `out_tol`.
    """
    cu = None if lengths is None else random_cu_seqlens(lengths, device)
    n = B if cu is None else len(lengths)
    q, k, v, g, _, h0 = random_inputs(B, T, H, K, V, decay=decay, dtype=dtype, device=device,
                                      n_states=n if with_h0 else None)
    if log_decay is not None:
        g = log_decay * (1 + 0.1 * torch.rand(B, T, H, device=device))
    # The contract's fp32 decay and state (random_inputs draws them in `dtype`).
    g, h0 = (None if x is None else x.detach().float().requires_grad_(True) for x in (g, h0))
    if g is not None and not decay_grad:
        g.requires_grad_(False)
    scale = K ** -0.5
    # Drawn in the kernel's dtype so that both sides see the same cotangent values.
    d_o = torch.randn(B, T, H, V, dtype=dtype, device=device).to(oracle_dtype) if loss_on_output else None
    d_s = torch.randn(n, H, K, V, dtype=oracle_dtype, device=device) if final else None
    inputs = [q, k, v, g if decay_grad else None, h0]

    def run():
        o, s = tla.triton_linear_attention(q, k, v, g, scale, h0, final, cu, **kernel_kw)
        return (o, s, *_grads([o if loss_on_output else None, s], inputs,
                              [None if d_o is None else d_o.to(o.dtype), None if d_s is None else d_s.float()]))
    names = [name for name, x in zip(("dq", "dk", "dv", "dg", "dh0"), inputs) if x is not None]
    if device == "cpu":
        with triton_context():
            o, s, *got = run()
    else:  # twice: the second run must be bitwise the first (`run_twice`)
        o, s, *got = run_twice(run, ["o", "final", *names], triton_context)
    assert o.dtype == q.dtype and o.shape == (B, T, H, V)
    assert (s is None) == (not final)

    ref_inputs = [None if x is None else x.detach().to(oracle_dtype).requires_grad_(True) for x in inputs]
    rq, rk, rv, rg, rh0 = ref_inputs
    if g is not None and not decay_grad:
        rg = g.to(oracle_dtype)
    o_ref, s_ref = naive_linear_attention(rq, rk, rv, rg, scale=scale, initial_state=rh0,
                                          output_final_state=final, cu_seqlens=cu) \
        if device == "cpu" else chunk_linear_attention(rq, rk, rv, rg, scale=scale, initial_state=rh0,
                                                       output_final_state=final, cu_seqlens=cu)
    errors = {"o": rel_err(o, o_ref)}
    if final:
        assert s.dtype == torch.float32 and s.shape == (n, H, K, V)
        errors["final"] = rel_err(s, s_ref)
    want = _grads([o_ref if loss_on_output else None, s_ref], ref_inputs, [d_o, d_s])
    for name, a, b in zip(names, got, want):
        # A gradient that is exactly zero (q when only the final state is used) must stay zero.
        errors[name] = rel_err(a, b) if b.any() else a.double().norm().item()
    bounds = {name: out_tol if out_tol is not None and name in ("o", "final") else tol for name in errors}
    bounds.update(tols or {})
    bad = {name: err for name, err in errors.items() if err > bounds[name]}
    assert not bad, f"relative errors above tolerance: {bad} (all: {errors})"
    return errors


def _grads(outputs, inputs, cotangents):
    """Like tests.utils.grads, with zeros for inputs the outputs do not depend on."""
    live = [x for x in inputs if x is not None]
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o is not None]
    got = torch.autograd.grad([o for o, _ in pairs], live, [c for _, c in pairs], allow_unused=True)
    return [torch.zeros_like(x) if d is None else d for x, d in zip(live, got)]


# ------------------------------------------------------------------ CPU tier (interpreter)

SMALL = dict(chunk_size=16, span_chunks=2)


@cpu_only
@pytest.mark.parametrize("decay", [None, "g"])
@pytest.mark.parametrize("T", [1, 15, 63, 65, 200])
def test_lengths_not_multiples_of_the_chunk(decay, T):
    _check(2, T, 1, 32, 32, decay, **SMALL)


@cpu_only
@pytest.mark.parametrize("decay", [None, "g"])
def test_packed_documents(decay):
    """Uneven lengths: length 1, empty, chunk- and span-boundary crossings."""
    lengths = [1, 17, 0, 40, 33, 64, 5, 31]
    _check(1, sum(lengths), 2, 16, 16, decay, lengths=lengths, **SMALL)


@cpu_only
@pytest.mark.parametrize("K, V", [(16, 16), (64, 64), (32, 48), (96, 96), (48, 24)])
def test_head_dims(K, V):
    _check(1, 70, 1, K, V, "g", **SMALL)


@cpu_only
def test_wide_heads_and_fp32_take_the_split_dkdv_path():
    """K = V = 256: the K×V state gradient does not fit one program, dk and dv split; so do
    fp32 inputs at K = V = 128, whose fused launch needs more shared memory than a Hopper
    GPU has (benchmarks/kernel_resources.py), while bf16 ones fuse."""
    def fused(D, dtype):
        x = torch.empty(1, 1, 1, D, dtype=dtype)
        return tla.triton_phases(x, x, x, None, 1.0, None, None)[0].fuse_dkdv
    assert (fused(256, torch.bfloat16), fused(128, torch.float32), fused(128, torch.bfloat16)) == (False, False, True)
    _check(1, 40, 1, 256, 256, None, **SMALL)


@cpu_only
@pytest.mark.parametrize("decay", [None, "g"])
def test_fused_and_split_dkdv_launches(decay):
    _check(2, 50, 2, 32, 48, decay, fuse_dkdv=False, **SMALL)
    _check(2, 50, 2, 32, 48, decay, fuse_dkdv=True, **SMALL)


@cpu_only
@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("decay", [None, "g"])
def test_every_tile_the_launch_table_may_choose(monkeypatch, block, decay):
    """Each kernel's `LAUNCH` row sets its tile: narrower and wider tiles than the defaults
    (several K- and V-tiles per program, a partial last tile at 96) stay exact."""
    for name in launch.LAUNCH:
        monkeypatch.setitem(launch.LAUNCH, name, launch.Launch(4, 2, block * 8 if name == "scan" else block))
    _check(1, 40, 1, 96, 96, decay, fuse_dkdv=False, **SMALL)
    _check(1, 40, 1, 96, 80, decay, fuse_dkdv=True, **SMALL)


@cpu_only
@pytest.mark.parametrize("decay", [None, "g"])
def test_production_chunk_size_and_span_lengths(decay):
    """64-token chunks over several spans, the default configuration, long spans."""
    _check(1, 300, 1, 64, 64, decay, chunk_size=64, span_chunks=2)
    _check(2, 150, 1, 32, 32, decay)
    _check(1, 300, 1, 16, 16, decay, chunk_size=16, span_chunks=16)


@cpu_only
@pytest.mark.parametrize("with_h0, final", [(False, False), (False, True), (True, False)])
def test_optional_states(with_h0, final):
    _check(2, 45, 2, 16, 16, "g", with_h0=with_h0, final=final, **SMALL)


@cpu_only
@pytest.mark.parametrize("decay", [None, "g"])
def test_gradient_only_through_final_state(decay):
    _check(1, 60, 2, 16, 16, decay, lengths=[25, 35], loss_on_output=False, **SMALL)


@cpu_only
@pytest.mark.parametrize("lengths", [None, [30, 1, 39]])
def test_fixed_decay_without_its_gradient(lengths):
    """g that does not require grad: planned without dg (no chunk states, no dg terms)."""
    _check(1 if lengths else 2, 70, 2, 32, 32, "g", lengths=lengths, decay_grad=False, **SMALL)
    q, k, v, g, _, _ = random_inputs(1, 40, 1, 16, 16, decay="g", dtype=torch.float32)
    phases, inputs = linear_attention_phases(q, k, v, g.detach(), backend="triton")
    final, saved = phases.summarize(*inputs[1:4], inputs[4])
    dq, partial = phases.grad_q(*inputs[:4], saved, torch.randn_like(v))
    with pytest.raises(RuntimeError, match="dg was asked for"):
        phases.grad_kvg(*inputs[:4], saved, partial, None, want_dg=True)


@cpu_only
def test_half_precision():
    """fp16 dot operands (bf16 dots are not emulated by the interpreter: GPU tier)."""
    _check(1, 100, 2, 32, 32, "g", dtype=torch.float16, tol=3e-3, **SMALL)


@cpu_only
@pytest.mark.parametrize("decay", [None, "g", "fixed g"])
def test_bf16_as_on_the_gpu(decay):
    """The GPU tier's bf16 bounds at a small shape, the interpreter computing bf16 as a
    GPU does (dg's terms never cancel, so its error stays below dq's and dk's)."""
    torch.manual_seed(0)
    _check(1, 2048, 2, 64, 64, decay and "g", lengths=[700, 1, 1347], dtype=torch.bfloat16,
           tol=GPU_GRAD_TOL, out_tol=GPU_OUT_TOL, triton_context=bf16_interpreter,
           decay_grad=decay != "fixed g")


@cpu_only
@pytest.mark.parametrize("dtype, fuse_dkdv", [(torch.float32, True), (torch.float32, False),
                                              (torch.bfloat16, True)])
def test_strong_decay_gradients(dtype, fuse_dkdv):
    """g ≈ −30 per token: dg is ~e^−30 times the other gradients, and the kernels' dg
    (chunk-local, no cancelling sums) keeps its relative accuracy against the float64
    oracle: packed documents, an initial state, d final_state, multi-chunk spans; the
    fused and the split dk/dv launches; bf16 as a GPU computes it. (A document-long sum
    of q·dq − k·dk gave relative errors of 1e7 in fp32 here.)"""
    torch.manual_seed(0)
    bf16 = dtype == torch.bfloat16
    _check(1, 110, 2, 16, 16, "g", lengths=[37, 1, 0, 72], dtype=dtype, log_decay=-30.0,
           tol=GPU_GRAD_TOL if bf16 else 1e-4, out_tol=GPU_OUT_TOL if bf16 else None,
           tols={"dg": GPU_GRAD_TOL if bf16 else 1e-3},
           triton_context=bf16_interpreter if bf16 else contextlib.nullcontext, fuse_dkdv=fuse_dkdv, **SMALL)


@cpu_only
def test_public_api_dispatches_here_with_fixed_decay():
    q, k, v, _, g_gamma, h0 = random_inputs(2, 40, 2, 16, 16, decay="g_gamma", dtype=torch.float32,
                                            n_states=2)
    o, s = linear_attention(q, k, v, g_gamma=g_gamma, initial_state=h0, output_final_state=True,
                            backend="triton")
    ref = [x.detach().double().requires_grad_(True) for x in (q, k, v, g_gamma, h0)]
    o_ref, s_ref = linear_attention(*ref[:3], g_gamma=ref[3], initial_state=ref[4],
                                    output_final_state=True, backend="torch")
    assert rel_err(o, o_ref) < FP32_TOL and rel_err(s, s_ref) < FP32_TOL
    d_o, d_s = torch.randn_like(o_ref), torch.randn_like(s_ref)
    for a, b in zip(grads([o, s], [q, k, v, g_gamma, h0], [d_o.float(), d_s.float()]),
                    grads([o_ref, s_ref], ref, [d_o, d_s])):
        assert rel_err(a, b) < FP32_TOL


@cpu_only
@pytest.mark.parametrize("lengths", [None, [0, 0]])
def test_no_tokens_pass_the_initial_state_through(lengths):
    q, k, v, g, _, h0 = random_inputs(1 if lengths else 2, 0, 2, 16, 16, decay="g",
                                      dtype=torch.float32, n_states=2)
    cu = None if lengths is None else random_cu_seqlens(lengths)
    o, s = tla.triton_linear_attention(q, k, v, g, 0.25, h0, True, cu)
    assert o.numel() == 0 and torch.equal(s, h0)
    d_s = torch.randn_like(s)
    assert torch.equal(torch.autograd.grad(s, h0, d_s)[0], d_s)


@cpu_only
@pytest.mark.parametrize("decay", [None, "g"])
def test_row_weight(decay):
    """o = w_t · o_t per token (MoM's routing weights), with w's gradient, also where a
    weight is 0 (its gradient <do_t, o_t> is not 0)."""
    lengths = [20, 1, 39]
    cu = random_cu_seqlens(lengths)
    q, k, v, g, _, h0 = random_inputs(1, 60, 2, 16, 16, decay=decay, dtype=torch.float32, n_states=3)
    g = None if g is None else g.detach().requires_grad_(True)
    w = torch.rand(60).requires_grad_(True)
    with torch.no_grad():
        w[7] = 0.0
    inputs = [x for x in (q, k, v, g, h0, w) if x is not None]
    o, s = tla.triton_linear_attention(q, k, v, g, 0.25, h0, True, cu, row_weight=w, **SMALL)
    ref = [x.detach().double().requires_grad_(True) for x in inputs]
    rq, rk, rv, *rest = ref
    rg = rest.pop(0) if g is not None else None
    rh0, rw = rest
    o_ref, s_ref = naive_linear_attention(rq, rk, rv, rg, scale=0.25, initial_state=rh0,
                                          output_final_state=True, cu_seqlens=cu)
    o_ref = o_ref * rw[None, :, None, None]
    assert rel_err(o, o_ref) < FP32_TOL and rel_err(s, s_ref) < FP32_TOL
    d_o, d_s = torch.randn_like(o_ref), torch.randn_like(s_ref)
    got = grads([o, s], inputs, [d_o.float(), d_s.float()])
    want = grads([o_ref, s_ref], ref, [d_o, d_s])
    assert want[-1][7] != 0
    for a, b in zip(got, want):
        assert rel_err(a, b) < FP32_TOL


@cpu_only
def test_strong_decay_does_not_overflow():
    """Log-decays near -30 per token: the masked exp must not produce inf or NaN."""
    q, k, v, _, _, _ = random_inputs(1, 64, 1, 16, 16, dtype=torch.float32, requires_grad=False)
    g = torch.full((1, 64, 1), -30.0)
    o, s = tla.triton_linear_attention(q, k, v, g, 0.25, None, True, None, chunk_size=16, span_chunks=2)
    o_ref, s_ref = naive_linear_attention(q.double(), k.double(), v.double(), g.double(), scale=0.25,
                                          output_final_state=True)
    assert rel_err(o, o_ref) < FP32_TOL and rel_err(s, s_ref) < FP32_TOL


@cpu_only
@pytest.mark.parametrize("backend, dtype, tol", [("triton", torch.float32, FP32_TOL),
                                                 ("torch", torch.float64, 1e-12)])
@pytest.mark.parametrize("decay, lengths", [(None, None), ("g", [1, 130, 0, 40, 129]), ("g_gamma", None)])
def test_phases_one_by_one(backend, dtype, tol, decay, lengths):
    """`linear_attention_phases` as LASP-2 calls it, d final_state given only after grad_q:
    final states, outputs, and the gradients of q, k, v, g (or g_gamma) and the initial
    state (chained through the phases' input conversions) against the naive oracle.
    T = 300 covers three default (128-token) kernel spans."""
    B, T, H, K, V = (1 if lengths else 2), 300, 1, 16, 32
    cu = None if lengths is None else random_cu_seqlens(lengths)
    n = B if cu is None else len(lengths)
    q, k, v, g, g_gamma, h0 = random_inputs(B, T, H, K, V, decay=decay, dtype=dtype, n_states=n)
    names = [name for name, x in zip(("q", "k", "v", "g", "g_gamma", "h0"), (q, k, v, g, g_gamma, h0))
             if x is not None]
    originals = [x for x in (q, k, v, g, g_gamma, h0) if x is not None]
    phases, inputs = linear_attention_phases(q, k, v, g, g_gamma, initial_state=h0, cu_seqlens=cu,
                                             backend=backend)
    pq, pk, pv, pg, ph0 = inputs
    final, saved = phases.summarize(pk, pv, pg, ph0)
    o = phases.output(pq, pk, pv, pg, saved)
    do = torch.randn(B, T, H, V, dtype=dtype)
    dq, partial = phases.grad_q(pq, pk, pv, pg, saved, do)
    d_final = torch.randn_like(final)
    dk, dv, dg, dh0 = phases.grad_kvg(pq, pk, pv, pg, saved, partial, d_final)
    got = torch.autograd.grad([x for x in inputs if x is not None], originals,
                              [x for x in (dq, dk, dv, dg, dh0) if x is not None])

    ref = dict(zip(names, (x.detach().double().requires_grad_() for x in originals)))
    gate = ref["g_gamma"][None, None, :].expand(B, T, H) if decay == "g_gamma" else ref.get("g")
    o_ref, final_ref = naive_linear_attention(ref["q"], ref["k"], ref["v"], gate, scale=K ** -0.5,
                                              initial_state=ref["h0"], output_final_state=True,
                                              cu_seqlens=cu)
    want = torch.autograd.grad([o_ref, final_ref], list(ref.values()), [do.double(), d_final.double()])
    errors = {"o": rel_err(o, o_ref), "final": rel_err(final, final_ref)}
    errors.update({f"d{name}": rel_err(a, b) for name, a, b in zip(names, got, want)})
    # d g_gamma is one number per head, a sum of ±terms over every token: in fp32 its
    # relative error is that of the terms times the cancellation (seen up to 2e-4 here).
    bounds = {name: (1e-3 if name == "dg_gamma" and dtype == torch.float32 else tol) for name in errors}
    assert all(errors[name] <= bounds[name] for name in errors), errors


@cpu_only
@pytest.mark.parametrize("decay", ["none", "scalar", "per_key"])
@pytest.mark.parametrize("lengths", [None, [40, 0, 1, 75]])
def test_span_scan(decay, lengths):
    """`scan_spans` forward and reverse against a torch loop over each document's spans:
    no decay, one log-decay per span and head [NS, H], one per key [NS, H, K] (row k of
    the state scaled by exp(G[k])). Spans the table leaves unused stay untouched."""
    B, T, H, K, V = (1 if lengths else 2), 116, 2, 16, 24
    gen = torch.Generator().manual_seed(3)
    cu = None if lengths is None else random_cu_seqlens(lengths)
    x = torch.empty(B, T, H, K)
    plan = make_span_plan(x, torch.empty(B, T, H, V), cu, 16, 2)
    spans = ([range(n * plan.spans_per_row, (n + 1) * plan.spans_per_row) for n in range(B)] if cu is None
             else [range(a, b) for a, b in zip(plan.doc_spans[:-1].tolist(), plan.doc_spans[1:].tolist())])
    G = {"none": None, "scalar": -torch.rand(plan.n_spans, H, generator=gen),
         "per_key": -torch.rand(plan.n_spans, H, K, generator=gen)}[decay]
    for reverse in (False, True):
        U = torch.randn(plan.n_spans, H, K, V, generator=gen)
        init = torch.randn(plan.n_docs, H, K, V, generator=gen)
        want, want_out = U.clone(), torch.empty_like(init)
        for n, doc in enumerate(spans):
            carried = init[n]
            for s in (reversed(doc) if reverse else doc):
                want[s] = carried
                decay_s = 1.0 if G is None else G[s].exp().reshape(H, -1, 1)
                carried = decay_s * carried + U[s]
            want_out[n] = carried
        out = torch.full_like(init, float("nan"))
        scan_spans(U, G, init, out, plan, reverse=reverse)
        assert rel_err(U, want) < 1e-6 and rel_err(out, want_out) < 1e-6


# ------------------------------------------------------------------ GPU tier



@pytest.mark.gpu
@pytest.mark.parametrize("decay", [None, "g", "fixed g"])
@pytest.mark.parametrize("B, T, H, D, lengths", [
    (1, 4096, 4, 128, [1000, 1, 2047, 1048]),
    (2, 2048, 8, 128, None),
    (1, 8192, 16, 64, [8192]),
    (2, 1000, 4, 96, None),
])
def test_gpu_bf16(decay, B, T, H, D, lengths):
    torch.manual_seed(0)
    _check(B, T, H, D, D, decay and "g", lengths=lengths, dtype=torch.bfloat16, tol=GPU_GRAD_TOL,
           out_tol=GPU_OUT_TOL, device="cuda", oracle_dtype=torch.float32,
           triton_context=no_host_sync, decay_grad=decay != "fixed g")


@pytest.mark.gpu
def test_gpu_bf16_strong_decay():
    """g ≈ −30 per token at a real shape, packed, in bf16 against the float64 chunk form:
    every gradient, dg included (~e^−30 times the others), within the GPU tier's bounds."""
    torch.manual_seed(0)
    _check(1, 4096, 4, 128, 128, "g", lengths=[1000, 1, 2047, 1048], dtype=torch.bfloat16, log_decay=-30.0,
           tol=GPU_GRAD_TOL, out_tol=GPU_OUT_TOL, device="cuda", triton_context=no_host_sync)


@pytest.mark.gpu
@pytest.mark.parametrize("decay", [None, "g"])
def test_gpu_bf16_long_spans(decay):
    # 4096-token spans (the longest, the default at long T) and dg's sums over 32K tokens.
    torch.manual_seed(0)
    _check(1, 32768, 4, 128, 128, decay, dtype=torch.bfloat16, tol=GPU_GRAD_TOL, out_tol=GPU_OUT_TOL,
           device="cuda", oracle_dtype=torch.float32, triton_context=no_host_sync, span_chunks=64)
