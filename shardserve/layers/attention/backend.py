"""The attention backend interface: what a step's batch looks like to attention, and who computes it.

The model runner builds one `AttentionMetadata` per step; every attention layer hands it, its q/k/v and
its KV-cache shard to the backend. Backends differ in kernels, never in what they compute.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch


@dataclass
class PrefillSeq:
    """One request in the step whose query has several tokens (a prompt, a chunk of one, or a recompute)."""
    query_start: int          # offset of its first query token in the flattened batch
    query_len: int
    context_len: int          # tokens already in the KV cache before this step
    kv_slots: torch.Tensor    # [context_len + query_len] cache slots of all its tokens, in order


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor              # [num_tokens] where each new token's K/V is written
    num_decode_tokens: int = 0              # decodes (one query token each) come first in the batch
    decode_kv_slots: torch.Tensor | None = None   # [num_decodes, max_len] cache slots, padded
    decode_mask: torch.Tensor | None = None       # [num_decodes, 1, 1, max_len] True where a key exists
    prefills: list[PrefillSeq] = field(default_factory=list)
    causal: bool = True


class AttentionBackend:
    name = "base"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor | None,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        raise NotImplementedError


def get_attention_backend(name: str | None = None) -> AttentionBackend:
    name = name or os.environ.get("SHARDSERVE_ATTENTION_BACKEND", "auto")
    if name in ("auto", "torch", "TORCH_SDPA"):
        from shardserve.layers.attention.torch_backend import TorchAttentionBackend
        return TorchAttentionBackend()
    raise ValueError(f"Unknown attention backend {name!r}; available: torch.")
