"""The attention backend interface: what a step's batch looks like to attention, and who computes it.

The model runner builds one `AttentionMetadata` per step; every attention layer hands it, its q/k/v and
its KV-cache shard to the backend. Backends differ in kernels, never in what they compute.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch


_NUMPY_DTYPES = {torch.long: np.int64, torch.int32: np.int32, torch.float32: np.float32}


def host_to_device(values, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A host list (or numpy array) as a tensor on `device`. Through numpy, which reads a list of Python numbers
    ~6x faster than `torch.tensor` (a step's packed inputs at 256 decodes: 0.7 -> 0.1 ms). To a GPU through
    page-locked memory, queued on the stream: a copy from pageable memory would first wait for everything queued
    before it, and a step launched while the one before still runs (async scheduling) would wait for that one."""
    np_dtype = _NUMPY_DTYPES.get(dtype)
    t = torch.tensor(values, dtype=dtype) if np_dtype is None else torch.from_numpy(np.asarray(values, np_dtype))
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def to_device_aligned(segments: list, device: torch.device) -> list[torch.Tensor]:
    """Int64 host arrays (or lists) to `device` in one copy, as tensors that each start 16-byte aligned (every
    segment padded to an even length). Triton compiles a kernel once per pointer argument's alignment: packed
    end to end, where a segment starts would depend on the batch's sizes, and a step of a new shape could
    stall on a compile (layers/attention/triton_kernels.py)."""
    sizes = [len(segment) for segment in segments]
    packed = np.zeros(sum(n + (n & 1) for n in sizes), np.int64)
    at = 0
    for segment, n in zip(segments, sizes):
        packed[at:at + n] = segment
        at += n + (n & 1)
    on_device, tensors, at = host_to_device(packed, device), [], 0
    for n in sizes:
        tensors.append(on_device[at:at + n])
        at += n + (n & 1)
    return tensors


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

    def prefill_block_tables(self) -> list[torch.Tensor]:
        """Each prefill's block table: the block of every block_size-th slot of its tokens."""
        return self.memo("prefill_block_tables",
                         lambda: [seq.kv_slots[::self.block_size] // self.block_size for seq in self.prefills])

    def decode_slots_and_mask(self, sliding_window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[num_decodes, max_len] cache slot of every key, and where a key exists (and, with a sliding window,
        is one of the sequence's last `sliding_window`)."""
        def compute():
            bs = self.block_size
            pos = torch.arange(int(self.decode_seq_lens.max()), device=self.slot_mapping.device)
            slots = self.decode_block_tables[:, pos // bs] * bs + pos % bs
            return slots, pos[None, :] < self.decode_seq_lens[:, None]
        slots, mask = self.memo("decode_slots", compute)
        if sliding_window:
            def windowed():
                pos = torch.arange(mask.shape[1], device=mask.device)
                return mask & (pos[None, :] >= self.decode_seq_lens[:, None] - sliding_window)
            mask = self.memo(("decode_window", sliding_window), windowed)
        return slots, mask


class AttentionBackend:
    name = "base"
    # Whether a decode step's forward can be captured in a CUDA graph: no host syncs, grids sized from
    # host-known shapes, padding rows (slot -1) written nowhere.
    supports_cuda_graphs = False
    # Whether the rotary kernel may write a step's keys and values into this backend's cache (layers/rotary.py:
    # the Triton layout, written as `triton_kernels.store_kv` writes it), so the backend's own store is skipped.
    kv_store_in_rotary = False

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor | None,
                meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                softcap: float | None = None, kv_stored: bool = False) -> torch.Tensor:
        """`sliding_window`: a query at position p sees the keys at p - sliding_window + 1 .. p only (the
        layer's own window, e.g. Gemma 3's local layers); None: every earlier key. `softcap`: the attention
        logits are capped as softcap * tanh(logits / softcap) (Gemma 2); None: not capped. `kv_stored`: k and
        v are in the cache already (written by the rotary kernel)."""
        raise NotImplementedError


BACKENDS = ("auto", "torch", "cpu", "triton", "flash_attn")
# vLLM's names (its AttentionBackendEnum, any case) of the same kernels; its FLASH_ATTN is ours already
VLLM_BACKEND_NAMES = {"triton_attn": "triton", "cpu_attn": "cpu", "torch_sdpa": "torch"}


def backend_name(name: str) -> str:
    """An attention backend's name as given (ours, or vLLM's) -> ours."""
    return VLLM_BACKEND_NAMES.get(name.lower(), name.lower())


def get_attention_backend(name: str | None = None, device: torch.device | str = "cpu",
                          dtype: torch.dtype = torch.float32, block_size: int = 16,
                          head_dim: int = 64) -> AttentionBackend:
    """`name` (else $SHARDSERVE_ATTENTION_BACKEND, else auto) is one of:
    - `torch`: the pure-torch reference, any device;
    - `cpu`: the compiled C paged decode kernel (layers/attention/cpu_backend.py), CPUs;
    - `triton`: Triton kernels (GPUs; on a CPU only under TRITON_INTERPRET=1);
    - `flash_attn`: a FlashAttention build, where one imports and runs on this GPU;
    - `auto`: on a GPU flash_attn where usable, else triton, else torch; on a CPU cpu where it builds,
      else torch."""
    from shardserve.layers import cpu_kernels
    from shardserve.layers.attention import cpu_backend, flash_backend, triton_backend
    from shardserve.layers.attention.torch_backend import TorchAttentionBackend
    name = backend_name(name or os.environ.get("SHARDSERVE_ATTENTION_BACKEND") or "auto")
    device = torch.device(device)
    if name not in BACKENDS:
        raise ValueError(f"Unknown attention backend {name!r}; available: {', '.join(BACKENDS)} (or vLLM's names "
                         f"of them: {', '.join(n.upper() for n in VLLM_BACKEND_NAMES)}, FLASH_ATTN).")
    if name == "auto":
        if device.type == "cuda":
            if flash_backend.usable(device, dtype, block_size, head_dim):
                name = "flash_attn"
            else:
                name = "triton" if triton_backend.available() else "torch"
        else:
            name = "cpu" if cpu_kernels.available() else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "cpu":
        if not cpu_kernels.available():
            raise RuntimeError(f"The cpu attention backend could not be built: {cpu_kernels.build_error()}")
        return cpu_backend.CpuPagedAttentionBackend()
    if name == "triton":
        if not triton_backend.available():
            raise RuntimeError("The triton attention backend needs the triton package (pip install triton).")
        if not triton_backend.runs_on(device):
            raise RuntimeError("The triton attention backend runs on CUDA devices; on a CPU only in Triton's "
                               "interpreter (TRITON_INTERPRET=1, for tests). Use 'cpu' or 'torch' here.")
        return triton_backend.TritonAttentionBackend()
    if not flash_backend.usable(device, dtype, block_size, head_dim):
        why = flash_backend.load_error() or (
            "it needs a CUDA device, fp16/bf16, a block size it supports and head_dim a multiple of 8 up to 256")
        raise RuntimeError(f"The flash_attn attention backend is not usable here: {why}.")
    return flash_backend.FlashAttentionBackend()
