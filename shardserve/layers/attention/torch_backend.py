"""Pure-torch attention over the paged KV cache; runs anywhere and is the reference for other backends."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from shardserve.layers.attention.backend import AttentionBackend, AttentionMetadata


def _sdpa(q, k, v, scale, mask=None, causal=False):
    """q: [B, H, Lq, D]; k, v: [B, Hkv, Lk, D]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=q.size(1) != k.size(1))


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, Hkv, D]; kv_cache: [2, num_blocks, block_size, Hkv, D] or None."""
        if kv_cache is not None:
            kv_cache[0].view(-1, *k.shape[1:]).index_copy_(0, meta.slot_mapping, k)
            kv_cache[1].view(-1, *v.shape[1:]).index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        nd = meta.num_decode_tokens
        if nd:
            out[:nd] = self.decode(q[:nd], kv_cache, meta, scale)
        for seq in meta.prefills:
            rows = slice(seq.query_start, seq.query_start + seq.query_len)
            out[rows] = self.prefill(q[rows], k[rows], v[rows], kv_cache, seq, meta.causal, scale)
        return out

    def decode(self, q, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """One query token per sequence against its whole cached context."""
        slots, mask = meta.decode_slots_and_mask()
        shape = (*slots.shape, *kv_cache.shape[-2:])
        k = kv_cache[0].view(-1, *kv_cache.shape[-2:]).index_select(0, slots.view(-1)).view(shape)
        v = kv_cache[1].view(-1, *kv_cache.shape[-2:]).index_select(0, slots.view(-1)).view(shape)
        o = _sdpa(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), scale, mask[:, None, None, :])
        return o.squeeze(2)

    def prefill(self, q, k, v, kv_cache, seq, causal: bool, scale: float) -> torch.Tensor:
        """Several query tokens of one sequence, over its cached prefix (if any) and themselves."""
        mask = None
        if seq.context_len and kv_cache is not None:
            k = kv_cache[0].view(-1, *k.shape[1:]).index_select(0, seq.kv_slots)
            v = kv_cache[1].view(-1, *v.shape[1:]).index_select(0, seq.kv_slots)
            query_pos = torch.arange(seq.query_len, device=q.device) + seq.context_len
            mask = torch.arange(k.size(0), device=q.device)[None, :] <= query_pos[:, None]
            causal = False
        o = _sdpa(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                  v.transpose(0, 1).unsqueeze(0), scale, mask, causal)
        return o.squeeze(0).transpose(0, 1)
