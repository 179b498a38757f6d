"""Reading a PEFT LoRA adapter, cut to this worker's shard of the model.

An adapter adds `scaling * B @ A` to some of the model's linear weights (A: rank x in, B: out x rank). The base
weights stay as they are: each linear layer adds `x A^T B^T` to its output for the rows of the requests that
use the adapter (`lora/layers.py`), so requests of many adapters, and of none, share a step.

Where the model stores projections merged (q, k, v in `qkv_proj`; gate and up in `gate_up_proj`), their A's are
stacked and their B's placed block-diagonally, so the merged layer adds them all with two matmuls. Each tensor-
parallel rank keeps the slice its layer keeps: a column-parallel layer the rows of B (as its weight's rows), a
row-parallel one the columns of A (its partial product joins the layer's own before the all-reduce).

A mixture of experts' adapter changes the router (`gate`) and the experts, in either of PEFT's formats: a pair
per expert and projection (`experts.<e>.gate_proj`, Mixtral's `w1`; PEFT on transformers 4's experts), or one
pair per stacked parameter with every expert's rows in it (`target_parameters`, PEFT on transformers 5's
`gate_up_proj` and `down_proj`, saved as `experts.base_layer` and `experts`). Both become a pair per expert for
each of the model's stacked projections (layers/fused_moe.py). Per-module ranks and alphas (`rank_pattern`,
`alpha_pattern`) follow PEFT's rule; PEFT writes them when it stacks transformers 4 adapters for transformers 5.
"""
from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from shardserve.layers.fused_moe import FusedMoE
from shardserve.layers.linear import LinearBase, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from shardserve.lora.layers import LoRATarget, LoRAWeights
from shardserve.lora.request import LoRARequest
from shardserve.models.moe import is_sparse_layer, num_experts
from shardserve.models.registry import resolve_model_class
from shardserve.models.pipeline import PPMissingLayer

# The checkpoint's linear layers an adapter may change: those of Llama-style decoders, and a mixture of experts'
# router (`gate`; Qwen2-MoE's `shared_expert_gate` too) and experts (Mixtral's are w1, w3 and w2).
SUPPORTED_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                               "gate", "shared_expert_gate", "w1", "w2", "w3"})
_TENSOR = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight")
# the module an expert's pair changes: PEFT's per expert "<experts>.<e>.<projection>", or stacked (every expert's
# rows in one pair) "<experts>.base_layer" (gate_up_proj) and "<experts>" (down_proj)
_EXPERTS = re.compile(r"(.+\.experts)(?:\.(\d+)\.(\w+)|\.(base_layer))?")


@dataclass(frozen=True)
class AdapterConfig:
    rank: int
    alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)    # PEFT's: a module name pattern -> its rank
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # and -> its alpha

    def rank_and_scaling(self, module: str) -> tuple[int, float]:
        """The rank and the scaling (alpha / rank, or / sqrt(rank) with rsLoRA) of the pair that changes `module`
        (its name in the adapter). PEFT's rule: the first pattern that matches the end of the name at a dot wins."""
        if module.endswith(".experts.base_layer"):  # PEFT names stacked experts' pairs by module, their patterns
            module = module.removesuffix(".base_layer") + ".gate_up_proj"  # by parameter
        elif module.endswith(".experts"):
            module += ".down_proj"
        rank = next((r for key, r in self.rank_pattern.items() if re.match(rf"(.*\.)?({key})$", module)), self.rank)
        alpha = next((a for key, a in self.alpha_pattern.items() if re.match(rf"(.*\.)?({key})$", module)),
                     self.alpha)
        return rank, alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


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
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise ValueError(f"LoRA adapter {path!r}: rank_pattern and alpha_pattern must map module names to values.")
    for where, rank in [("r", config.get("r"))] + [(f"rank_pattern[{k!r}]", r) for k, r in rank_pattern.items()]:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA adapter {path!r} has no valid rank {where}: {rank!r}.")
        if rank > max_rank:
            raise ValueError(f"LoRA rank {rank} ({where}) of adapter {path!r} is greater than "
                             f"max_lora_rank={max_rank}.")
    alpha = config.get("lora_alpha", config["r"])
    alphas = [("lora_alpha", alpha)] + [(f"alpha_pattern[{k!r}]", a) for k, a in alpha_pattern.items()]
    for where, alpha_value in alphas:
        if isinstance(alpha_value, bool) or not isinstance(alpha_value, (int, float)):
            raise ValueError(f"LoRA adapter {path!r} has no valid {where}: {alpha_value!r}.")
    for key, what in [("modules_to_save", "modules_to_save"), ("use_dora", "DoRA"),
                      ("layers_to_transform", "layers_to_transform")]:
        if config.get(key):
            raise ValueError(f"LoRA adapter {path!r} uses {what}, which is not supported.")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise ValueError(f"LoRA adapter {path!r} trains biases (bias={config.get('bias')!r}), which is not "
                         f"supported.")
    targets = config.get("target_modules")
    if isinstance(targets, list):  # names, or paths (PEFT writes paths when it was given modules one by one)
        unsupported = sorted({name.rpartition(".")[2] for name in targets} - SUPPORTED_TARGETS)
        if unsupported:
            raise ValueError(f"LoRA adapter {path!r} targets {unsupported}; supported: "
                             f"{', '.join(sorted(SUPPORTED_TARGETS))}.")
    return AdapterConfig(config["r"], alpha, bool(config.get("use_rslora")), rank_pattern, alpha_pattern)


