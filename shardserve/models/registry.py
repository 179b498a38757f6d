"""From a Hugging Face `architectures` entry to the class that implements it."""
from __future__ import annotations

import importlib

from torch import nn

# architecture -> (module, class)
_GENERATION_MODELS = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("llama", "Qwen3ForCausalLM"),
    "OPTForCausalLM": ("opt", "OPTForCausalLM"),
    "GPT2LMHeadModel": ("gpt2", "GPT2LMHeadModel"),
}


def supported_architectures() -> list[str]:
    return sorted(_GENERATION_MODELS)


def resolve_model_class(hf_config) -> type[nn.Module]:
    architectures = list(getattr(hf_config, "architectures", None) or [])
    for arch in architectures:
        if arch in _GENERATION_MODELS:
            module, cls = _GENERATION_MODELS[arch]
            return getattr(importlib.import_module(f"shardserve.models.{module}"), cls)
    raise ValueError(f"Model architectures {architectures} are not supported; supported architectures: "
                     f"{', '.join(supported_architectures())}.")
