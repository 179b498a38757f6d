"""What a Sentence Transformers checkpoint adds to the Hugging Face model it wraps.

`modules.json` lists the pipeline (Transformer -> Pooling -> [Dense ...] -> [Normalize]); each module keeps
its settings in its own folder. We read the settings, never the Python classes the file names: the
pooling mode, the Dense projections (weights and a whitelisted activation), whether the output is
normalised, the maximum sequence length and lower-casing, and the named prompts of
`config_sentence_transformers.json`. Both the current format (Sentence Transformers 5+: `pooling_mode`,
the limit in the tokenizer's `model_max_length`) and the older one (`pooling_mode_*_token` flags,
`max_seq_length` in `sentence_bert_config.json`) are read.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from shardserve.layers.activation import activation_from_qualname
from shardserve.pooler_config import PoolerConfig

logger = logging.getLogger(__name__)

# Sentence Transformers pooling modes -> our pooling types. "max", "mean_sqrt_len_tokens" and "weightedmean"
# have no counterpart.
_POOLING_MODES = {"cls": "CLS", "mean": "MEAN", "lasttoken": "LAST"}
_LEGACY_MODE_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                      "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                      "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
# Modules that do nothing at inference.
_INERT_MODULES = ("Dropout",)
# The tokenizer's "no limit" marker (transformers' VERY_LARGE_INTEGER is 1e30).
_NO_LIMIT = 10 ** 12


@dataclass
class DenseLayer:
    path: str
    in_features: int
    out_features: int
    bias: bool = True
    activation: str = "torch.nn.modules.activation.Tanh"  # Sentence Transformers' default


@dataclass
class SentenceTransformersConfig:
    pooler: PoolerConfig                      # pooling type and normalisation, as the files say
    unsupported_pooling: str | None = None    # a pooling mode we cannot run (refused unless overridden)
    dense: list[DenseLayer] = field(default_factory=list)
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    max_seq_length: int | None = None
    do_lower_case: bool = False


def _read_json(path: str) -> dict | list | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _pooling_mode(config: dict) -> str:
    mode = config.get("pooling_mode")
    if mode is None:
        modes = [name for flag, name in _LEGACY_MODE_FLAGS.items() if config.get(flag)]
        mode = modes if len(modes) != 1 else modes[0]
        mode = mode or "mean"  # what Sentence Transformers falls back to
    if isinstance(mode, (list, tuple)):
        mode = mode[0] if len(mode) == 1 else "+".join(mode)
    return mode


def read_sentence_transformers_config(model_dir: str) -> SentenceTransformersConfig | None:
    """The Sentence Transformers settings of a checkpoint directory, or None if it is not one."""
    modules = _read_json(os.path.join(model_dir, "modules.json"))
    if not modules:
        return None
    st = SentenceTransformersConfig(pooler=PoolerConfig(normalize=False))
    transformer_dir = model_dir
    for module in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = module.get("type", "").rsplit(".", 1)[-1]
        folder = os.path.join(model_dir, module.get("path", ""))
        if kind == "Transformer":
            transformer_dir = folder
        elif kind == "Pooling":
            mode = _pooling_mode(_read_json(os.path.join(folder, "config.json")) or {})
            if mode in _POOLING_MODES:
                st.pooler.pooling_type = _POOLING_MODES[mode]
            else:
                st.unsupported_pooling = mode
        elif kind == "Dense":
            config = _read_json(os.path.join(folder, "config.json")) or {}
            st.dense.append(DenseLayer(folder, config["in_features"], config["out_features"],
                                       config.get("bias", True),
                                       config.get("activation_function") or DenseLayer.activation))
        elif kind == "Normalize":
            st.pooler.normalize = True
        elif kind not in _INERT_MODULES:
            logger.warning("Sentence Transformers module %s (%s) is not supported and is skipped.",
                           module.get("name"), module.get("type"))
    bert_config = _read_json(os.path.join(transformer_dir, "sentence_bert_config.json")) or {}
    st.do_lower_case = bool(bert_config.get("do_lower_case", False))
    st.max_seq_length = bert_config.get("max_seq_length")
    if st.max_seq_length is None:
        tokenizer_limit = (_read_json(os.path.join(transformer_dir, "tokenizer_config.json")) or {}).get(
            "model_max_length")
        if isinstance(tokenizer_limit, int) and tokenizer_limit < _NO_LIMIT:
            st.max_seq_length = tokenizer_limit
    extra = _read_json(os.path.join(model_dir, "config_sentence_transformers.json")) or {}
    st.prompts = dict(extra.get("prompts") or {})
    st.default_prompt_name = extra.get("default_prompt_name")
    return st


def load_dense(layer: DenseLayer, dtype: torch.dtype, device: torch.device) -> nn.Sequential:
    """A Dense module as linear + activation, its weights read from its folder (safetensors, or a
    `weights_only` torch file)."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias, dtype=dtype, device=device)
    weights_file = os.path.join(layer.path, "model.safetensors")
    if os.path.isfile(weights_file):
        from safetensors.torch import load_file
        state = load_file(weights_file)
    else:
        state = torch.load(os.path.join(layer.path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    state = {name.removeprefix("linear."): tensor for name, tensor in state.items()}
    linear.load_state_dict(state)
    linear.requires_grad_(False)
    return nn.Sequential(linear, activation_from_qualname(layer.activation))


def dense_projector(st: SentenceTransformersConfig | None) -> nn.Sequential | None:
    """The model's Dense modules in order, as one projection after pooling (None without any)."""
    if st is None or not st.dense:
        return None
    return nn.Sequential(*(load_dense(d, torch.get_default_dtype(), torch.get_default_device()) for d in st.dense))
