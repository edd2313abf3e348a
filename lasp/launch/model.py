"""The model a run trains: a lasp preset with the run's layer pattern and overrides."""

from __future__ import annotations

import inspect

import torch


def build_model_config(config, vocab_size: int | None):
    """The LinearLlamaConfig of --model, --layer-pattern, --activation-checkpointing and
    --model-overrides; its vocabulary is the tokenizer's (`vocab_size`) unless overridden
    with a larger one. ValueError (naming the option) for a bad name or field."""
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
                                   activation_checkpointing=config.activation_checkpointing, **overrides)
    except (ValueError, NotImplementedError) as error:
        raise ValueError(f"--model {config.name} --layer-pattern {config.layer_pattern}: {error}") from None


def build_model(config, vocab_size: int, device: torch.device, seed: int):
    """The model, initialised from `seed` on `device` (the same weights on every rank)."""
    from lasp.models import LinearLlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        return LinearLlamaForCausalLM(build_model_config(config, vocab_size))
