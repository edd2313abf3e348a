"""The delta rule with `beta` [B,T,H] (DESIGN.md §1), and the family's decay: none
(DeltaNet), g [B,T,H] (Gated DeltaNet) or gk [B,T,H,K] (KDA)::

    S_t = A_t(S_{t-1}) + β_t k_t (v_t − k_tᵀ A_t(S_{t-1}))ᵀ        o_t = scale · q_tᵀ S_t

- `wy`: the chunk-local pieces of the chunkwise (WY / UT-transform) form.
- `chunk`: the torch chunk form (any dtype; the oracle), `run_transitions` (each
  document's dense K×K transition); its phases are `common.documents.TorchPhases`; the
  affine run (outputs and final states as affine maps of the initial state, in phases
  for LASP-2: `affine_phases`, in both modules).
- `triton`: the Triton path (imported on use: Triton is optional for the torch backend).
"""

from lasp.kernels.delta.chunk import chunk_linear_attention, run_transitions

__all__ = ["chunk_linear_attention", "run_transitions"]
