"""A model's generation config (`generation_config.json`): the EOS ids it adds, and the sampling defaults vLLM takes
from it (`generation_config`: "auto", the model's; "vllm", none; or a folder holding another file), with
`override_generation_config` on top. A request's own values always win; these fill in what it leaves out."""
from __future__ import annotations

from typing import Any

# The fields vLLM takes as sampling defaults (HF's max_new_tokens is vLLM's max_tokens).
SAMPLING_FIELDS = ("repetition_penalty", "presence_penalty", "frequency_penalty", "temperature", "top_k", "top_p",
                   "min_p", "max_new_tokens")


def load_generation_config(path: str, revision: str | None = None) -> dict[str, Any]:
    """The fields of the generation config at `path` (a folder or a hub id) that differ from transformers'
    defaults; {} where there is none (a GGUF file, a folder without one)."""
    from transformers import GenerationConfig
    try:
        return GenerationConfig.from_pretrained(path, revision=revision).to_diff_dict()
    except (OSError, ValueError):
        return {}


def sampling_defaults(model_config: dict[str, Any], source: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """SamplingParams keyword arguments for what a request leaves out; `model_config` is the model's own
    generation config, `source` the engine's `generation_config` setting."""
    config = {} if source == "vllm" else model_config if source == "auto" else load_generation_config(source)
    config = config | overrides
    defaults = {name: config[name] for name in SAMPLING_FIELDS if config.get(name) is not None}
    if "max_new_tokens" in defaults:
        defaults["max_tokens"] = defaults.pop("max_new_tokens")
    return defaults
