"""GPU attention with Triton kernels (layers/attention/triton_kernels.py): KV writes by slot, flash-decoding
over the paged cache for one-token queries, and one varlen launch for all of a step's prefills.

Steps without a KV cache (pooling models) keep the torch backend's packed SDPA, which is a flash kernel on
a GPU already.
"""
from __future__ import annotations

import os

import torch

from shardserve.layers.attention.backend import AttentionMetadata, to_device_aligned
from shardserve.layers.attention.torch_backend import TorchAttentionBackend


def available() -> bool:
    import importlib.util
    return importlib.util.find_spec("triton") is not None


def runs_on(device: torch.device) -> bool:
    """Triton compiles for GPUs; on a CPU only its interpreter runs the kernels (tests, TRITON_INTERPRET=1)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


class TritonAttentionBackend(TorchAttentionBackend):
    name = "triton"
    supports_cuda_graphs = True
    kv_store_in_rotary = True

    def __init__(self):
        from shardserve.layers.attention import triton_kernels
        self.kernels = triton_kernels

    def store_kv(self, k, v, kv_cache, meta: AttentionMetadata) -> None:
        self.kernels.store_kv(k, v, kv_cache, meta.slot_mapping)

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float,
                sliding_window: int | None = None, softcap: float | None = None,
                kv_stored: bool = False) -> torch.Tensor:
        if meta.slot_mapping is None or kv_cache is None:
            return super().forward(q, k, v, kv_cache, meta, scale, sliding_window, softcap)
        if not kv_stored:
            self.store_kv(k, v, kv_cache, meta)
        out = torch.empty_like(q)
        nd = meta.num_decode_tokens
        if nd:
            self.kernels.paged_decode(q[:nd], kv_cache, meta.decode_block_tables, meta.decode_seq_lens, scale,
                                      out=out[:nd], sliding_window=sliding_window, softcap=softcap)
        if meta.prefills:
            tables, starts, lens, contexts = meta.memo("triton_prefills", lambda: _prefill_tensors(meta))
            self.kernels.paged_prefill(q, kv_cache, tables, starts, lens, contexts,
                                       max(s.query_len for s in meta.prefills), scale, out, meta.causal,
                                       sliding_window=sliding_window, softcap=softcap)
        return out


def _prefill_tensors(meta: AttentionMetadata):
    """Block tables (padded to one width), query starts, query lengths and context lengths of the step's
    prefills."""
    device = meta.slot_mapping.device
    tables = torch.nn.utils.rnn.pad_sequence(meta.prefill_block_tables(), batch_first=True)
    columns = [[s.query_start for s in meta.prefills], [s.query_len for s in meta.prefills],
               [s.context_len for s in meta.prefills]]
    starts, lens, contexts = to_device_aligned(columns, device)
    return tables, starts, lens, contexts
