"""The model a run trains: a lasp preset with the run's layer pattern and overrides, or a
Hugging Face model (`--model hf:PATH`), and its blocks.

`hf:PATH` is a local directory with a transformers ``config.json`` of a model type that
`lasp.parallelize` supports; its safetensors weights are loaded when the directory has
them, else the model is initialised at random from the config (--seed). --model-overrides
set config fields; --layer-pattern does not apply. `HFCausalLM` gives it the forward that
`train_step` calls (lasp's chunked loss and the whole sequence's load-balancing loss).
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch

HF_PREFIX = "hf:"


def build_model_config(config, vocab_size: int | None):
    """The LinearLlamaConfig of --model, --layer-pattern, --activation-checkpointing(-blocks),
    --offload-activations, --tile-tokens and --model-overrides; its vocabulary is the
    tokenizer's (`vocab_size`) unless overridden with a larger one. ValueError (naming the
    option) for a bad name or field."""
    from lasp.models import LinearLlamaConfig, linear_llama_config
    from lasp.models.config import PRESETS

    if config.name not in PRESETS:
        raise ValueError(f"--model {config.name!r}: unknown model; choose from {', '.join(sorted(PRESETS))}")
    known = set(inspect.signature(LinearLlamaConfig.__init__).parameters) - {"self", "kwargs"}
    unknown = set(config.model_overrides) - known
    if unknown:
        raise ValueError(f"--model-overrides: unknown LinearLlamaConfig fields {sorted(unknown)}")
    overrides = dict(config.model_overrides)
    if vocab_size is not None:
        if overrides.get("vocab_size", vocab_size) < vocab_size:
            raise ValueError(f"--model-overrides vocab_size={overrides['vocab_size']} is smaller than the "
                             f"tokenizer's vocabulary ({vocab_size})")
        overrides.setdefault("vocab_size", vocab_size)
    try:
        return linear_llama_config(config.name, layer_pattern=config.layer_pattern,
                                   activation_checkpointing=model_checkpointing(config.activation_checkpointing),
                                   activation_checkpointing_blocks=config.activation_checkpointing_blocks,
                                   offload_activations=config.offload_activations, tile_tokens=config.tile_tokens,
                                   **overrides)
    except (ValueError, TypeError, NotImplementedError) as error:
        raise ValueError(f"--model {config.name} --layer-pattern {config.layer_pattern}: {error}") from None


def model_checkpointing(mode):
    """The models' `activation_checkpointing` for --activation-checkpointing: False, True (full)
    or "selective" (a bool, from code that builds its ModelConfig itself, passes through)."""
    return {"none": False, "full": True}.get(mode, mode)


def hf_path(config) -> Path | None:
    """The directory of `--model hf:PATH`, or None for a lasp preset."""
    return Path(config.name[len(HF_PREFIX):]).expanduser() if config.name.startswith(HF_PREFIX) else None


def build_hf_config(config, vocab_size: int | None):
    """The transformers config of `--model hf:PATH` with --model-overrides, checked: a directory
    with config.json, a model type lasp.parallelize supports, a vocabulary that holds the
    tokenizer's (`vocab_size`). ValueError naming the option otherwise."""
    path = hf_path(config)
    flag = f"--model {config.name}"
    if not path.is_dir():
        raise ValueError(f"{flag}: not a directory (hf:PATH names a local directory holding a transformers "
                         "config.json, and optionally its safetensors weights)")
    if not (path / "config.json").is_file():
        raise ValueError(f"{flag}: {path} has no config.json (write one with config.save_pretrained(PATH))")
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ValueError(f"{flag}: needs Hugging Face transformers (pip install transformers)") from None
    from lasp.integrations.hf import SUPPORTED_MODEL_TYPES
    try:
        hf_config, unused = AutoConfig.from_pretrained(str(path), return_unused_kwargs=True,
                                                       **config.model_overrides)
    except (ValueError, TypeError, KeyError, OSError) as error:
        raise ValueError(f"{flag}: transformers cannot read {path / 'config.json'}: {error}") from None
    if unused:
        raise ValueError(f"--model-overrides: {sorted(unused)} are not fields of the {hf_config.model_type} config")
    if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{flag}: model type {hf_config.model_type!r} is not supported by lasp.parallelize; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if vocab_size is not None and hf_config.vocab_size < vocab_size:
        raise ValueError(f"{flag}: its vocab_size {hf_config.vocab_size} is smaller than the tokenizer's "
                         f"vocabulary ({vocab_size}): pick its own tokenizer (--tokenizer PATH) or raise it")
    return hf_config


