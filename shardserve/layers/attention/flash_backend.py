"""FlashAttention over the paged KV cache, where a compatible build imports: vLLM's `vllm_flash_attn`, or
Dao-AILab's `flash_attn` (whose paged kernels need blocks of a multiple of 256 tokens).

Both builds are compiled against one torch and one CUDA; a wheel built for another fails at import or at
the first call (undefined symbols, no kernel image for this GPU). So `load` imports inside a try, and
`usable` runs one tiny call on the device before the backend is chosen: a broken build is passed over
(auto falls back to Triton), never a crash in the middle of serving.

One varlen call does the whole step: decode rows are queries of length 1, prefills longer queries, each
with its own block table and key count; the causal mask aligns to the bottom right (a query at position
context + i sees keys 0 .. context + i), as this engine needs. New K/V go in with the Triton store kernel
when Triton imports, else by index_copy.
"""
from __future__ import annotations

import logging

import torch

from shardserve.layers.attention.backend import AttentionMetadata, host_to_device
from shardserve.layers.attention.torch_backend import TorchAttentionBackend

logger = logging.getLogger(__name__)

_loaded: tuple | None = None       # (varlen function, minimum block-size multiple, module name)
_load_error: str | None = None
_usable: dict[tuple, bool] = {}


def load() -> tuple | None:
    global _loaded, _load_error
    if _loaded is None and _load_error is None:
        errors = []
        for module, block_multiple in (("vllm_flash_attn", 16), ("flash_attn", 256)):
            try:
                fn = getattr(__import__(module, fromlist=["flash_attn_varlen_func"]), "flash_attn_varlen_func")
            except Exception as e:  # ImportError, OSError (undefined symbol), RuntimeError (CUDA mismatch)
                errors.append(f"{module}: {type(e).__name__}: {e}")
                continue
            _loaded = (fn, block_multiple, module)
            break
        else:
            _load_error = "; ".join(errors)
    return _loaded


def load_error() -> str | None:
    load()
    return _load_error


def usable(device: torch.device, dtype: torch.dtype, block_size: int, head_dim: int) -> bool:
    """Whether a build imports, supports these shapes, and runs one call on this device."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or load() is None:
        return False
    fn, block_multiple, module = _loaded
    key = (str(device), dtype, block_size, head_dim)
    if key not in _usable:
        ok = block_size % block_multiple == 0 and head_dim % 8 == 0 and head_dim <= 256
        if ok:
            try:
                cache = torch.zeros(2, 2, 1, block_size, head_dim, dtype=dtype, device=device)
                q = torch.zeros(2, 1, head_dim, dtype=dtype, device=device)
                _varlen(fn, q, cache, torch.tensor([0, 1, 2], dtype=torch.int32, device=device),
                        torch.tensor([1, block_size + 1], dtype=torch.int32, device=device),
                        torch.tensor([[0, 1], [1, 0]], dtype=torch.int32, device=device),
                        1, 2 * block_size, 1.0, torch.empty_like(q))
                torch.cuda.synchronize(device)
            except Exception as e:
                logger.warning("%s imports but does not run here (%s); not using it", module, e)
                ok = False
        _usable[key] = ok
    return _usable[key]


def _varlen(fn, q, kv_cache, cu_seqlens_q, seqused_k, block_table, max_q, max_k, scale, out,
            sliding_window: int | None = None, softcap: float | None = None):
    # The cache is [num_blocks, Hkv, block_size, D]; FlashAttention reads [num_blocks, block_size, Hkv, D]
    # through its strides, so the same memory is passed as a transposed view.
    return fn(q, kv_cache[0].transpose(1, 2), kv_cache[1].transpose(1, 2), max_seqlen_q=max_q,
              cu_seqlens_q=cu_seqlens_q, max_seqlen_k=max_k, seqused_k=seqused_k, softmax_scale=scale,
              causal=True, block_table=block_table, out=out,
              # FlashAttention's window counts the keys left of the query's own
              window_size=(sliding_window - 1, 0) if sliding_window else (-1, -1),
              # passed only when set: builds before FlashAttention 2.6 have no soft cap
              **({"softcap": softcap} if softcap else {}))


class FlashAttentionBackend(TorchAttentionBackend):
    name = "flash_attn"

    def __init__(self):
        if load() is None:
            raise RuntimeError(f"No FlashAttention build imports: {load_error()}")
        self.varlen = _loaded[0]
        try:
            from shardserve.layers.attention import triton_kernels
            self.triton_store_kv = triton_kernels.store_kv
        except ImportError:
            self.triton_store_kv = None

    def store_kv(self, k, v, kv_cache, meta: AttentionMetadata) -> None:
        if self.triton_store_kv is None:
            return super().store_kv(k, v, kv_cache, meta)
        self.triton_store_kv(k, v, kv_cache, meta.slot_mapping)

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float,
                sliding_window: int | None = None, softcap: float | None = None,
                kv_stored: bool = False) -> torch.Tensor:
        if meta.slot_mapping is None or kv_cache is None or not meta.causal:
            return super().forward(q, k, v, kv_cache, meta, scale, sliding_window, softcap, kv_stored)
        if not kv_stored:
            self.store_kv(k, v, kv_cache, meta)
        cu_q, seqused_k, tables, max_q, max_k = meta.memo("flash_varlen", lambda: _varlen_inputs(meta))
        out = torch.empty_like(q)
        _varlen(self.varlen, q, kv_cache, cu_q, seqused_k, tables, max_q, max_k, scale, out, sliding_window,
                softcap)
        return out


def _varlen_inputs(meta: AttentionMetadata):
    """The step as FlashAttention's varlen batch: decode rows then prefills, in row order."""
    device, bs, nd = meta.slot_mapping.device, meta.block_size, meta.num_decode_tokens
    query_lens = [1] * nd + [s.query_len for s in meta.prefills]
    cu_q = host_to_device([0] + query_lens, device, torch.int32).cumsum(0, dtype=torch.int32)
    prefill_tables = meta.prefill_block_tables()
    width = max([meta.decode_block_tables.shape[1] if nd else 0] + [len(t) for t in prefill_tables])
    tables = torch.zeros(len(query_lens), width, dtype=torch.int32, device=device)
    lens = torch.empty(len(query_lens), dtype=torch.int32, device=device)
    if nd:
        tables[:nd, :meta.decode_block_tables.shape[1]] = meta.decode_block_tables
        lens[:nd] = meta.decode_seq_lens
    for i, (seq, table) in enumerate(zip(meta.prefills, prefill_tables), start=nd):
        tables[i, :len(table)] = table
        lens[i] = seq.context_len + seq.query_len
    return cu_q, lens, tables, max(query_lens), width * bs
