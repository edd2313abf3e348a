"""The model a run trains: a lasp preset with the run's layer pattern and overrides, and its blocks."""

from __future__ import annotations

import inspect
import json

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
    except (ValueError, TypeError, NotImplementedError) as error:
        raise ValueError(f"--model {config.name} --layer-pattern {config.layer_pattern}: {error}") from None


def check_model(config) -> None:
    """Build the model on the meta device (no memory, no time): an override of a wrong type or
    size fails here, before any process starts, with a ValueError naming the options."""
    from lasp.models import LinearLlamaForCausalLM

    model_config = build_model_config(config, vocab_size=None)
    try:
        with torch.device("meta"):
            LinearLlamaForCausalLM(model_config)
    except Exception as error:  # whatever the model's constructor raises for such a config
        raise ValueError(f"--model {config.name} --layer-pattern {config.layer_pattern} --model-overrides "
                         f"{json.dumps(config.model_overrides)}: {type(error).__name__}: {error}") from None


def build_model(config, vocab_size: int, device: torch.device, seed: int):
    """The model, initialised from `seed` on `device` (the same weights on every rank)."""
    from lasp.models import LinearLlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        return LinearLlamaForCausalLM(build_model_config(config, vocab_size))


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
