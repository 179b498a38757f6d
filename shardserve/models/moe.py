"""Mixtures of experts on Llama's decoder: Mixtral, Qwen2-MoE and Qwen3-MoE.

Attention is the family's dense one (Mixtral: Mistral's, Qwen2-MoE: with QKV bias, Qwen3-MoE: with QK-norm).
The MLP of a sparse layer routes each token to its top-k experts (layers/fused_moe.py):
    x += sum over e in topk(softmax(router(x))) of p_e * SwiGLU_e(x)
and Qwen2-MoE adds a shared expert that every token takes, gated by its own sigmoid:
    x += ... + sigmoid(gate(x)) * SwiGLU_shared(x)
Qwen MoEs may keep some layers dense (`mlp_only_layers`, `decoder_sparse_step`).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from shardserve.layers.fused_moe import FusedMoE
from shardserve.layers.linear import ReplicatedLinear
from shardserve.models.llama import LlamaForCausalLM, LlamaMLP


def num_experts(config) -> int:
    return getattr(config, "num_experts", None) or config.num_local_experts


def is_sparse_layer(config, layer_index: int) -> bool:
    """Whether the layer's MLP is a mixture of experts (Mixtral: every layer; Qwen MoEs: all but
    `mlp_only_layers`, every `decoder_sparse_step`-th)."""
    return layer_index not in (getattr(config, "mlp_only_layers", None) or []) and bool(num_experts(config)) \
        and (layer_index + 1) % (getattr(config, "decoder_sparse_step", None) or 1) == 0


class SparseMoeBlock(nn.Module):
    def __init__(self, config, intermediate_size: int, renormalize: bool, shared_expert_size: int = 0):
        super().__init__()
        hidden = config.hidden_size
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"Unsupported activation {config.hidden_act!r} for the experts (silu only).")
        self.gate = ReplicatedLinear(hidden, num_experts(config))
        self.experts = FusedMoE(num_experts(config), config.num_experts_per_tok, hidden, intermediate_size,
                                renormalize)
        self.has_shared_expert = bool(shared_expert_size)
        if self.has_shared_expert:
            self.shared_expert = LlamaMLP(config, intermediate_size=shared_expert_size)
            self.shared_expert_gate = ReplicatedLinear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.has_shared_expert:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class MixtralForCausalLM(LlamaForCausalLM):
    """Every layer sparse; experts' weights are w1 (gate), w3 (up) and w2 (down), under `block_sparse_moe`."""
    expert_projections = {"w1": ("w13", "gate"), "w3": ("w13", "up"), "w2": ("w2", "down")}
    # the experts' token-dependent grouping is not captured in CUDA graphs: decode steps run eagerly
    supports_cuda_graphs = False

    def build_mlp(self, config, layer_index: int) -> nn.Module:
        return SparseMoeBlock(config, config.intermediate_size, renormalize=True)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights((name.replace(".block_sparse_moe.", ".mlp."), t) for name, t in weights)


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    qk_norm = True
    expert_projections = {"gate_proj": ("w13", "gate"), "up_proj": ("w13", "up"), "down_proj": ("w2", "down")}
    supports_cuda_graphs = False
    shared_expert = False

    def build_mlp(self, config, layer_index: int) -> nn.Module | None:
        if not is_sparse_layer(config, layer_index):
            return None  # a dense layer
        shared = getattr(config, "shared_expert_intermediate_size", 0) if self.shared_expert else 0
        return SparseMoeBlock(config, config.moe_intermediate_size, getattr(config, "norm_topk_prob", False),
                              shared)


class Qwen2MoeForCausalLM(Qwen3MoeForCausalLM):
    qk_norm = False
    qkv_bias = True
    shared_expert = True
