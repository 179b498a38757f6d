"""CPU attention: decode reads the paged KV cache in place with a small compiled C kernel.

The pure-torch backend must gather every decode's keys and values into a padded copy each layer; on a
CPU that copy costs as much as the attention itself. The decode kernel reads fp32 and bf16 caches. New keys
and values go into the cache by slot with a kernel too, straight from their strided views of the QKV output.
The kernels (csrc/paged_decode_attention.c) come from the package's C library (layers/cpu_kernels.py); where
that cannot be built, `auto` falls back to the torch backend. Prefill stays on torch SDPA.
"""
from __future__ import annotations

import torch

from shardserve.layers import cpu_kernels
from shardserve.layers.attention.backend import AttentionMetadata
from shardserve.layers.attention.torch_backend import TorchAttentionBackend


def _runs(*tensors: torch.Tensor) -> bool:
    """Whether the C kernels take these: CPU tensors of one dtype, fp32 or bf16, whose last dimension is
    contiguous."""
    return all(t.device.type == "cpu" and t.dtype == tensors[0].dtype and t.stride(-1) == 1 for t in tensors) \
        and tensors[0].dtype in cpu_kernels.DTYPES


class CpuPagedAttentionBackend(TorchAttentionBackend):
    name = "cpu"

    def store_kv(self, k, v, kv_cache, meta: AttentionMetadata) -> None:
        if not _runs(k, v, kv_cache):
            return super().store_kv(k, v, kv_cache, meta)
        slots = meta.slot_mapping
        cpu_kernels.lib().store_kv(
            k.data_ptr(), v.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), slots.data_ptr(),
            slots.numel(), k.shape[1], k.shape[2], k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            kv_cache.shape[3], kv_cache.element_size(), torch.get_num_threads())

    def decode(self, q, kv_cache, meta: AttentionMetadata, scale: float,
               sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """fp32 or bf16 queries and caches (of one dtype); fp32 arithmetic, outputs of the cache's dtype."""
        if not _runs(q, kv_cache):
            return super().decode(q, kv_cache, meta, scale, sliding_window, softcap)
        if q.stride(1) != q.shape[2]:  # heads one after another, as the kernel reads them
            q = q.contiguous()
        num_heads, head_dim = q.shape[1], q.shape[2]
        out = torch.empty(q.shape, dtype=q.dtype)
        tables, lens = meta.decode_block_tables, meta.decode_seq_lens
        cpu_kernels.lib().paged_decode_attention(
            q.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), tables.data_ptr(), lens.data_ptr(),
            out.data_ptr(), q.shape[0], num_heads, kv_cache.shape[2], head_dim, meta.block_size, tables.shape[1],
            q.stride(0), scale, sliding_window or 0, softcap or 0.0, int(kv_cache.dtype == torch.bfloat16),
            torch.get_num_threads())
        return out
