"""lasp's own models (`transformers.PreTrainedModel`s): Linear-Llama and its hybrids.

Importing this package registers them with transformers' Auto classes, so that
`AutoModelForCausalLM.from_pretrained(path)` loads a saved Linear-Llama.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from lasp.models.config import PRESETS, VARIANTS, LinearLlamaConfig, linear_llama_config, parse_layer_pattern
from lasp.models.linear_llama import LinearLlamaForCausalLM, LinearLlamaModel

AutoConfig.register(LinearLlamaConfig.model_type, LinearLlamaConfig, exist_ok=True)
AutoModel.register(LinearLlamaConfig, LinearLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(LinearLlamaConfig, LinearLlamaForCausalLM, exist_ok=True)

__all__ = ["LinearLlamaConfig", "LinearLlamaModel", "LinearLlamaForCausalLM", "linear_llama_config",
           "parse_layer_pattern", "PRESETS", "VARIANTS"]