# The model families whose layers carry these projections (lora_modules under other models are refused).
SUPPORTED_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                     "Qwen3ForCausalLM", "Gemma3ForCausalLM", "Gemma2ForCausalLM",
                                     "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"})
_MOE_ARCHITECTURES = frozenset({"MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"})


@dataclass(frozen=True)
class Target:
    """A projection an adapter may change, whole (not sharded): its pair is A (rank, in), B (out, rank), or for
    PEFT's stacked experts (`experts` > 0) A (experts * rank, in), B (out, experts * rank)."""
    out_features: int
    in_features: int
    experts: int = 0


def target_shapes(hf_config, layer: int) -> dict[str, Target]:
    """Each projection an adapter may change in decoder layer `layer` of this config's model, by its path in the
    layer ("self_attn.q_proj", "mlp.down_proj", "mlp.experts.3.w1", "mlp.experts.base_layer", ...)."""
    hidden, heads = hf_config.hidden_size, hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    q, kv = heads * head_dim, (getattr(hf_config, "num_key_value_heads", None) or heads) * head_dim
    shapes = {"self_attn.q_proj": Target(q, hidden), "self_attn.k_proj": Target(kv, hidden),
              "self_attn.v_proj": Target(kv, hidden), "self_attn.o_proj": Target(hidden, q)}
    mlp, inter = "mlp", hf_config.intermediate_size
    if set(getattr(hf_config, "architectures", None) or []) & _MOE_ARCHITECTURES and is_sparse_layer(hf_config, layer):
        mlp, inter = "mlp.shared_expert", getattr(hf_config, "shared_expert_intermediate_size", 0)
        shapes |= _expert_targets(hf_config)
        if inter:
            shapes["mlp.shared_expert_gate"] = Target(1, hidden)
    if inter:
        shapes |= {f"{mlp}.gate_proj": Target(inter, hidden), f"{mlp}.up_proj": Target(inter, hidden),
                   f"{mlp}.down_proj": Target(hidden, inter)}
    return shapes


