"""Transitions: what a token, or a whole run of tokens, does to the incoming state.

Every linear-attention family is the recurrence (DESIGN.md §1)::

    S_t = A_t(S_{t-1}) + write_t

and a run of tokens maps an incoming state affinely, `S_out = A_run(S_in) + S_loc`, with
`A_run` the composition of its tokens' transitions. A `Transition` is that linear map,
as data, in one of four kinds (the state is [..., H, K, V]):

    kind       parameter                          A(S)
    identity   none                               S                    plain
    scalar     log_decay [..., H]   (≤ 0)         exp(a) · S           g, g_gamma
    diagonal   log_decay [..., H, K] (≤ 0)        diag(exp(a)) S       gk
    dense      matrix [..., H, K, K]              M S                  delta rule

It composes (`then`), applies itself to a state (`apply`) and gives the gradients of
that application (`apply_backward`); `cut` turns it into the zero map where a document
starts inside the run (no state crosses a document start). Its size never depends on
the run's length. Arithmetic is in the parameter's dtype: callers build summaries in
fp32 (float64 for float64 inputs).

`lasp.parallel` holds no decay math: it gathers `(transition, state)` summaries
(`pack`/`unpack` into one flat buffer) and walks them with these methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("identity", "scalar", "diagonal", "dense")
# A parameter's trailing dims after the batch dims [..., H]: none, (), (K,), (K, K).
_RANK = {"scalar": 0, "diagonal": 1, "dense": 2}


@dataclass(frozen=True)
class Transition:
    """A linear map of states [..., H, K, V] (module docstring). `param` is the log-decay
    (scalar, diagonal), the matrix (dense), or None (identity)."""

    kind: str
    param: torch.Tensor | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if (self.param is None) != (self.kind == "identity"):
            raise ValueError(f"a {self.kind} transition {'takes no' if self.kind == 'identity' else 'needs a'} parameter")

    # -- construction ---------------------------------------------------------------------

    @staticmethod
    def identity() -> Transition:
        return Transition("identity")

    @staticmethod
    def scalar(log_decay: torch.Tensor) -> Transition:
        return Transition("scalar", log_decay)

    @staticmethod
    def diagonal(log_decay: torch.Tensor) -> Transition:
        return Transition("diagonal", log_decay)

    @staticmethod
    def dense(matrix: torch.Tensor) -> Transition:
        return Transition("dense", matrix)

    # -- the map --------------------------------------------------------------------------

    def apply(self, state: torch.Tensor) -> torch.Tensor:
        """A(S) for states [..., H, K, V] whose batch dims match the parameter's."""
        if self.kind == "identity":
            return state
        if self.kind == "scalar":
            return self.param.exp()[..., None, None] * state
        if self.kind == "diagonal":
            return self.param.exp()[..., None] * state
        return self.param @ state

    def apply_transpose(self, grad: torch.Tensor) -> torch.Tensor:
        """Aᵀ(G): how a gradient of A(S) reaches S (A itself, unless dense)."""
        if self.kind == "dense":
            return self.param.transpose(-1, -2) @ grad
        return self.apply(grad)

    def transposed(self) -> Transition:
        """Aᵀ as a transition (the map the gradients walk back through): the matrices
        transposed; the other kinds are symmetric."""
        return Transition.dense(self.param.transpose(-1, -2)) if self.kind == "dense" else self

    def apply_backward(self, grad: torch.Tensor, state: torch.Tensor):
        """Gradients of <grad, A(state)>: (d state, d param or None)."""
        if self.kind == "identity":
            return grad, None
        if self.kind == "dense":
            return self.apply_transpose(grad), grad @ state.transpose(-1, -2)
        scaled = self.apply(grad)                        # exp(a) ⊙ grad, a diagonal map
        d_param = (scaled * state).sum(-1)               # per key: Σ_v
        return scaled, d_param.sum(-1) if self.kind == "scalar" else d_param

    def then(self, later: Transition) -> Transition:
        """`later ∘ self`: this run followed by `later` (identity is neutral; otherwise
        both must be of one kind, as all runs of one call are)."""
        if self.kind == "identity":
            return later
        if later.kind == "identity":
            return self
        if later.kind != self.kind:
            raise ValueError(f"cannot compose a {self.kind} and a {later.kind} transition")
        if self.kind == "dense":
            return Transition.dense(later.param @ self.param)
        return Transition(self.kind, self.param + later.param)

    def cut(self, where: torch.Tensor, heads: int | None = None, dtype=None) -> Transition:
        """The zero map where `where` (bool over the parameter's batch dims, without H;
        broadcast over heads) is true: a document starts inside the run. An identity
        becomes a scalar transition of `heads` heads in `dtype`."""
        if self.kind == "identity":
            if heads is None:
                raise ValueError("cutting an identity transition needs its number of heads")
            log = torch.zeros(*where.shape, heads, dtype=dtype, device=where.device)
            return Transition.scalar(log.masked_fill(where[..., None], float("-inf")))
        mask = where.reshape(*where.shape, *([1] * (1 + _RANK[self.kind])))
        if self.kind == "dense":
            return Transition.dense(self.param.masked_fill(mask, 0.0))
        return Transition(self.kind, self.param.masked_fill(mask, float("-inf")))

    # -- moving through collectives ---------------------------------------------------------

    def to(self, dtype: torch.dtype) -> Transition:
        return self if self.param is None else Transition(self.kind, self.param.to(dtype))

    def pack(self) -> torch.Tensor:
        """The parameter as a flat buffer (empty for identity), for one all-gather."""
        if self.param is None:
            return torch.empty(0)
        return self.param.reshape(-1)

    def unpack(self, flat: torch.Tensor, shape) -> Transition:
        """A transition of this kind from a flat buffer (`pack` of one with `shape`)."""
        return self if self.param is None else Transition(self.kind, flat.view(shape))

    @property
    def nbytes(self) -> int:
        """Bytes the parameter occupies in a collective."""
        return 0 if self.param is None else self.param.numel() * self.param.element_size()

    def select(self, index) -> Transition:
        """The transition of `param[index]` (indexing the batch dims)."""
        return self if self.param is None else Transition(self.kind, self.param[index])


def token_transitions(g=None, gk=None) -> Transition:
    """The per-token transitions of validated public arguments: g [B,T,H] (g_gamma
    arrives expanded), gk [B,T,H,K], neither (identity). Parameters keep their dtype."""
    if gk is not None:
        return Transition.diagonal(gk)
    if g is not None:
        return Transition.scalar(g)
    return Transition.identity()


def run_transition(tokens: Transition, dim: int = 1, dtype=None) -> Transition:
    """The composition of per-token scalar / diagonal / identity transitions along the
    token dim `dim` (a run's A_run): the sum of their log-decays, in `dtype`."""
    if tokens.kind == "identity":
        return tokens
    if tokens.kind == "dense":
        raise ValueError("dense runs are composed by the delta-rule kernels, not by summing")
    param = tokens.param if dtype is None else tokens.param.to(dtype)
    return Transition(tokens.kind, param.sum(dim))