def _hf_model(hf_config, path: Path | None = None):
    """A transformers causal LM with fp32 parameters: loaded from `path`, or initialised from
    `hf_config` (eager MoE experts on CPU: the grouped-mm path needs a GPU)."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=torch.float32)
    if not torch.cuda.is_available() and any(getattr(hf_config, name, 0) for name in
                                             ("num_experts", "num_local_experts", "n_routed_experts")):
        kwargs["experts_implementation"] = "eager"
    if path is None:
        return AutoModelForCausalLM.from_config(hf_config, **kwargs)
    return AutoModelForCausalLM.from_pretrained(str(path), config=hf_config, **kwargs)


def check_model(config) -> None:
    """Build the model on the meta device (no memory, no time): an override of a wrong type or
    size fails here, before any process starts, with a ValueError naming the options."""
    from lasp.models import LinearLlamaForCausalLM

    if hf_path(config) is not None:
        options = f"--model {config.name}"
        build = functools.partial(_hf_model, build_hf_config(config, vocab_size=None))
    else:
        options = f"--model {config.name} --layer-pattern {config.layer_pattern}"
        build = functools.partial(LinearLlamaForCausalLM, build_model_config(config, vocab_size=None))
    try:
        with torch.device("meta"):
            build()
    except Exception as error:  # whatever the model's constructor raises for such a config
        raise ValueError(f"{options} --model-overrides {json.dumps(config.model_overrides)}: "
                         f"{type(error).__name__}: {error}") from None


def build_model(config, vocab_size: int, device: torch.device, seed: int):
    """The model, initialised from `seed` on `device` (the same weights on every rank); for
    `hf:PATH` an `HFCausalLM`, with the directory's weights when it has safetensors files."""
    from lasp.models import LinearLlamaForCausalLM

    torch.manual_seed(seed)
    path = hf_path(config)
    if path is not None:
        hf_config = build_hf_config(config, vocab_size)
        if any(path.glob("*.safetensors")):
            model = _hf_model(hf_config, path).to(device)
        else:
            with torch.device(device):
                model = _hf_model(hf_config)
        checkpointing = model_checkpointing(config.activation_checkpointing)
        if checkpointing:
            from lasp.models.checkpointing import checkpoint_context_fn
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
                "use_reentrant": False, "context_fn": checkpoint_context_fn(checkpointing)})
        return HFCausalLM(model)
    with torch.device(device):
        return LinearLlamaForCausalLM(build_model_config(config, vocab_size))


@dataclass
class HFCausalLMOutput:
    lm_loss: torch.Tensor
    aux_loss: torch.Tensor | None


class HFCausalLM(torch.nn.Module):
    """A transformers causal LM as `lasp-train` trains it: `forward` takes what `train_step`
    passes and returns lasp's losses (`lasp.loss.causal_lm_losses`: logits one chunk at a
    time, the load-balancing loss of the whole sequence), inside the engine's root module so
    that FSDP2 gathers the embeddings and the output head for it. `hf_model` is the model
    itself (what `lasp.parallelize` wraps); its state is under ``hf_model.``."""

    def __init__(self, hf_model):
        from lasp.loss import chunk_loss
        super().__init__()
        self.hf_model = hf_model
        self.config = hf_model.config
        self.chunk_loss = chunk_loss  # the loss's per-chunk scoring (compiled by lasp.launch.compile)

    def forward(self, input_ids, shift_labels, cu_seqlens=None, num_items_in_batch=None) -> HFCausalLMOutput:
        from lasp.loss import causal_lm_losses
        lm_loss, aux_loss = causal_lm_losses(self.hf_model, input_ids, shift_labels, cu_seqlens=cu_seqlens,
                                             num_tokens=num_items_in_batch, scoring=self.chunk_loss)
        return HFCausalLMOutput(lm_loss=lm_loss, aux_loss=aux_loss)

    def blocks(self) -> list[torch.nn.Module]:
        return model_blocks(self.hf_model)

    def get_input_embeddings(self):
        return self.hf_model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.hf_model.get_output_embeddings()


def model_blocks(model) -> list[torch.nn.Module]:
    """The blocks that the engine shards one by one: the model's own `blocks()` (lasp's models);
    for a Hugging Face model without it (one wrapped by `lasp.parallelize`), the modules of the
    classes it names in `_no_split_modules` (its decoder layers). TypeError if it has neither."""
    if callable(getattr(model, "blocks", None)):
        return list(model.blocks())
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if not blocks:
        raise TypeError(f"{type(model).__name__} has no blocks() and no _no_split_modules that name its blocks: "
                        "give it a blocks() method returning its repeated blocks in order, as "
                        "LinearLlamaForCausalLM.blocks does")
    return blocks