def _expert_targets(hf_config) -> dict[str, Target]:
    """A sparse layer's router and experts, in both of PEFT's formats."""
    hidden, experts = hf_config.hidden_size, num_experts(hf_config)
    inter = getattr(hf_config, "moe_intermediate_size", None) or hf_config.intermediate_size
    shapes = {"mlp.gate": Target(experts, hidden),
              "mlp.experts.base_layer": Target(2 * inter, hidden, experts),
              "mlp.experts": Target(hidden, inter, experts)}
    for name, (_, projection) in resolve_model_class(hf_config).expert_projections.items():
        shape = Target(hidden, inter) if projection == "down" else Target(inter, hidden)
        shapes |= {f"mlp.experts.{e}.{name}": shape for e in range(experts)}
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
    targets_of_layer: dict[int, dict[str, Target]] = {}
    for name, pair in _pairs(path, _tensor_shapes(path)).items():
        layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if layer and int(layer[1]) < layers and int(layer[1]) not in targets_of_layer:
            targets_of_layer[int(layer[1])] = target_shapes(hf_config, int(layer[1]))
        target = targets_of_layer.get(int(layer[1]), {}).get(layer[2]) if layer else None
        if target is None:
            raise ValueError(f"LoRA adapter {path!r} changes {name}, which this model does not have; supported: "
                             f"{', '.join(sorted(SUPPORTED_TARGETS))} of its {layers} layers' attention, MLPs, "
                             f"routers and experts.")
        rank, _ = config.rank_and_scaling(name)
        columns = rank * max(target.experts, 1)
        if pair.get("A") != (columns, target.in_features) or pair.get("B") != (target.out_features, columns):
            of_experts = f" of {target.experts} experts" if target.experts else ""
            raise ValueError(f"LoRA adapter {path!r}: {name} is not a rank-{rank} pair for a {target.out_features} x "
                             f"{target.in_features} projection{of_experts} (A {pair.get('A')}, B {pair.get('B')}): "
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
        # Mixtral's MLP is `block_sparse_moe` in transformers 4's names, `mlp` in ours and transformers 5's
        pairs.setdefault(match[1].replace(".block_sparse_moe.", ".mlp."), {})[match[2]] = value
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
                 device: torch.device) -> dict[LoRATarget, LoRAWeights]:
    """Each linear layer (and stacked projection of experts) of this worker's shard the adapter changes, with the
    low-rank pair it adds (an adapter `check_adapter` passed for this model)."""
    config = read_adapter_config(path, max_rank)
    stacked = {ckpt: (ours, shard) for ckpt, ours, shard in getattr(model, "stacked_params", [])}
    modules = dict(model.named_modules())
    parts: dict[LinearBase, list[tuple[object, torch.Tensor, torch.Tensor, float]]] = {}
    expert_parts: dict[tuple[FusedMoE, str], dict[int, list]] = {}  # (experts, "w13"/"w2") -> expert -> pairs
    for name, pair in _pairs(path, _read_tensors(path)).items():
        rank, scaling = config.rank_and_scaling(name)
        expert = _EXPERTS.fullmatch(name)
        if expert and isinstance(modules.get(expert[1]), FusedMoE):
            moe = modules[expert[1]]
            if expert[2] is not None:  # one expert's projection
                param, projection = model.expert_projections[expert[3]]
                expert_parts.setdefault((moe, param), {}).setdefault(int(expert[2]), []).append(
                    (projection, pair["A"], pair["B"], scaling))
                continue
            # every expert's pair in one: A's rows expert by expert, B's columns rank by rank (PEFT's layout)
            a = pair["A"].reshape(moe.num_experts, rank, -1)
            b = pair["B"].reshape(pair["B"].size(0), rank, moe.num_experts).permute(2, 0, 1)
            param, projection = ("w13", "gate_up") if expert[4] else ("w2", "down")
            for e in range(moe.num_experts):
                expert_parts.setdefault((moe, param), {}).setdefault(e, []).append((projection, a[e], b[e], scaling))
            continue
        prefix, _, leaf = name.rpartition(".")
        ours, shard_id = stacked.get(leaf, (leaf, None))
        module = modules.get(f"{prefix}.{ours}")
        if module is None:
            if _on_other_stage(modules, name):
                continue
            raise ValueError(f"LoRA adapter {path!r} changes {name}, which this model does not have.")
        parts.setdefault(module, []).append((shard_id, pair["A"], pair["B"], scaling))
    weights: dict[LoRATarget, LoRAWeights] = {module: _pack(module, layer_parts, dtype, device)
                                              for module, layer_parts in parts.items()}
    for (moe, param), by_expert in expert_parts.items():
        weights[moe, param] = _pack_experts(moe, param, by_expert, dtype, device)
    return weights


def _shard_order(module: LinearBase) -> list:
    if isinstance(module, QKVParallelLinear):
        return ["q", "k", "v"]
    if isinstance(module, MergedColumnParallelLinear):
        return list(range(len(module.output_sizes)))
    return [None]


