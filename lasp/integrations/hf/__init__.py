"""Hugging Face `transformers` causal LMs under lasp: `lasp.parallelize(model, group)`.

Nothing of the model's code is copied; its parameters stay where they are. Modules:

- `wrap`: `parallelize_hf` — checks the model type, routes softmax attention through
  LASP-2H, gives every linear layer lasp's forward, and installs the decoder hooks
  (global positions for RoPE, this forward's packed documents, refused labels).
- `context`: `HFContext`, what the replaced forwards read: the SP group and the packed
  documents (`cu_seqlens`) of the current forward.
- `attention`: the ``"lasp_sp"`` attention function registered with transformers, and
  the sliding windows / chunks a config gives its layers (checked, not lost).
- `moe`: a MoE model's load-balancing loss over the whole sequence (`lasp.causal_lm_loss`).
- one module per linear-layer family (`minimax`, `mamba2`, `gated_deltanet`, `kda`):
  ``MODEL_TYPES`` it serves and ``ADAPTERS``, HF class name → the forward that replaces
  that class's (the HF module's own weights, lasp's kernels, LASP-2 and the conv halo).
"""

from lasp.integrations.hf.wrap import SUPPORTED_MODEL_TYPES, parallelize_hf

__all__ = ["SUPPORTED_MODEL_TYPES", "parallelize_hf"]
