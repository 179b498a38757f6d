"""From a Hugging Face `architectures` entry (and the runner it runs with) to the class that implements it.

Generation architectures are causal LMs. Pooling architectures are encoders and sequence classifiers as
they are; any generation architecture also becomes a pooling model when converted (`convert="embed"`,
`"classify"` or `"reward"`, see models/adapters.py).
"""
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
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
    "Gemma2ForCausalLM": ("gemma3", "Gemma2ForCausalLM"),
    "MixtralForCausalLM": ("moe", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("moe", "Qwen3MoeForCausalLM"),
}

# architecture -> (module, class); each class says what it outputs (`pooling_kind`).
_POOLING_MODELS = {
    "BertModel": ("bert", "BertEmbeddingModel"),
    "BertForSequenceClassification": ("bert", "BertForSequenceClassification"),
    "RobertaModel": ("roberta", "RobertaEmbeddingModel"),
    "RobertaForMaskedLM": ("roberta", "RobertaEmbeddingModel"),  # the MLM head is not used
    "XLMRobertaModel": ("roberta", "RobertaEmbeddingModel"),
    "RobertaForSequenceClassification": ("roberta", "RobertaForSequenceClassification"),
    "XLMRobertaForSequenceClassification": ("roberta", "RobertaForSequenceClassification"),
    # decoder bodies without their LM head, and decoders with a classification head
    "LlamaModel": ("adapters", "LlamaEmbeddingModel"),
    "MistralModel": ("adapters", "MistralEmbeddingModel"),
    "Qwen2Model": ("adapters", "Qwen2EmbeddingModel"),
    "Qwen3Model": ("adapters", "Qwen3EmbeddingModel"),
    "LlamaForSequenceClassification": ("adapters", "LlamaForSequenceClassification"),
    "MistralForSequenceClassification": ("adapters", "MistralForSequenceClassification"),
    "Qwen2ForSequenceClassification": ("adapters", "Qwen2ForSequenceClassification"),
    "Qwen3ForSequenceClassification": ("adapters", "Qwen3ForSequenceClassification"),
    "Gemma3TextModel": ("adapters", "Gemma3EmbeddingModel"),  # EmbeddingGemma: bidirectional
    "Gemma3ForSequenceClassification": ("adapters", "Gemma3ForSequenceClassification"),
}

RUNNERS = ("auto", "generate", "pooling")
CONVERTS = ("auto", "none", "embed", "classify", "reward")
# vLLM's older `task` argument: task -> (runner, convert)
_LEGACY_TASKS = {"generate": ("generate", "auto"), "embed": ("pooling", "embed"), "embedding": ("pooling", "embed"),
                 "classify": ("pooling", "classify"), "score": ("pooling", "classify"),
                 "reward": ("pooling", "reward")}


def supported_architectures() -> list[str]:
    return sorted(set(_GENERATION_MODELS) | set(_POOLING_MODELS))


def _load(entry: tuple[str, str]) -> type[nn.Module]:
    module, cls = entry
    return getattr(importlib.import_module(f"shardserve.models.{module}"), cls)


def _architectures(hf_config) -> list[str]:
    architectures = list(getattr(hf_config, "architectures", None) or [])
    if not any(a in _GENERATION_MODELS or a in _POOLING_MODELS for a in architectures):
        raise ValueError(f"Model architectures {architectures} are not supported; supported architectures: "
                         f"{', '.join(supported_architectures())}.")
    return architectures


def resolve_runner(hf_config, runner: str = "auto", convert: str = "auto",
                   task: str | None = None) -> tuple[str, str]:
    """(runner, convert) for this model: "generate" with convert "none", or "pooling" with the kind of
    output ("embed", "classify", "reward") the model gives, natively or by conversion."""
    if runner not in RUNNERS:
        raise ValueError(f"Unknown runner {runner!r}; choose one of {', '.join(RUNNERS)}.")
    if convert not in CONVERTS:
        raise ValueError(f"Unknown convert {convert!r}; choose one of {', '.join(CONVERTS)}.")
    if task is not None and task != "auto":
        if task not in _LEGACY_TASKS:
            raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(_LEGACY_TASKS)} (or use "
                             f"runner= and convert=).")
        task_runner, task_convert = _LEGACY_TASKS[task]
        if runner not in ("auto", task_runner) or convert not in ("auto", task_convert):
            raise ValueError(f"task={task!r} means runner={task_runner!r}, convert={task_convert!r}; it "
                             f"conflicts with runner={runner!r}, convert={convert!r}.")
        runner, convert = task_runner, task_convert
    architectures = _architectures(hf_config)
    pooling_arch = next((a for a in architectures if a in _POOLING_MODELS), None)
    generation_arch = next((a for a in architectures if a in _GENERATION_MODELS), None)
    if runner == "auto":
        runner = "pooling" if pooling_arch or convert not in ("auto", "none") else "generate"
    if runner == "generate":
        if generation_arch is None:
            raise ValueError(f"{pooling_arch} is a pooling model; create the LLM with runner='pooling' (or "
                             f"leave runner='auto').")
        if convert not in ("auto", "none"):
            raise ValueError(f"convert={convert!r} makes a pooling model; use it with runner='pooling'.")
        return "generate", "none"
    if pooling_arch is not None:
        kind = _load(_POOLING_MODELS[pooling_arch]).pooling_kind
        if convert not in ("auto", "none", kind):
            raise ValueError(f"{pooling_arch} is a{'n' if kind == 'embed' else ''} {kind} model; convert="
                             f"{convert!r} cannot change that (convert turns a causal LM into a pooling model).")
        return "pooling", kind
    # A causal LM run as a pooling model: an embedding model unless told otherwise (as vLLM).
    return "pooling", "embed" if convert in ("auto", "none") else convert


def resolve_model_class(hf_config, runner: str = "generate", convert: str = "none") -> type[nn.Module]:
    architectures = _architectures(hf_config)
    if runner == "pooling":
        for arch in architectures:
            if arch in _POOLING_MODELS:
                return _load(_POOLING_MODELS[arch])
        from shardserve.models.adapters import as_pooling_model
        return as_pooling_model(_load(_GENERATION_MODELS[next(a for a in architectures
                                                               if a in _GENERATION_MODELS)]), convert)
    for arch in architectures:
        if arch in _GENERATION_MODELS:
            return _load(_GENERATION_MODELS[arch])
    raise ValueError(f"{architectures[0]} is a pooling model; create the LLM with runner='pooling' (or leave "
                     f"runner='auto').")