def _pack(module: LinearBase, parts: list[tuple[object, torch.Tensor, torch.Tensor, float]], dtype: torch.dtype,
          device: torch.device) -> LoRAWeights:
    """The layer's projections' pairs as one: A's stacked, B's block-diagonal (scaled), cut to this rank."""
    order = _shard_order(module)
    parts = sorted(parts, key=lambda p: order.index(p[0]))
    out_features, in_features = module.weight.shape
    a_all = torch.zeros(sum(a.size(0) for _, a, _, _ in parts), in_features)
    b_all = torch.zeros(out_features, a_all.size(0))
    column = 0
    for shard_id, a, b, scaling in parts:
        offset, rank = 0, a.size(0)
        if isinstance(module, RowParallelLinear):
            a = module.shard(a)[1]
        else:
            offset, b = module.shard(b, shard_id)
        if a.size(1) != in_features or offset + b.size(0) > out_features:
            raise ValueError(f"A LoRA pair of shape {tuple(b.shape)} x {tuple(a.shape)} does not fit a layer of "
                             f"{out_features} x {in_features} (this rank's shard): an adapter of another model?")
        a_all[column:column + rank] = a.float()
        b_all[offset:offset + b.size(0), column:column + rank] = b.float() * scaling
        column += rank
    return LoRAWeights(a_all.to(device, dtype), b_all.to(device, dtype))


def _pack_experts(moe: FusedMoE, param: str, by_expert: dict[int, list[tuple[str, torch.Tensor, torch.Tensor,
                                                                             float]]],
                  dtype: torch.dtype, device: torch.device) -> LoRAWeights:
    """The experts' pairs for one stacked projection ("w13": gate and up, or "w13" whole as "gate_up"; "w2":
    down) as A (experts, columns, in) and B (experts, out, columns), each expert's pairs side by side as `_pack`
    places a layer's, cut to this rank; experts the adapter leaves alone get zeros."""
    out_features, in_features = ((2 * moe.intermediate, moe.hidden_size) if param == "w13"
                                 else (moe.hidden_size, moe.intermediate))
    columns = max(sum(a.size(0) for _, a, _, _ in pairs) for pairs in by_expert.values())
    a_all = torch.zeros(moe.num_experts, columns, in_features)
    b_all = torch.zeros(moe.num_experts, out_features, columns)
    for e, pairs in by_expert.items():
        column = 0
        for projection, a, b, scaling in pairs:
            rank = a.size(0)
            if projection == "down":
                a = moe.shard(a, "down")[1]
                pieces = [("down", b)]
            else:  # PEFT's stacked gate_up_proj: the gate's rows above the up's
                pieces = [("gate", b[:len(b) // 2]), ("up", b[len(b) // 2:])] if projection == "gate_up" \
                    else [(projection, b)]
            a_all[e, column:column + rank] = a.float()
            for piece_projection, piece in pieces:
                offset, piece = (0, piece) if piece_projection == "down" else moe.shard(piece, piece_projection)
                b_all[e, offset:offset + piece.size(0), column:column + rank] = piece.float() * scaling
            column += rank
    return LoRAWeights(a_all.to(device, dtype), b_all.to(device, dtype))


class AdapterCache:
    """A worker's loaded adapters, by id, up to `capacity` (vLLM's max_cpu_loras; the least recently used is
    dropped for a new one; the scheduler runs at most max_loras <= capacity at once, and a step's own are never
    dropped)."""

    def __init__(self, model: nn.Module, capacity: int, max_rank: int, dtype: torch.dtype, device: torch.device):
        self.model, self.capacity, self.max_rank, self.dtype, self.device = model, capacity, max_rank, dtype, device
        self.loaded: OrderedDict[int, dict[LoRATarget, LoRAWeights]] = OrderedDict()

    def get(self, lora: LoRARequest, keep: set[int]) -> dict[LoRATarget, LoRAWeights]:
        """The adapter's weights (loaded now if they are not); `keep`: the ids the step uses."""
        if lora.lora_int_id in self.loaded:
            self.loaded.move_to_end(lora.lora_int_id)
            return self.loaded[lora.lora_int_id]
        evictable = [i for i in self.loaded if i not in keep]   # least recently used first
        while evictable and len(self.loaded) >= self.capacity:
            del self.loaded[evictable.pop(0)]
        weights = load_adapter(lora.lora_path, self.model, self.max_rank, self.dtype, self.device)
        self.loaded[lora.lora_int_id] = weights
        return weights
