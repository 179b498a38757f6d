"""CPU attention: decode reads the paged KV cache in place with a small compiled C kernel.

The pure-torch backend must gather every decode's keys and values into a padded copy each layer; on a
CPU that copy costs as much as the attention itself. The kernel (csrc/paged_decode_attention.c) is
compiled once per machine with the system C compiler into a cache directory and loaded with ctypes;
where no compiler is found, `auto` falls back to the torch backend. Prefill stays on torch SDPA.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from shardserve.layers.attention.backend import AttentionMetadata
from shardserve.layers.attention.torch_backend import TorchAttentionBackend

_SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "paged_decode_attention.c"
_MAX_GROUP = 64  # query heads per KV head the kernel's stack buffers hold
_lib = None
_error: str | None = None


def _cache_dir() -> Path:
    root = os.environ.get("SHARDSERVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "shardserve")
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: a build is only reused on a CPU with the same features (a shared home
    directory across a cluster's nodes must not hand an AVX-512 build to a CPU without it)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _build() -> ctypes.CDLL:
    source = _SOURCE.read_bytes()
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-ffp-contract=fast"]
    key = hashlib.sha256(source + " ".join([compiler, *flags, _cpu_signature()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"paged_decode_attention_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            subprocess.run([compiler, *flags, str(_SOURCE), "-o", str(built), "-lm"], check=True,
                           capture_output=True, text=True)
            os.replace(built, target)  # atomic: concurrent builders never load a half-written file
    lib = ctypes.CDLL(str(target))
    fn = lib.paged_decode_attention_f32
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6 + [ctypes.c_float, ctypes.c_int]
    return lib


def available() -> bool:
    global _lib, _error
    if _lib is None and _error is None:
        try:
            _lib = _build()
        except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
            _error = getattr(e, "stderr", None) or str(e)
    return _lib is not None


def build_error() -> str | None:
    available()
    return _error


class CpuPagedAttentionBackend(TorchAttentionBackend):
    name = "cpu"

    def decode(self, q, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        num_heads, head_dim = q.shape[1], q.shape[2]
        num_kv_heads = kv_cache.shape[2]
        if (q.device.type != "cpu" or q.dtype != torch.float32 or kv_cache.dtype != torch.float32
                or num_heads // num_kv_heads > _MAX_GROUP):
            return super().decode(q, kv_cache, meta, scale)
        q = q.contiguous()
        out = torch.empty_like(q)
        tables, lens = meta.decode_block_tables, meta.decode_seq_lens
        _lib.paged_decode_attention_f32(
            q.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), tables.data_ptr(), lens.data_ptr(),
            out.data_ptr(), q.shape[0], num_heads, num_kv_heads, head_dim, meta.block_size, tables.shape[1],
            scale, torch.get_num_threads())
        return out
