"""CPU attention: decode reads the paged KV cache in place with a small compiled C kernel.

The pure-torch backend must gather every decode's keys and values into a padded copy each layer; on a
CPU that copy costs as much as the attention itself. The kernel (csrc/paged_decode_attention.c) comes from
the package's C library (layers/cpu_kernels.py); where that cannot be built, `auto` falls back to the
torch backend. Prefill stays on torch SDPA.
"""
from __future__ import annotations

import torch

from shardserve.layers import cpu_kernels
from shardserve.layers.attention.backend import AttentionMetadata
from shardserve.layers.attention.torch_backend import TorchAttentionBackend

available = cpu_kernels.available
build_error = cpu_kernels.build_error


class CpuPagedAttentionBackend(TorchAttentionBackend):
    name = "cpu"

    def decode(self, q, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        num_heads, head_dim = q.shape[1], q.shape[2]
        num_kv_heads = kv_cache.shape[2]
        if q.device.type != "cpu" or q.dtype != torch.float32 or kv_cache.dtype != torch.float32:
            return super().decode(q, kv_cache, meta, scale)
        q = q.contiguous()
        out = torch.empty_like(q)
        tables, lens = meta.decode_block_tables, meta.decode_seq_lens
        cpu_kernels.lib().paged_decode_attention_f32(
            q.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), tables.data_ptr(), lens.data_ptr(),
            out.data_ptr(), q.shape[0], num_heads, num_kv_heads, head_dim, meta.block_size, tables.shape[1],
            scale, torch.get_num_threads())
        return out
