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
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        if kv_cache is not None:
            k_cache = kv_cache[0].view(-1, num_kv_heads, head_dim)
            v_cache = kv_cache[1].view(-1, num_kv_heads, head_dim)
            k_cache.index_copy_(0, meta.slot_mapping, k)
            v_cache.index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        nd = meta.num_decode_tokens
        if nd:
            num_decodes, max_len = meta.decode_kv_slots.shape
            slots = meta.decode_kv_slots.view(-1)
            kd = k_cache.index_select(0, slots).view(num_decodes, max_len, num_kv_heads, head_dim)
            vd = v_cache.index_select(0, slots).view(num_decodes, max_len, num_kv_heads, head_dim)
            o = _sdpa(q[:nd].unsqueeze(2), kd.transpose(1, 2), vd.transpose(1, 2), scale, meta.decode_mask)
            out[:nd] = o.squeeze(2)
        for seq in meta.prefills:
            qs = q[seq.query_start:seq.query_start + seq.query_len].transpose(0, 1).unsqueeze(0)
            if seq.context_len == 0 or kv_cache is None:
                ks = k[seq.query_start:seq.query_start + seq.query_len]
                vs = v[seq.query_start:seq.query_start + seq.query_len]
                mask, causal = None, meta.causal
            else:
                ks = k_cache.index_select(0, seq.kv_slots)
                vs = v_cache.index_select(0, seq.kv_slots)
                query_pos = torch.arange(seq.query_len, device=q.device) + seq.context_len
                mask = torch.arange(ks.size(0), device=q.device)[None, :] <= query_pos[:, None]
                causal = False
            o = _sdpa(qs, ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0), scale, mask, causal)
            out[seq.query_start:seq.query_start + seq.query_len] = o.squeeze(0).transpose(0, 1)
        return out
