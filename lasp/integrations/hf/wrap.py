"""`parallelize_hf`: route a transformers causal LM's sequence mixing through lasp.

- softmax attention: the ``"lasp_sp"`` function (`attention.py`), LASP-2H over the group;
- linear layers (the families' modules, `ADAPTERS`): their forward replaced by lasp's,
  on the HF module's own parameters;
- a forward pre-hook on the decoder passes the layout's global positions as
  ``position_ids`` when the caller gives none (RoPE rotates by global positions) and checks
  given ones against them (on the device, no host sync), records
  this forward's ``cu_seqlens`` in the model's `HFContext`, and refuses a padding
  ``attention_mask`` (pack documents and pass ``cu_seqlens``).

Packed documents: pass ``cu_seqlens=`` (offsets of the WHOLE sequence) to the model's
forward; every softmax layer, linear layer and short convolution keeps them apart, on one
rank too.

Loss: transformers shifts ``labels`` inside the tensor it is given, which under sequence
parallelism is this rank's shard (every shard loses the label of its last token) and with
packed documents predicts across document boundaries. So a parallelized model refuses
``labels`` in those cases unless ``shift_labels`` (targets shifted before sharding, from
`lasp.shard_batch`) come with them; `lasp.causal_lm_loss(model, batch)` is the simple way.
Under sequence parallelism it also refuses ``labels`` when the forward would add a MoE
load-balancing loss (transformers would balance each shard's tokens): `lasp.causal_lm_loss`
adds that of the whole sequence (`moe.py`).

Masks: transformers builds none for ``"lasp_sp"``; sliding windows and chunks that the
config gives a layer are checked per layer (`attention.attention_windows`).
"""

from __future__ import annotations

import inspect
from types import MethodType

from packaging.version import Version
from transformers import AttentionInterface
from transformers import __version__ as TRANSFORMERS_VERSION

from lasp.integrations.hf import gated_deltanet, kda, lfm2, mamba2, minimax
from lasp.integrations.hf.attention import ATTENTION, attention_windows, lasp_attention
from lasp.integrations.hf.context import HFContext
from lasp.integrations.hf.moe import routes_aux_loss
from lasp.kernels.checks import check_value
from lasp.layers.sequence import SPContext

SOFTMAX_ONLY_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe", "qwen3_moe")
FAMILIES = (minimax, mamba2, gated_deltanet, kda, lfm2)
SUPPORTED_MODEL_TYPES = SOFTMAX_ONLY_MODEL_TYPES + tuple(t for family in FAMILIES for t in family.MODEL_TYPES)
ADAPTERS = {name: forward for family in FAMILIES for name, forward in family.ADAPTERS.items()}
# The adapters replace module forwards whose code they mirror, checked against this release;
# an older one may split its projections or name its parameters differently.
ADAPTERS_CHECKED_WITH = "5.25.0"


def _decoder_hook(context: HFContext):
    """Before each decoder forward: global positions, this forward's documents, no padding mask."""
    signatures = {}

    def hook(module, args, kwargs):
        if type(module) not in signatures:       # once per class, not on every forward
            signatures[type(module)] = inspect.signature(module.forward)
        bound = signatures[type(module)].bind_partial(*args, **kwargs).arguments
        if bound.get("attention_mask") is not None:
            raise ValueError("a model wrapped by lasp.parallelize takes no attention_mask: pack the documents "
                             "into one row and pass cu_seqlens= (offsets of the whole sequence) instead of padding")
        context.cu_seqlens = bound.get("cu_seqlens", kwargs.get("cu_seqlens"))
        if "position_ids" not in signatures[type(module)].parameters:
            return args, kwargs
        tokens = bound.get("input_ids")
        if tokens is None:
            tokens = bound["inputs_embeds"]
        positions = context.sp.local_layout(tokens.shape[1]).positions(tokens.device).expand(tokens.shape[0], -1)
        given = bound.get("position_ids")
        if given is None:
            kwargs["position_ids"] = positions
        else:   # transformers' padding-free packing restarts them per document; lasp would mix documents
            check_value(given.to(positions.device) == positions,
                        "position_ids must be the global positions of the local tokens (lasp.shard_batch gives "
                        "them); for packed documents pass cu_seqlens= instead of restarting position_ids")
        return args, kwargs
    return hook


