from __future__ import annotations

import torch
from torch import nn

from shardserve.layers.attention.backend import AttentionBackend, AttentionMetadata, get_attention_backend


class Attention(nn.Module):
    """Attention of one layer's local heads over its KV-cache shard (bound by the worker after allocation)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 backend: AttentionBackend | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.backend = backend or get_attention_backend()
        self.kv_cache: torch.Tensor | None = None  # [2, num_blocks, num_kv_heads, block_size, head_dim]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, heads * head_dim], k/v: [T, kv_heads * head_dim] -> [T, heads * head_dim]."""
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        return self.backend.forward(q, k, v, self.kv_cache, meta, self.scale).reshape(q.size(0), -1)
