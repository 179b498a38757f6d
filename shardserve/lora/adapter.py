"""Reading a PEFT LoRA adapter, cut to this worker's shard of the model.

An adapter adds `scaling * B @ A` to some of the model's linear weights (A: rank x in, B: out x rank). The base
weights stay as they are: each linear layer adds `x A^T B^T` to its output for the rows of the requests that
use the adapter (`lora/layers.py`), so requests of many adapters, and of none, share a step.

Where the model stores projections merged (q, k, v in `qkv_proj`; gate and up in `gate_up_proj`), their A's are
stacked and their B's placed block-diagonally, so the merged layer adds them all with two matmuls. Each tensor-
parallel rank keeps the slice its layer keeps: a column-parallel layer the rows of B (as its weight's rows), a
row-parallel one the columns of A (its partial product joins the layer's own before the all-reduce).
"""
from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shardserve.layers.linear import LinearBase, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from shardserve.lora.layers import LoRAWeights
from shardserve.lora.request import LoRARequest
from shardserve.models.moe import is_sparse_layer
from shardserve.models.pipeline import PPMissingLayer

# The checkpoint's linear layers an adapter may change (those of Llama-style decoders).
SUPPORTED_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
_TENSOR = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight")


@dataclass(frozen=True)
class AdapterConfig:
    rank: int
    scaling: float   # lora_alpha / rank (or / sqrt(rank), rsLoRA)


def read_adapter_config(path: str, max_rank: int) -> AdapterConfig:
    """The adapter's rank and scaling; refuses what the engine cannot apply (a clear ValueError, before any
    request runs)."""
    config_file = Path(path) / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"LoRA adapter {path!r} has no adapter_config.json.")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as e:
        raise ValueError(f"LoRA adapter {path!r}: adapter_config.json is not JSON ({e}).") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"LoRA adapter {path!r} is a {config.get('peft_type')} adapter; only LORA is supported.")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA adapter {path!r} has no valid rank r: {rank!r}.")
    if rank > max_rank:
        raise ValueError(f"LoRA rank {rank} of adapter {path!r} is greater than max_lora_rank={max_rank}.")
    for key, what in [("rank_pattern", "ranks per module"), ("alpha_pattern", "alphas per module"),
                      ("modules_to_save", "modules_to_save"), ("use_dora", "DoRA"),
                      ("layers_to_transform", "layers_to_transform")]:
        if config.get(key):
            raise ValueError(f"LoRA adapter {path!r} uses {what}, which is not supported.")
    if config.get("bias", "none") != "none":
        raise ValueError(f"LoRA adapter {path!r} trains biases (bias={config['bias']!r}), which is not supported.")
    targets = config.get("target_modules")
    if isinstance(targets, list) and not set(targets) <= SUPPORTED_TARGETS:
        raise ValueError(f"LoRA adapter {path!r} targets {sorted(set(targets) - SUPPORTED_TARGETS)}; supported: "
                         f"{', '.join(sorted(SUPPORTED_TARGETS))}.")
    alpha = config.get("lora_alpha", rank)
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return AdapterConfig(rank, scaling)


# The model families whose layers carry these projections (lora_modules under other models are refused). In the
# mixtures of experts, the attention and the dense MLPs (Qwen3-MoE's dense layers, Qwen2-MoE's shared expert);
# not the experts.
SUPPORTED_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                     "Qwen3ForCausalLM", "Gemma3ForCausalLM", "Gemma2ForCausalLM",
                                     "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"})
_MOE_ARCHITECTURES = frozenset({"MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"})


