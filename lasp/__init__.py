"""lasp: sequence-parallel training of linear-attention and hybrid language models.

- `lasp.kernels`: single-device chunkwise linear attention (Triton + pure-torch oracle).
- `lasp.parallel`: sequence layouts and LASP-2 / LASP-2H / LASP-1 across a process group.
- `lasp.layers`, `lasp.models`: layers and Linear-Llama models (hybrids by layer pattern).
- `lasp.parallelize(model, group)`, `lasp.shard_batch(...)`, `lasp.causal_lm_loss(...)`:
  make a model (lasp's or a transformers Llama-family one) sequence-parallel, shard its
  data, and compute its loss under the sharding contract.
- `lasp.no_host_sync()`: check that a training step never waits for the GPU.

The top-level names are imported on first use, so `import lasp` stays light (no transformers).
"""

__version__ = "0.1.0"

_LAZY = {
    "parallelize": "lasp.wrap",
    "shard_batch": "lasp.batch",
    "ShardedBatch": "lasp.batch",
    "causal_lm_loss": "lasp.loss",
    "chunked_cross_entropy": "lasp.loss",
    "sum_gradients": "lasp.loss",
    "no_host_sync": "lasp.sync",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lasp' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
