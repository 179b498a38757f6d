"""Pure-torch attention over the paged KV cache; runs anywhere and is the reference for other backends."""
from __future__ import annotations

import torch

from shardserve.layers.attention.backend import AttentionBackend, AttentionMetadata
from shardserve.layers.attention.packed import equal_length_runs, packed_self_attention, sdpa, window_mask


def _rows(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Row index of each (slot, head) in the cache viewed as [num_blocks * Hkv * block_size, D]."""
    num_kv_heads, bs = cache.shape[1], cache.shape[2]
    heads = torch.arange(num_kv_heads, device=slots.device)
    return ((slots // bs * num_kv_heads).unsqueeze(-1) + heads) * bs + (slots % bs).unsqueeze(-1)


def write_kv(cache: torch.Tensor, rows: torch.Tensor, x: torch.Tensor) -> None:
    """cache: [num_blocks, Hkv, block_size, D] (one head's tokens of a block are contiguous); x: [T, Hkv, D];
    rows: `_rows(cache, slot_mapping)` flattened."""
    cache.view(-1, cache.shape[-1]).index_copy_(0, rows, x.reshape(-1, x.shape[-1]))


def read_kv(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The cached rows of `slots` (any shape S) as [*S, Hkv, D]."""
    rows = _rows(cache, slots)
    return cache.view(-1, cache.shape[-1]).index_select(0, rows.view(-1)).view(*rows.shape, cache.shape[-1])


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float,
                sliding_window: int | None = None, softcap: float | None = None,
                kv_stored: bool = False) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, Hkv, D]; kv_cache: [2, num_blocks, Hkv, block_size, D] or None."""
        if meta.slot_mapping is None:
            return self.self_attention(q, k, v, meta, scale, sliding_window, softcap)
        if kv_cache is not None and not kv_stored:
            self.store_kv(k, v, kv_cache, meta)
        nd = meta.num_decode_tokens
        if nd == q.size(0):  # a decode-only step
            return self.decode(q, kv_cache, meta, scale, sliding_window, softcap)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self.decode(q[:nd], kv_cache, meta, scale, sliding_window, softcap)
        for seq in meta.prefills:
            rows = slice(seq.query_start, seq.query_start + seq.query_len)
            out[rows] = self.prefill(q[rows], k[rows], v[rows], kv_cache, seq, meta, scale, sliding_window, softcap)
        return out

    def store_kv(self, k, v, kv_cache, meta: AttentionMetadata) -> None:
        """The step's new keys and values into the cache at their slots."""
        rows = meta.memo(("write_rows", kv_cache.shape), lambda: _rows(kv_cache[0], meta.slot_mapping).view(-1))
        write_kv(kv_cache[0], rows, k)
        write_kv(kv_cache[1], rows, v)

    def self_attention(self, q, k, v, meta: AttentionMetadata, scale: float,
                       sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """A step without a KV cache (pooling models): every prompt attends to its own tokens only, prompts
        of one length side by side as one batch (layers/attention/packed.py)."""
        runs = meta.memo("equal_length_runs", lambda: equal_length_runs(
            [s.query_start for s in meta.prefills], [s.query_len for s in meta.prefills]))
        return packed_self_attention(q, k, v, runs, scale, meta.causal, sliding_window, softcap)

    def decode(self, q, kv_cache, meta: AttentionMetadata, scale: float,
               sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """One query token per sequence against its whole cached context (or its window of it)."""
        slots, mask = meta.decode_slots_and_mask(sliding_window)
        k, v = read_kv(kv_cache[0], slots), read_kv(kv_cache[1], slots)
        o = sdpa(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), scale, mask[:, None, None, :], False, softcap)
        return o.squeeze(2)

    def prefill(self, q, k, v, kv_cache, seq, meta: AttentionMetadata, scale: float,
                sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """Several query tokens of one sequence, over its cached prefix (if any) and themselves."""
        cached = seq.context_len and kv_cache is not None
        if cached:
            k, v = read_kv(kv_cache[0], seq.kv_slots), read_kv(kv_cache[1], seq.kv_slots)
        first = seq.context_len if cached else 0  # the first query's position (and its key's row)
        causal = meta.causal or bool(cached)
        if not sliding_window or (not cached and seq.query_len <= sliding_window):
            mask = None
            if cached:  # the same for every layer: built by the first
                mask = meta.memo(("prefill_mask", seq.query_start), lambda: window_mask(
                    torch.arange(seq.query_len, device=q.device) + first, k.size(0), True, None))
            return _rows_attention(q, k, v, scale, mask, causal and mask is None, softcap)
        # Keys past the window: a window's worth of queries at a time, each block over the keys its window
        # reaches (at most twice the window) rather than all of them under a mask.
        outs = []
        for i in range(0, seq.query_len, sliding_window):
            end = first + min(i + sliding_window, seq.query_len)  # one past the block's last query
            lo = max(0, first + i - sliding_window + 1)
            hi = end if causal else min(k.size(0), end + sliding_window - 1)
            mask = meta.memo(("prefill_mask", seq.query_start, sliding_window, i), lambda: window_mask(
                torch.arange(first + i - lo, end - lo, device=q.device), hi - lo, causal, sliding_window))
            outs.append(_rows_attention(q[i:i + sliding_window], k[lo:hi], v[lo:hi], scale, mask, False, softcap))
        return torch.cat(outs)


def _rows_attention(q, k, v, scale, mask, causal, softcap=None) -> torch.Tensor:
    """q: [Lq, H, D]; k, v: [Lk, Hkv, D] of one sequence -> [Lq, H, D]."""
    o = sdpa(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0), scale,
             mask, causal, softcap)
    return o.squeeze(0).transpose(0, 1)