def target_shapes(hf_config, layer: int) -> dict[str, tuple[int, int]]:
    """The (out, in) features (whole, not sharded) of each projection an adapter may change in decoder layer
    `layer` of this config's model, by its path in the layer ("self_attn.q_proj", "mlp.down_proj", ...)."""
    hidden, heads = hf_config.hidden_size, hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    q, kv = heads * head_dim, (getattr(hf_config, "num_key_value_heads", None) or heads) * head_dim
    shapes = {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
              "self_attn.o_proj": (hidden, q)}
    mlp, inter = "mlp", hf_config.intermediate_size
    if set(getattr(hf_config, "architectures", None) or []) & _MOE_ARCHITECTURES and is_sparse_layer(hf_config, layer):
        mlp, inter = "mlp.shared_expert", getattr(hf_config, "shared_expert_intermediate_size", 0)
    if inter:
        shapes |= {f"{mlp}.gate_proj": (inter, hidden), f"{mlp}.up_proj": (inter, hidden),
                   f"{mlp}.down_proj": (hidden, inter)}
    return shapes


def check_adapter(path: str, hf_config, max_rank: int) -> AdapterConfig:
    """`read_adapter_config`, and the adapter's tensors checked against the model (names, pairs, ranks, shapes)
    from the file's header alone: what a worker will load cannot fail there, where it would stop the engine."""
    config = read_adapter_config(path, max_rank)
    architectures = getattr(hf_config, "architectures", None) or []
    if not set(architectures) & SUPPORTED_ARCHITECTURES:
        raise ValueError(f"LoRA adapters run on {', '.join(sorted(SUPPORTED_ARCHITECTURES))} models; this one is "
                         f"{'/'.join(architectures) or 'of unknown architecture'}.")
    layers = hf_config.num_hidden_layers
    for name, pair in _pairs(path, _tensor_shapes(path)).items():
        layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        shapes = target_shapes(hf_config, int(layer[1])) if layer and int(layer[1]) < layers else {}
        if layer is None or layer[2] not in shapes:
            experts = " (LoRA on a mixture of experts' experts is not supported)" if ".experts." in name else ""
            raise ValueError(f"LoRA adapter {path!r} changes {name}, which this model does not have{experts}; "
                             f"supported: {', '.join(sorted(SUPPORTED_TARGETS))} of its {layers} layers' attention "
                             f"and dense MLPs.")
        out_features, in_features = shapes[layer[2]]
        if pair.get("A") != (config.rank, in_features) or pair.get("B") != (out_features, config.rank):
            raise ValueError(f"LoRA adapter {path!r}: {name} is not a rank-{config.rank} pair for a "
                             f"{out_features} x {in_features} projection (A {pair.get('A')}, B {pair.get('B')}): "
                             f"an adapter of another model?")
    return config


def _pairs(path: str, tensors: dict) -> dict[str, dict]:
    """The adapter's (A, B) pairs (tensors, or their shapes) by the name of the module they change."""
    pairs: dict[str, dict] = {}
    for key, value in tensors.items():
        match = _TENSOR.fullmatch(key)
        if match is None:
            raise ValueError(f"LoRA adapter {path!r} holds {key!r}: only lora_A / lora_B weights of linear layers "
                             f"are supported.")
        pairs.setdefault(match[1], {})[match[2]] = value
    return pairs


