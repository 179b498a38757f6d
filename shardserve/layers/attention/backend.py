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
    kv_slots: torch.Tensor | None  # [context_len + query_len] cache slots of all its tokens, in order


@dataclass
class AttentionMetadata:
    # [num_tokens] where each new token's K/V is written; None: the step keeps no KV (pooling models'
    # prefill-only steps), attention runs over the step's own tokens.
    slot_mapping: torch.Tensor | None
    block_size: int = 16
    num_decode_tokens: int = 0              # rows of one query token each (decodes, short chunks) come first
    decode_block_tables: torch.Tensor | None = None  # [num_decodes, max_blocks] long, padded with 0
    decode_seq_lens: torch.Tensor | None = None      # [num_decodes] long, tokens incl. the new one
    prefills: list[PrefillSeq] = field(default_factory=list)
    causal: bool = True
    _memo: dict = field(default_factory=dict, repr=False)

    def memo(self, key, compute):
        """What a backend derives from this step's metadata, computed by the first layer, reused by the rest."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def decode_slots_and_mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[num_decodes, max_len] cache slot of every key, and where a key exists."""
        def compute():
            bs = self.block_size
            pos = torch.arange(int(self.decode_seq_lens.max()), device=self.slot_mapping.device)
            slots = self.decode_block_tables[:, pos // bs] * bs + pos % bs
            return slots, pos[None, :] < self.decode_seq_lens[:, None]
        return self.memo("decode_slots", compute)


class AttentionBackend:
    name = "base"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor | None,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        raise NotImplementedError


def get_attention_backend(name: str | None = None) -> AttentionBackend:
    """`torch` (reference, any device), `cpu` (compiled paged decode), or `auto`: cpu where it builds."""
    name = (name or os.environ.get("SHARDSERVE_ATTENTION_BACKEND", "auto")).lower()
    from shardserve.layers.attention.torch_backend import TorchAttentionBackend
    if name == "torch":
        return TorchAttentionBackend()
    if name in ("auto", "cpu"):
        from shardserve.layers.attention import cpu_backend
        if cpu_backend.available():
            return cpu_backend.CpuPagedAttentionBackend()
        if name == "cpu":
            raise RuntimeError(f"The cpu attention backend could not be built: {cpu_backend.build_error()}")
        return TorchAttentionBackend()
    raise ValueError(f"Unknown attention backend {name!r}; available: auto, torch, cpu.")