def _labels_hook(sp: SPContext):
    """Refuse `labels` that transformers would shift wrongly (module docstring), on every rank
    before any collective, as lasp's own models do."""
    signatures = {}

    def hook(module, args, kwargs):
        if type(module) not in signatures:       # once per class, not on every forward
            signatures[type(module)] = inspect.signature(module.forward)
        bound = signatures[type(module)].bind_partial(*args, **kwargs).arguments
        if bound.get("labels") is None:
            return None
        routed = bound.get("output_router_logits")
        if sp.world_size > 1 and (routed if routed is not None else routes_aux_loss(module)):
            raise ValueError(f"{type(module).__name__} would add the load-balancing loss of this rank's "
                             f"shard, not of the whole sequence: compute the loss with "
                             "lasp.causal_lm_loss(model, lasp.shard_batch(...))")
        if kwargs.get("shift_labels") is not None:
            return None
        if sp.world_size > 1 or kwargs.get("cu_seqlens") is not None:
            where = (f"inside each of the {sp.world_size} sequence-parallel shards (losing the label at "
                     "every shard boundary)" if sp.world_size > 1 else "across packed document boundaries")
            raise ValueError(f"{type(module).__name__} would shift labels {where}: compute the loss with "
                             "lasp.causal_lm_loss(model, lasp.shard_batch(...)), or pass shift_labels= and "
                             "num_items_in_batch= from lasp.shard_batch along with labels")
        return None
    return hook


def _replace_hook(module, name: str, hook) -> None:
    previous = getattr(module, name, None)
    if previous is not None:
        previous.remove()
    setattr(module, name, module.register_forward_pre_hook(hook, with_kwargs=True))


def parallelize_hf(model, sp: SPContext):
    """Route `model`'s softmax attention through LASP-2H, its linear layers through lasp's
    kernels and LASP-2, and its RoPE through global positions (module docstring)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"lasp.parallelize does not support {type(model).__name__} (model_type "
                         f"{model_type!r}); supported: lasp's Linear-Llama models and transformers "
                         f"model types {list(SUPPORTED_MODEL_TYPES)}")
    if model_type not in SOFTMAX_ONLY_MODEL_TYPES and Version(TRANSFORMERS_VERSION) < Version(ADAPTERS_CHECKED_WITH):
        raise ValueError(f"lasp.parallelize adapts {model_type!r}'s linear layers as transformers "
                         f"{ADAPTERS_CHECKED_WITH} writes them; this is transformers {TRANSFORMERS_VERSION}: "
                         f"pip install 'transformers>={ADAPTERS_CHECKED_WITH}'")
    AttentionInterface.register(ATTENTION, lasp_attention)
    model.set_attn_implementation(ATTENTION)
    model.config.use_cache = False  # a KV cache is for generation; training keeps none
    context = HFContext(sp)
    decoder = model.base_model
    windows = attention_windows(model.config)
    shortest = min(windows.values(), key=lambda window: window[1], default=None)  # for a module without layer_idx
    for module in decoder.modules():
        module.lasp_context = context   # read by lasp_attention (any attention module) and the adapters
        layer = getattr(module, "layer_idx", None)
        module.lasp_attention_window = windows.get(layer) if isinstance(layer, int) else shortest
        forward = ADAPTERS.get(type(module).__name__)
        if forward is not None:
            module.forward = MethodType(forward, module)
    _replace_hook(decoder, "_lasp_decoder_hook", _decoder_hook(context))
    _replace_hook(model, "_lasp_labels_hook", _labels_hook(sp))
    return model