def _tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    folder = Path(path)
    if (folder / "adapter_model.safetensors").is_file():
        from safetensors import safe_open
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    return {key: tuple(t.shape) for key, t in _read_tensors(path).items()}


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    folder = Path(path)
    if (folder / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file
        return load_file(str(folder / "adapter_model.safetensors"))
    if (folder / "adapter_model.bin").is_file():  # tensors only: never unpickle code from a file
        return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise ValueError(f"LoRA adapter {path!r} has no adapter_model.safetensors (or adapter_model.bin).")


def _on_other_stage(modules: dict[str, nn.Module], name: str) -> bool:
    """Whether module `name` belongs to a pipeline stage other than this worker's (a placeholder on its path)."""
    parts = name.split(".")
    return any(isinstance(modules.get(".".join(parts[:i])), PPMissingLayer) for i in range(1, len(parts)))


def load_adapter(path: str, model: nn.Module, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> dict[nn.Module, LoRAWeights]:
    """Each linear layer of this worker's shard the adapter changes, with the low-rank pair it adds (an adapter
    `check_adapter` passed for this model)."""
    config = read_adapter_config(path, max_rank)
    stacked = {ckpt: (ours, shard) for ckpt, ours, shard in getattr(model, "stacked_params", [])}
    modules = dict(model.named_modules())
    parts: dict[LinearBase, list[tuple[object, torch.Tensor, torch.Tensor]]] = {}
    for name, pair in _pairs(path, _read_tensors(path)).items():
        prefix, _, leaf = name.rpartition(".")
        ours, shard_id = stacked.get(leaf, (leaf, None))
        module = modules.get(f"{prefix}.{ours}")
        if module is None:
            if _on_other_stage(modules, name):
                continue
            raise ValueError(f"LoRA adapter {path!r} changes {name}, which this model does not have.")
        parts.setdefault(module, []).append((shard_id, pair["A"], pair["B"]))
    return {module: _pack(module, layer_parts, config, dtype, device) for module, layer_parts in parts.items()}


def _shard_order(module: LinearBase) -> list:
    if isinstance(module, QKVParallelLinear):
        return ["q", "k", "v"]
    if isinstance(module, MergedColumnParallelLinear):
        return list(range(len(module.output_sizes)))
    return [None]


def _pack(module: LinearBase, parts: list[tuple[object, torch.Tensor, torch.Tensor]], config: AdapterConfig,
          dtype: torch.dtype, device: torch.device) -> LoRAWeights:
    """The layer's projections' pairs as one: A's stacked, B's block-diagonal (scaled), cut to this rank."""
    order = _shard_order(module)
    parts = sorted(parts, key=lambda p: order.index(p[0]))
    r, (out_features, in_features) = config.rank, module.weight.shape
    a_all = torch.zeros(len(parts) * r, in_features)
    b_all = torch.zeros(out_features, len(parts) * r)
    for j, (shard_id, a, b) in enumerate(parts):
        offset = 0
        if isinstance(module, RowParallelLinear):
            a = module.shard(a)[1]
        else:
            offset, b = module.shard(b, shard_id)
        if a.size(1) != in_features or offset + b.size(0) > out_features:
            raise ValueError(f"A LoRA pair of shape {tuple(b.shape)} x {tuple(a.shape)} does not fit a layer of "
                             f"{out_features} x {in_features} (this rank's shard): an adapter of another model?")
        a_all[j * r:(j + 1) * r] = a.float()
        b_all[offset:offset + b.size(0), j * r:(j + 1) * r] = b.float() * config.scaling
    return LoRAWeights(a_all.to(device, dtype), b_all.to(device, dtype))


class AdapterCache:
    """A worker's loaded adapters, by id, up to `max_loras` (the least recently used is dropped for a new one;
    the scheduler runs no more adapters at once, and a step's own are never dropped)."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, dtype: torch.dtype, device: torch.device):
        self.model, self.max_loras, self.max_rank, self.dtype, self.device = model, max_loras, max_rank, dtype, device
        self.loaded: OrderedDict[int, dict[nn.Module, LoRAWeights]] = OrderedDict()

    def get(self, lora: LoRARequest, keep: set[int]) -> dict[nn.Module, LoRAWeights]:
        """The adapter's weights (loaded now if they are not); `keep`: the ids the step uses."""
        if lora.lora_int_id in self.loaded:
            self.loaded.move_to_end(lora.lora_int_id)
            return self.loaded[lora.lora_int_id]
        evictable = [i for i in self.loaded if i not in keep]   # least recently used first
        while evictable and len(self.loaded) >= self.max_loras:
            del self.loaded[evictable.pop(0)]
        weights = load_adapter(lora.lora_path, self.model, self.max_rank, self.dtype, self.device)
        self.loaded[lora.lora_int_id] = weights
        return weights
