"""Memory for CPU workers: freed memory kept in the process, and the KV cache on huge pages.

Freed memory is kept, so a step's large activations reuse pages instead of faulting in fresh ones.

glibc maps allocations above its mmap threshold (128 KiB to 32 MiB, adjusted as the program runs) afresh
from the kernel and returns freed heap tops to it. A prefill step of a 12-layer model allocates and frees
about 1.7 GiB of activations, so every such step page-faulted ~95,000 times, the kernel zeroing each page:
about 8% of the step here (benchmarks/RESULTS.md). vLLM's CPU guide preloads tcmalloc for the same reason;
that must be set before the process starts, while glibc's thresholds can be raised at any time. The cost:
the process keeps the heap it peaked at instead of shrinking back.

Where tcmalloc is installed (libtcmalloc-minimal4), the worker processes Ray starts for a CPU model run on it
(`tcmalloc_env`): a step's many small tensors are allocated faster than by glibc, 8-14% of bf16 decode
throughput on the machine of benchmarks/RESULTS.md (nothing measurable in fp32). It has to be preloaded as the
process starts, which Ray does with the actor's environment; the offline `LLM` runs in the caller's process,
which can be started under `LD_PRELOAD=libtcmalloc_minimal.so.4` (as vLLM's CPU guide says): a bf16 engine in
a process without it says so (`tcmalloc_hint`).

The KV cache is read by the decode attention kernel in 4 KiB runs (one head's block) scattered over GiBs: on
4 KiB pages nearly every run misses the TLB, and in a VM each miss walks two levels of page tables. On 2 MiB
pages the kernel read 5-20% faster from DRAM (benchmarks/RESULTS.md). Transparent huge pages are commonly
enabled only where asked for (`madvise`), so the cache asks.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import mmap
import os

import torch

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, glibc's malloc.h
_MMAP_THRESHOLD = 1 << 30  # a prefill's activations stay below it; the KV cache (allocated once) above
_TRIM_THRESHOLD = 1 << 30
_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); False where the C library is not
    glibc or SHARDSERVE_CPU_KEEP_FREED_MEMORY=0."""
    global _done
    if _done:
        return True
    if os.environ.get("SHARDSERVE_CPU_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    _done = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    if _done:
        logger.debug("malloc: mmap threshold %d MiB, trim threshold %d MiB", _MMAP_THRESHOLD >> 20,
                     _TRIM_THRESHOLD >> 20)
    return _done


def tcmalloc_env() -> dict[str, str]:
    """Environment variables that start a CPU worker process on tcmalloc: LD_PRELOAD with the library where it is
    installed (added to any LD_PRELOAD of this process), else none. SHARDSERVE_CPU_TCMALLOC=0 turns it off, or
    names the library to load."""
    choice = os.environ.get("SHARDSERVE_CPU_TCMALLOC", "1")
    if choice == "0":
        return {}
    library = choice if choice != "1" else ctypes.util.find_library("tcmalloc_minimal")
    if not library:
        return {}
    preload = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p]
    return {"LD_PRELOAD": ":".join(preload if any("tcmalloc" in p for p in preload) else [library, *preload])}


def tcmalloc_hint(dtype: torch.dtype) -> str | None:
    """How to start this process on tcmalloc, for a bf16 CPU engine in a process without it where it is installed
    (the offline `LLM`: only the caller's command line can preload it); else None."""
    env = tcmalloc_env()
    if dtype != torch.bfloat16 or not env or _tcmalloc_loaded():
        return None
    return (f"bf16 decode on CPUs runs faster on tcmalloc (8-14% measured): start this process with "
            f"LD_PRELOAD={env['LD_PRELOAD']}")


def _tcmalloc_loaded() -> bool:
    try:
        with open("/proc/self/maps") as maps:
            return any("tcmalloc" in line for line in maps)
    except OSError:  # not Linux: no way to tell, and no hint
        return True


def zeros_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor in its own anonymous mapping, which the kernel backs with transparent huge pages
    where it has them (Linux; elsewhere, or with THP off, ordinary pages). Its pages are touched here, as
    `torch.zeros` would, so the memory is committed now rather than in the middle of a step."""
    numel = math.prod(shape)
    if numel == 0:  # a pooling model's cache has no blocks, and a mapping no length
        return torch.zeros(shape, dtype=dtype)
    mapping = mmap.mmap(-1, numel * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # defined only where the platform has it (Linux)
        try:
            mapping.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a kernel built without THP
            pass
    tensor = torch.frombuffer(mapping, dtype=dtype, count=numel).view(shape)  # holds the mapping
    return tensor.zero_()
