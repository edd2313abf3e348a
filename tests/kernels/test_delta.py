"""The delta rule (DeltaNet, Gated DeltaNet, KDA): the chunk form against the token loop
in float64, each document's dense transition against the product of its tokens', the
Triton path (interpreter, fp32, NaN-poisoned outputs; bf16 in both walk-operand modes)
against the chunk form, and the affine run (LASP-2's phases) against a run from an
initial state; every gradient by name (dq dk dv dbeta dg/dgk dh0).

Keys are L2-normalised and β = sigmoid(·), as the layers feed them: with raw keys the
recurrence itself is unstable (I − β k kᵀ has eigenvalues 1 − β|k|²).
"""

import pytest
import torch
import torch.nn.functional as F

import lasp.kernels.delta.triton as dtri
from lasp.kernels.common import launch
from lasp.kernels.delta import chunk_linear_attention, run_transitions
from lasp.kernels.naive import naive_linear_attention
from tests.bf16_interpreter import bf16_interpreter
from tests.utils import random_cu_seqlens, rel_err

DECAYS = (None, "g", "gk")
NAMES = ("dq", "dk", "dv", "dbeta", "ddecay", "dh0")
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tier (CPU)")


def _inputs(B, T, H, K, V, decay, *, n_states, dtype, strong=False, seed=0):
    """q, k (unit rows), v, beta, the decay (or None), h0 (or None): fresh leaves that
    require grad. `strong`: a stretch of tokens decays by e^-30 per token (all of g; a
    third of the key dims of gk)."""
    gen = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v = (torch.randn(B, T, H, d, generator=gen, dtype=acc) for d in (K, K, V))
    k = F.normalize(k, dim=-1)
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen, dtype=acc))
    g = None
    if decay is not None:
        g = F.logsigmoid(torch.randn(B, T, H, *((K,) if decay == "gk" else ()), generator=gen, dtype=acc) + 2.0)
        if strong and decay == "g":
            g[:, T // 4: T // 2] = -30.0
        elif strong:
            g[:, T // 4: T // 2, :, : K // 3] = -30.0
    h0 = None if n_states is None else torch.randn(n_states, H, K, V, generator=gen, dtype=acc)
    leaves = [q.to(dtype), k.to(dtype), v.to(dtype), beta, g, h0]
    return [None if x is None else x.requires_grad_() for x in leaves]


def _grads(outputs, leaves, cotangents):
    live = [x for x in leaves if x is not None]
    return torch.autograd.grad(outputs, live, cotangents)


def _names(leaves):
    return [name for name, x in zip(NAMES, leaves) if x is not None]


def _naive(q, k, v, beta, g, h0, *, decay, **kw):
    decay_kw = {} if decay is None else {decay: g}
    g_arg = decay_kw.pop("g", None)
    return naive_linear_attention(q, k, v, g_arg, beta=beta, initial_state=h0, **decay_kw, **kw)


# ------------------------------------------------------------------ torch chunk form


@pytest.mark.parametrize("lengths", [None, [1, 40, 0, 23]], ids=["rows", "packed"])
@pytest.mark.parametrize("decay", DECAYS, ids=["delta", "g", "gk"])
def test_chunk_form_matches_token_loop_float64(decay, lengths):
    """Outputs, final states and every gradient; partial chunks, empty and length-1
    documents, h0, strong decay (chunks of 32: several halving levels of the per-key scores)."""
    cu = None if lengths is None else random_cu_seqlens(lengths)
    B, T = (2, 45) if cu is None else (1, sum(lengths))
    n = B if cu is None else len(lengths)
    leaves = _inputs(B, T, 2, 8, 6, decay, n_states=n, dtype=torch.float64, strong=True)
    q, k, v, beta, g, h0 = leaves
    kw = dict(scale=0.4, output_final_state=True, cu_seqlens=cu)
    o_ref, s_ref = _naive(q, k, v, beta, g, h0, decay=decay, **kw)
    o, s = chunk_linear_attention(q, k, v, g, beta, initial_state=h0, chunk_size=32, **kw)
    assert rel_err(o, o_ref) < 1e-12 and rel_err(s, s_ref) < 1e-12
    gen = torch.Generator().manual_seed(2)
    cot = [torch.randn(o.shape, generator=gen, dtype=torch.float64),
           torch.randn(s.shape, generator=gen, dtype=torch.float64)]
    for name, a, b in zip(_names(leaves), _grads([o, s], leaves, cot), _grads([o_ref, s_ref], leaves, cot)):
        assert rel_err(a, b) < 1e-11, name


def _token_product(k, g, beta, decay, cu):
    """Π_t (I − β_t k_t k_tᵀ) A_t per packed document, token by token (float64)."""
    K = k.shape[-1]
    edges = cu.tolist()
    bounds = [(0, s, e) for s, e in zip(edges[:-1], edges[1:])]
    out = []
    for b, start, end in bounds:
        m = torch.eye(K, dtype=k.dtype).expand(k.shape[2], K, K)
        for t in range(start, end):
            if decay == "g":
                m = g[b, t].exp()[:, None, None] * m
            elif decay == "gk":
                m = g[b, t].exp()[:, :, None] * m
            kt = k[b, t]
            m = m - beta[b, t][:, None, None] * kt[:, :, None] * (kt[:, None, :] @ m)
        out.append(m)
    return torch.stack(out)


@pytest.mark.parametrize("decay", DECAYS, ids=["delta", "g", "gk"])
def test_run_transitions_match_token_product(decay):
    """Dense transitions of packed documents (length 1, empty, several chunks), and their
    gradients in k, beta and the decay."""
    lengths = [1, 37, 0, 20]
    cu = random_cu_seqlens(lengths)
    _, k, _, beta, g, _ = _inputs(1, sum(lengths), 2, 8, 4, decay, n_states=None, dtype=torch.float64, strong=True)
    m = run_transitions(k, g, beta, cu_seqlens=cu, chunk_size=16)
    m_ref = _token_product(k, g, beta, decay, cu)
    assert m.shape == (4, 2, 8, 8) and rel_err(m, m_ref) < 1e-12
    cot = torch.randn_like(m)
    leaves = [k, beta, g]
    want = _grads([m_ref], leaves, [cot])
    for a, b in zip(_grads([m], leaves, [cot]), want):
        assert rel_err(a, b) < 1e-11
    if torch.cuda.is_available():
        return
    # The Triton state pass (interpreter, fp32) walking from the identity.
    fp32 = [None if x is None else x.detach().float().requires_grad_() for x in leaves]
    m32 = dtri.run_transitions(fp32[0], fp32[2], fp32[1], cu_seqlens=cu, chunk_size=16)
    assert m32.dtype == torch.float32 and rel_err(m32, m_ref) < 2e-5
    for a, b in zip(_grads([m32], fp32, [cot.float()]), want):
        assert rel_err(a, b) < 2e-5


# ------------------------------------------------------------------ Triton (interpreter)


def _check_triton(decay, B, T, H, K, V, *, lengths=None, with_h0=True, strong=False, tol=2e-5, chunk_size=16):
    """The Triton path (fp32) vs the float64 chunk form on the same inputs: o, final
    state, every gradient by name."""
    cu = None if lengths is None else random_cu_seqlens(lengths)
    n = B if cu is None else len(lengths)
    leaves = _inputs(B, T, H, K, V, decay, n_states=n if with_h0 else None, dtype=torch.float32, strong=strong)
    q, k, v, beta, g, h0 = leaves
    gen = torch.Generator().manual_seed(1)
    d_o, d_s = torch.randn(B, T, H, V, generator=gen), torch.randn(n, H, K, V, generator=gen)
    kw = dict(scale=K ** -0.5, output_final_state=True, cu_seqlens=cu)
    o, s = dtri.triton_linear_attention(q, k, v, g, beta, initial_state=h0, chunk_size=chunk_size, **kw)
    got = _grads([o, s], leaves, [d_o, d_s])
    ref = [None if x is None else x.detach().double().requires_grad_() for x in leaves]
    o_ref, s_ref = chunk_linear_attention(*ref[:3], ref[4], ref[3], initial_state=ref[5], **kw)
    want = _grads([o_ref, s_ref], ref, [d_o.double(), d_s.double()])
    assert o.dtype == q.dtype and s.dtype == torch.float32 and s.shape == (n, H, K, V)
    errors = {"o": rel_err(o, o_ref), "final": rel_err(s, s_ref)}
    errors.update({name: rel_err(a, b) for name, a, b in zip(_names(leaves), got, want)})
    bad = {name: e for name, e in errors.items() if e > tol}
    assert not bad, f"relative errors above tolerance: {bad} (all: {errors})"


@cpu_only
@pytest.mark.parametrize("decay", DECAYS, ids=["delta", "g", "gk"])
def test_triton_matches_chunk_form(monkeypatch, decay):
    """Unpacked rows without h0 (chunks of 32: one halving level of gk's scores); head
    dims that are not powers of two (masked tiles); packed documents (length 1, empty,
    several chunks, partial last chunks, trailing unused chunk slots), h0, strong decay
    (for gk e^-30 per token on a third of the key dims: e^{−Γ} would overflow), K ≠ V,
    two V-tiles in every kernel, three K-tiles, the last one partial, in the key gradient's
    (16-wide tiles) and two in the UT transform's gradient (32-wide: its K-tiles need not
    be the key gradient's)."""
    _check_triton(decay, 2, 45, 1, 32, 16, with_h0=False, chunk_size=32)
    _check_triton(decay, 1, 20, 1, 48, 24)
    for row in ("delta.state", "delta.state_grad", "delta.wy", "delta.output", "delta.output_grad",
                "delta.key_grad", "delta.key_grad_per_key"):
        monkeypatch.setitem(launch.LAUNCH, row, launch.Launch(4, 2, 16))
    for row in ("delta.wy_grad", "delta.wy_grad_per_key"):
        monkeypatch.setitem(launch.LAUNCH, row, launch.Launch(4, 2, 32))
    lengths = [1, 40, 0, 23]
    _check_triton(decay, 1, sum(lengths), 2, 40, 32, lengths=lengths, strong=True)


@cpu_only
@pytest.mark.parametrize("decay", DECAYS, ids=["delta", "g", "gk"])
def test_triton_default_chunk(decay):
    """Chunks of 64 (the default): four 16×16 diagonal blocks of the UT transform and two
    product levels below them (for gk also two halving levels of the per-key scores), a
    strong decay across blocks and levels, a partial last chunk. Chunks under 16 tokens
    are refused."""
    _check_triton(decay, 1, 100, 1, 16, 16, strong=True, chunk_size=64)
    _, k, _, beta, g, _ = _inputs(1, 8, 1, 16, 16, decay, n_states=None, dtype=torch.float32)
    with pytest.raises(ValueError, match="chunk_size"):
        dtri.run_transitions(k, g, beta, chunk_size=8)


@cpu_only
def test_phases_as_lasp2_drives_them():
    """summarize | output | grad_q | grad_kvg with a final-state gradient, Triton against
    the torch phases (Gated DeltaNet, packed): the decay argument is the pair (g, beta)."""
    from lasp.kernels.delta.chunk import phases as torch_phases

    cu = random_cu_seqlens([21, 29])
    leaves = _inputs(1, 50, 2, 16, 16, "g", n_states=2, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    do, d_final = torch.randn(1, 50, 2, 16, generator=gen), torch.randn(2, 2, 16, 16, generator=gen)
    results = []
    for make, dtype in ((dtri.phases, torch.float32), (torch_phases, torch.float64)):
        q, k, v, beta, g, h0 = (x.detach().to(dtype) for x in leaves)
        phases, inputs = make(q, k, v, g, beta, scale=0.3, initial_state=h0, cu_seqlens=cu)
        final, saved = phases.summarize(*inputs[1:4], inputs[4])
        o = phases.output(*inputs[:4], saved)
        dq, partial = phases.grad_q(*inputs[:4], saved, do.to(dtype))
        dk, dv, (dg, dbeta), dh0 = phases.grad_kvg(*inputs[:4], saved, partial, d_final.to(dtype))
        results.append((o, final, dq, dk, dv, dbeta, dg, dh0))
    for name, a, b in zip(("o", "final", "dq", "dk", "dv", "dbeta", "dg", "dh0"), *results):
        assert rel_err(a, b) < 2e-5, name
    with pytest.raises(ValueError, match="causal"):
        dtri.phases(*leaves[:3], leaves[4], leaves[3], scale=0.3, causal=False)


@pytest.mark.parametrize("backend, decay", [("torch", None), ("torch", "g"), ("torch", "gk"), ("triton", "g"),
                                            ("triton", "gk")])
def test_affine_phases_match_a_run_from_an_initial_state(backend, decay):
    """The affine run (`affine_phases`: one run over the values widened by K identity
    columns) against the run from random initial states S, packed documents with an empty
    and a length-1 one: o = o0 + x S (each token its document's S) and final = U + M S, and
    the phases' gradients of q, k, v, beta and the decay, given do, dx = do Sᵀ, dU = d final
    and dM = d final Sᵀ, equal the run's. torch in float64; Triton in fp32 (outputs
    NaN-poisoned), under the interpreter on CPU, on the GPU where there is one (TF32
    products there: the GPU tier's fp32 bound)."""
    from lasp.kernels.delta.chunk import affine_phases as torch_affine_phases
    lengths, H, K, V = [19, 1, 0, 30], 2, 16, 16      # GPU dots need every dim >= 16
    dtype = torch.float64 if backend == "torch" else torch.float32
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    cu = random_cu_seqlens(lengths, device)
    q, k, v, beta, g, S = (None if x is None else x.detach().to(device) for x in
                           _inputs(1, sum(lengths), H, K, V, decay, n_states=len(lengths), dtype=dtype))
    gen = torch.Generator().manual_seed(5)
    do = torch.randn(v.shape, generator=gen, dtype=dtype).to(device)
    d_final = torch.randn(S.shape, generator=gen, dtype=dtype).to(device)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)  # each token's doc
    leaves = [x.requires_grad_() for x in (q, k, v, beta, g) if x is not None]
    o_ref, final_ref = (chunk_linear_attention if backend == "torch" else dtri.triton_linear_attention)(
        q, k, v, g, beta, scale=0.3, initial_state=S, output_final_state=True, cu_seqlens=cu)
    want = torch.autograd.grad([o_ref, final_ref], leaves, [do, d_final])

    make = torch_affine_phases if backend == "torch" else dtri.affine_phases
    phases, inputs = make(q, k, v, g, beta, scale=0.3, cu_seqlens=cu)
    with torch.no_grad():
        (U, M), saved = phases.summarize(*inputs[1:])
        o0, x = phases.output(*inputs, saved)
        o = o0 + torch.einsum("bthk,bthkv->bthv", x, S[doc][None])
        partial = phases.output_grad(*inputs, saved, do, torch.einsum("bthv,bthkv->bthk", do, S[doc][None]))
        got = phases.grad(*inputs, saved, partial, d_final, d_final @ S.transpose(-1, -2))
    tol = 1e-12 if backend == "torch" else (3e-3 if device == "cuda" else 2e-5)
    assert rel_err(o, o_ref) <= tol and rel_err(U + M @ S, final_ref) <= tol
    got = [x for x in got if x is not None]
    for name, mine, ref in zip(("dq", "dk", "dv", "ddecay", "dbeta") if g is not None else ("dq", "dk", "dv", "dbeta"),
                               got, (want[0], want[1], want[2], *want[4:], want[3])):
        assert rel_err(mine, ref) <= tol, name


@cpu_only
@pytest.mark.parametrize("walk_operands", ["bfloat16", "float32"])
@pytest.mark.parametrize("decay", ["g", "gk"])
def test_triton_bf16_walk_operands(monkeypatch, decay, walk_operands):
    """bf16 inputs, both walk-operand modes (`dtri.WALK_OPERANDS`), packed documents, h0,
    two V-tiles, against the float64 chunk form on the same (rounded) inputs: every result
    within bf16 rounding, and the walks' stored operands (w, k_end, scale Q ⊙ e^Γ), the
    chunks' incoming states S, the backward walk's dδ and dS' and the chunk backward's dw in
    the mode's dtype while the forward walk's δ, R, u, the outputs' dδ, the partial dk and
    the final state stay fp32. fp32 walks leave the fp32 results (final, dbeta, ddecay, dh0)
    at fp32 accuracy. The interpreter computes bf16 as a GPU does (`bf16_interpreter`). An
    unknown mode: ValueError."""
    for row in ("delta.state_bf16", "delta.state_grad_bf16", "delta.state_grad_per_key_bf16", "delta.state",
                "delta.state_grad", "delta.state_grad_per_key", "delta.output", "delta.output_grad",
                "delta.key_grad", "delta.wy_grad", "delta.key_grad_per_key", "delta.wy_grad_per_key"):
        monkeypatch.setitem(launch.LAUNCH, row, launch.Launch(4, 2, 16))
    allocations = []
    new_tensor = launch.new_tensor

    def recording(shape, dtype, device):
        allocations.append((tuple(shape), dtype))
        return new_tensor(shape, dtype, device)
    monkeypatch.setattr(launch, "new_tensor", recording)
    lengths, H, K, V, C = [1, 40, 0, 23], 2, 16, 32, 16
    cu = random_cu_seqlens(lengths)
    leaves = _inputs(1, sum(lengths), H, K, V, decay, n_states=len(lengths), dtype=torch.bfloat16, strong=True)
    q, k, v, beta, g, h0 = leaves
    gen = torch.Generator().manual_seed(1)
    d_o = torch.randn(v.shape, generator=gen).bfloat16()
    d_s = torch.randn(h0.shape, generator=gen)
    kw = dict(scale=K ** -0.5, output_final_state=True, cu_seqlens=cu)
    with bf16_interpreter():
        o, s = dtri.triton_linear_attention(q, k, v, g, beta, initial_state=h0, chunk_size=C,
                                            walk_operands=walk_operands, **kw)
        got = _grads([o, s], leaves, [d_o, d_s])
    ref = [x.detach().double().requires_grad_() for x in leaves]
    o_ref, s_ref = chunk_linear_attention(*ref[:3], ref[4], ref[3], initial_state=ref[5], **kw)
    want = _grads([o_ref, s_ref], ref, [d_o.double(), d_s.double()])
    errors = {"o": rel_err(o, o_ref), "final": rel_err(s, s_ref)}
    errors.update({name: rel_err(a, b) for name, a, b in zip(_names(leaves), got, want)})
    print(f"\n{decay} bf16 inputs, {walk_operands} walk operands: "
          + " ".join(f"{name}={e:.1e}" for name, e in errors.items()))

    n_slots = dtri.chunk_layout(1, sum(lengths), cu, C, "cpu").n_slots
    narrow = sorted(shape for shape, dtype in allocations if shape[0] == n_slots and dtype == torch.bfloat16)
    wide = sorted(shape for shape, dtype in allocations if shape[0] == n_slots and dtype == torch.float32)
    # w, k_end, the backward walk's scale Q ⊙ e^Γ, the chunk backward's dw; the chunks'
    # incoming states S; dδ, dS'
    operands = [(n_slots, H, C, K)] * 4 + [(n_slots, H, K, V)] + [(n_slots, H, C, V), (n_slots, H, K, V)]
    fp32_only = [(n_slots, H, C, V)]                                             # the forward walk's δ
    fp32_only += [(n_slots, H, C, C), (n_slots, H, C, V), (n_slots, H, C, V)]   # R, u, the outputs' dδ
    # the chunk backward's scratch: the partial dk, for g the partial dg of each K-tile (one)
    fp32_only += [(n_slots, H, C, K)] + ([(n_slots, H, 1, C)] if decay == "g" else [])
    if walk_operands == "bfloat16":
        assert (narrow, wide) == (sorted(operands), sorted(fp32_only + [(n_slots, H, K if decay == "gk" else 1)]))
        # bf16 results' rounding plus w's, k_end's and S's (measured at most 2.3e-3; 2.9e-3
        # while the walks' other outputs were stored in bf16 too)
        bound = {name: 3e-3 for name in errors}
    else:
        assert not narrow and sorted(operands + fp32_only) == [x for x in wide if len(x) == 4]
        bound = {name: 3e-3 for name in errors}         # the rounding of bf16 results
        bound.update(final=1e-5, dbeta=1e-5, ddecay=1e-5, dh0=1e-5)
    assert s.dtype == torch.float32 and o.dtype == torch.bfloat16
    bad = {name: e for name, e in errors.items() if not e <= bound[name]}
    assert not bad, f"relative errors above the bounds: {bad} (all: {errors})"
    with pytest.raises(ValueError, match="walk_operands"):
        dtri.triton_linear_attention(q, k, v, g, beta, walk_operands="float16", **kw)


@cpu_only
def test_walk_v_tiles_fill_the_gpu(monkeypatch):
    """The walks take their row's widest V-tile (the bf16 rows': 64) and halve it, down to
    16, while documents × heads × V-tiles would leave SMs without a program; the fp32 rows'
    tile is 16. With bf16 walks at the widest tile and at the narrowest, outputs and every
    gradient stay within bf16 rounding of the float64 chunk form."""
    def v_tile(B, H, operands, sms):
        monkeypatch.setattr(dtri, "multiprocessors", lambda device: sms)
        layout = dtri.chunk_layout(B, 256, None, 64, "cpu")
        w = torch.empty(layout.n_slots, H, 64, 128, dtype=operands)
        return dtri._walk_grid(w, 128, "delta.state", layout)[1]["BV"]
    # (8,4K) and (1,32K) at H = 16 on an H100 (132 SMs): 128 walks keep 64, 16 walks need 16
    assert [v_tile(8, 16, torch.bfloat16, 132), v_tile(1, 16, torch.bfloat16, 132)] == [64, 16]
    assert [v_tile(2, 16, torch.bfloat16, 100), v_tile(8, 16, torch.float32, 1)] == [32, 16]

    lengths, H, K, V = [40, 0, 23], 2, 16, 64
    cu = random_cu_seqlens(lengths)
    q, k, v, beta, g, _ = _inputs(1, sum(lengths), H, K, V, "g", n_states=None, dtype=torch.bfloat16)
    d_o = torch.randn(v.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    kw = dict(scale=K ** -0.5, cu_seqlens=cu, chunk_size=16)
    leaves = [q, k, v, beta, g]
    ref = [x.detach().double().requires_grad_() for x in leaves]
    o_ref = chunk_linear_attention(*ref[:3], ref[4], ref[3], **kw)[0]
    want = [o_ref.detach()] + list(_grads([o_ref], ref, [d_o.double()]))
    tiles, walk_grid = [], dtri._walk_grid

    def recording(*args):
        grid = walk_grid(*args)
        tiles.append(grid[1]["BV"])
        return grid
    monkeypatch.setattr(dtri, "_walk_grid", recording)
    for sms in (1, 10 ** 6):        # the widest tile, the narrowest
        monkeypatch.setattr(dtri, "multiprocessors", lambda device: sms)
        with bf16_interpreter():
            o = dtri.triton_linear_attention(q, k, v, g, beta, walk_operands="bfloat16", **kw)[0]
            got = [o] + list(_grads([o], leaves, [d_o]))
        errors = {name: rel_err(a, b) for name, a, b in zip(["o", *_names(leaves)], got, want)}
        print(f"\n{sms} SMs: " + " ".join(f"{name}={e:.1e}" for name, e in errors.items()))
        assert max(errors.values()) <= 3e-3, (sms, errors)
    assert tiles == [64, 64, 16, 16]        # forward and backward walk, at each SM count
