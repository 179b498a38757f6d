"""Rotary position embedding with the frequencies (and any rope scaling) that transformers computes."""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from shardserve.layers import fused_kernels


def rope_inv_freq(hf_config, head_dim: int, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """`layer_type`: for models whose kinds of layer rotate differently (Gemma 3: "sliding_attention" and
    "full_attention"), the kind whose frequencies these are."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    kwargs = {}
    if layer_type is not None and layer_type in params:  # transformers 5: one entry per kind of layer
        params, kwargs = dict(params[layer_type]), {"layer_type": layer_type}
    elif not params:  # transformers < 5 keeps these as separate fields
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        if layer_type == "sliding_attention" and hasattr(hf_config, "rope_local_base_freq"):
            params = {"rope_type": "default", "rope_theta": hf_config.rope_local_base_freq}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        base = params["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"Unsupported rope type {rope_type!r}; supported: default, {', '.join(ROPE_INIT_FUNCTIONS)}.")
    return ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"), **kwargs)


class RotaryEmbedding(nn.Module):
    """Neox-style rotation (halves, not interleaved pairs), as the HF Llama family stores its weights."""

    def __init__(self, hf_config, head_dim: int, max_position: int, layer_type: str | None = None):
        super().__init__()
        # Computed on the CPU in fp32 (as transformers does), then placed where the model is being built:
        # the device of an enclosing `torch.device(...)` block.
        device = torch.get_default_device()
        with torch.device("cpu"):
            inv_freq, scaling = rope_inv_freq(hf_config, head_dim, layer_type)
            freqs = torch.outer(torch.arange(max_position, dtype=torch.float), inv_freq)
            cache = torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1)
        self.register_buffer("cos_sin_cache", cache.to(device), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, 1, head_dim / 2] each; computed once per step and shared by every layer."""
        cos, sin = self.cos_sin_cache[positions].to(dtype).unsqueeze(1).chunk(2, dim=-1)
        return cos, sin


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 kv_store: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """q: [T, heads, head_dim], k: [T, kv_heads, head_dim] -> (q, k, whether k and v were stored). Rotated in
    place by one fused kernel where it builds (q and k are views of the step's fresh QKV projection, read by
    nothing else); on a GPU that kernel also writes k and v into the KV cache when given `kv_store`
    (`Attention.kv_store`), one launch fewer a layer."""
    if fused_kernels.enabled(q) and q.stride(-1) == 1 and k.stride(-1) == 1:
        kv_store = kv_store if q.is_cuda else None  # (the CPUs' C kernel only rotates)
        fused_kernels.rotary_(q, k, cos, sin, kv_store=kv_store)
        return q, k, kv_store is not None
    return _rotate(q, cos, sin), _rotate(k, cos, sin), False


def apply_qk_norm_rotary(q: torch.Tensor, k: torch.Tensor, q_norm: nn.Module, k_norm: nn.Module,
                         cos: torch.Tensor, sin: torch.Tensor,
                         kv_store: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Per-head RMSNorm of q and k (Qwen3's, Gemma 3's), then `apply_rotary`. On a GPU one kernel does all
    of it in place (and the KV store), where the norms alone would copy q and k out of the QKV output and
    launch two more."""
    if q.is_cuda and fused_kernels.enabled(q) and q.stride(-1) == 1 and k.stride(-1) == 1 and \
            q_norm.eps == k_norm.eps:
        fused_kernels.rotary_(q, k, cos, sin, (q_norm.weight, k_norm.weight), q_norm.eps, kv_store)
        return q, k, kv_store is not None
    return apply_rotary(q_norm(q), k_norm(k), cos, sin, kv_store)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
