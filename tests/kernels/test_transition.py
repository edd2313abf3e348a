"""`Transition`: identity, composition, application and its backward, for every kind."""

import pytest
import torch

from lasp.kernels.transition import Transition, run_transition, token_transitions
from tests.utils import rel_err

B, H, K, V = 3, 2, 5, 4


def _random(kind, batch=(B,), generator=None):
    def rand(*shape):
        return torch.randn(*batch, *shape, dtype=torch.float64, generator=generator)
    if kind == "identity":
        return Transition.identity()
    if kind == "scalar":
        return Transition.scalar(-rand(H).abs())
    if kind == "diagonal":
        return Transition.diagonal(-rand(H, K).abs())
    return Transition.dense(rand(H, K, K) / K)


def _matrix(t, batch=(B,)):
    """The transition as explicit K×K matrices [*batch, H, K, K] (the test's own oracle)."""
    eye = torch.eye(K, dtype=torch.float64).expand(*batch, H, K, K)
    if t.kind == "identity":
        return eye
    if t.kind == "scalar":
        return t.param.exp()[..., None, None] * eye
    if t.kind == "diagonal":
        return torch.diag_embed(t.param.exp())
    return t.param


KINDS = ["identity", "scalar", "diagonal", "dense"]


@pytest.mark.parametrize("kind", KINDS)
def test_apply_is_the_matrix_product(kind):
    t, state = _random(kind), torch.randn(B, H, K, V, dtype=torch.float64)
    assert rel_err(t.apply(state), _matrix(t) @ state) < 1e-14
    assert rel_err(t.apply_transpose(state), _matrix(t).transpose(-1, -2) @ state) < 1e-14
    assert rel_err(t.transposed().apply(state), _matrix(t).transpose(-1, -2) @ state) < 1e-14


@pytest.mark.parametrize("kind", KINDS)
def test_composition_is_associative_with_identity_neutral(kind):
    a, b, c = (_random(kind) for _ in range(3))
    state = torch.randn(B, H, K, V, dtype=torch.float64)
    assert rel_err(a.then(b).apply(state), b.apply(a.apply(state))) < 1e-13
    assert rel_err(a.then(b).then(c).apply(state), a.then(b.then(c)).apply(state)) < 1e-13
    ident = Transition.identity()
    assert rel_err(ident.then(a).apply(state), a.apply(state)) < 1e-15
    assert rel_err(a.then(ident).apply(state), a.apply(state)) < 1e-15


@pytest.mark.parametrize("kind", ["scalar", "diagonal", "dense"])
def test_apply_backward_matches_autograd(kind):
    t = _random(kind)
    param = t.param.clone().requires_grad_(True)
    state = torch.randn(B, H, K, V, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(B, H, K, V, dtype=torch.float64)
    out = Transition(kind, param).apply(state)
    want = torch.autograd.grad(out, (state, param), grad)
    got = t.apply_backward(grad, state.detach())
    assert rel_err(got[0], want[0]) < 1e-14 and rel_err(got[1], want[1]) < 1e-14


@pytest.mark.parametrize("kind", KINDS)
def test_cut_is_the_zero_map_where_a_document_starts(kind):
    t, state = _random(kind), torch.randn(B, H, K, V, dtype=torch.float64)
    where = torch.tensor([True, False, True])
    cut = t.cut(where, heads=H, dtype=torch.float64)
    out = cut.apply(state)
    assert not out[where].any()
    assert torch.equal(out[~where], t.apply(state)[~where])


@pytest.mark.parametrize("kind", KINDS)
def test_pack_unpack_roundtrip(kind):
    t = _random(kind)
    flat = t.pack()
    assert flat.numel() * flat.element_size() == t.nbytes
    back = t.unpack(flat.clone(), None if t.param is None else t.param.shape)
    state = torch.randn(B, H, K, V, dtype=torch.float64)
    assert torch.equal(back.apply(state), t.apply(state))


def test_run_transition_composes_the_tokens():
    g = -torch.rand(B, 7, H, K, dtype=torch.float64)
    tokens = token_transitions(gk=g)
    state = torch.randn(B, H, K, V, dtype=torch.float64)
    step_by_step = state
    for t in range(7):
        step_by_step = tokens.select((slice(None), t)).apply(step_by_step)
    assert rel_err(run_transition(tokens).apply(state), step_by_step) < 1e-13
    with pytest.raises(ValueError, match="compose a scalar and a diagonal"):
        _random("scalar").then(_random("diagonal"))
