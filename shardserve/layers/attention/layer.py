from __future__ import annotations

import torch
from torch import nn

from shardserve.layers.attention.backend import AttentionBackend, AttentionMetadata, get_attention_backend


def layer_sliding_window(hf_config, layer_index: int) -> int | None:
    """The sliding window of one decoder layer as the config gives it: per kind of layer where it lists them
    (`layer_types`: Gemma 3's five local layers to one global, Qwen2 with use_sliding_window), else on every
    layer (Mistral 7B v0.1's 4096); None: the layer sees every earlier token."""
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None)
    if not window or getattr(hf_config, "use_sliding_window", True) is False:
        return None
    if layer_types is not None:
        return window if layer_types[layer_index] == "sliding_attention" else None
    return window


class Attention(nn.Module):
    """Attention of one layer's local heads over its KV-cache shard (bound by the worker after allocation)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 backend: AttentionBackend | None = None, sliding_window: int | None = None,
                 softcap: float | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.sliding_window = sliding_window  # keys this layer sees back from each query (None: all)
        self.softcap = softcap  # logits capped as softcap * tanh(logits / softcap) (Gemma 2; None: not)
        self.backend = backend or get_attention_backend()
        self.kv_cache: torch.Tensor | None = None  # [2, num_blocks, num_kv_heads, block_size, head_dim]

    def kv_store(self, v: torch.Tensor, meta: AttentionMetadata) -> tuple | None:
        """(v: [T, kv_heads, head_dim], the cache, the step's slots) for the rotary kernel to write this step's
        keys and values with, where the backend lets it (layers/rotary.py); else None."""
        if not self.backend.kv_store_in_rotary or self.kv_cache is None or meta.slot_mapping is None:
            return None
        return v.view(-1, self.num_kv_heads, self.head_dim), self.kv_cache, meta.slot_mapping

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                kv_stored: bool = False) -> torch.Tensor:
        """q: [T, heads * head_dim], k/v: [T, kv_heads * head_dim] -> [T, heads * head_dim]. `kv_stored`: the
        rotary kernel has written k and v into the cache (`kv_store`)."""
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        return self.backend.forward(q, k, v, self.kv_cache, meta, self.scale, self.sliding_window,
                                   self.softcap, kv_stored).reshape(q.size(0), -1)
