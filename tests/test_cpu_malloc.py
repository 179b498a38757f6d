"""The CPU worker's memory: freed memory kept in the process (a step's large activations reuse pages instead of
page-faulting fresh ones from the kernel every step), and the KV cache on huge pages."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from shardserve.workers.cpu_malloc import zeros_on_huge_pages

# A prefill-shaped round of large temporaries (6 to 36 MiB), repeated; prints the fewest and the most page faults
# of the last three rounds. Kept memory can still grow now and then (a round in 20 or so faulted 7-10k pages, the
# heap extended where a free chunk did not fit: where glibc places chunks varies from run to run); freeing it
# back to the kernel faults ~44k pages a round, though glibc's own sliding mmap threshold lets a round now and
# then reuse its pages (0 faults) without the setting too.
_ROUNDS = """
import resource, torch
from shardserve.workers.cpu_malloc import keep_freed_memory
print(keep_freed_memory())
def step():
    x = torch.ones(2048, 768)
    for _ in range(3):
        qkv = x.repeat(1, 3)
        h = qkv.repeat(1, 2)[:, :2048] * 2
        x = x + h[:, :768]
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[3:]), max(faults[3:]))
"""


def _faults_of_later_rounds(keep: str) -> tuple[bool, int, int]:
    """Whether memory is kept, and the fewest and most page faults of the last three rounds."""
    env = dict(os.environ, SHARDSERVE_CPU_KEEP_FREED_MEMORY=keep, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _ROUNDS], env=env, capture_output=True, text=True, check=True)
    tuned, fewest, most = out.stdout.split()
    return tuned == "True", int(fewest), int(most)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's (musl, macOS have none)")
def test_large_temporaries_stop_page_faulting_once_memory_is_kept():
    tuned, faults, _ = _faults_of_later_rounds("1")
    assert tuned and faults < 1000
    untuned, _, faults_untuned = _faults_of_later_rounds("0")
    assert not untuned and faults_untuned > 10 * max(faults, 100)  # what the setting saves: most pages


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds `address` (/proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    return []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_memory_is_zeroed_and_asks_for_huge_pages(dtype):
    shape = (2, 64, 4, 16, 64)
    cache = zeros_on_huge_pages(shape, dtype)
    assert cache.shape == shape and cache.dtype == dtype and cache.is_contiguous()
    assert not cache.any()
    cache[1, 63, 3, 15, 63] = 1  # writable to the last element, and the mapping outlives the call that made it
    assert cache.sum().item() == 1
    if platform.system() == "Linux":
        assert "hg" in _vm_flags(cache.data_ptr())  # MADV_HUGEPAGE: the kernel backs it with 2 MiB pages if it can
    empty = zeros_on_huge_pages((2, 0, 4, 16, 64), dtype)  # a pooling model's cache: no blocks
    assert empty.shape == (2, 0, 4, 16, 64) and empty.dtype == dtype


def test_the_worker_puts_its_cpu_kv_cache_on_huge_pages(model_dirs):
    from shardserve import LLM
    llm = LLM(model_dirs("llama"), dtype="float32", max_model_len=64, kv_cache_memory_bytes=8 << 20)
    try:
        caches = llm.llm_engine.executor.worker.kv_caches
        assert caches and all(not c.any() for c in caches)
        if platform.system() == "Linux":
            assert all("hg" in _vm_flags(c.data_ptr()) for c in caches)
    finally:
        llm.shutdown()


def test_cpu_workers_start_on_tcmalloc_where_it_is_installed(monkeypatch):
    """The environment Ray starts a CPU worker with: tcmalloc preloaded (before any LD_PRELOAD of ours, once),
    the library named, or nothing."""
    import ctypes.util

    from shardserve.router.spec import ModelSpec
    from shardserve.workers.cpu_malloc import tcmalloc_env
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("SHARDSERVE_CPU_TCMALLOC", raising=False)
    installed = ctypes.util.find_library("tcmalloc_minimal")
    assert tcmalloc_env() == ({"LD_PRELOAD": installed} if installed else {})
    monkeypatch.setenv("SHARDSERVE_CPU_TCMALLOC", "/opt/lib/libtcmalloc.so")
    monkeypatch.setenv("LD_PRELOAD", "/lib/libother.so")
    assert tcmalloc_env() == {"LD_PRELOAD": "/opt/lib/libtcmalloc.so:/lib/libother.so"}
    monkeypatch.setenv("LD_PRELOAD", "/opt/lib/libtcmalloc.so")
    assert tcmalloc_env() == {"LD_PRELOAD": "/opt/lib/libtcmalloc.so"}
    monkeypatch.setenv("SHARDSERVE_CPU_TCMALLOC", "0")
    assert tcmalloc_env() == {}
    # a CPU replica's actor options carry it; a GPU one's do not
    monkeypatch.setenv("SHARDSERVE_CPU_TCMALLOC", "/opt/lib/libtcmalloc.so")
    env = ModelSpec(model="m", device="cpu").deployment_options(0)["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env["LD_PRELOAD"] == "/opt/lib/libtcmalloc.so"
    env = ModelSpec(model="m", device="cuda").deployment_options(0)["ray_actor_options"]["runtime_env"]["env_vars"]
    assert "LD_PRELOAD" not in env


def test_a_bf16_engine_without_tcmalloc_says_how_to_start_on_it(monkeypatch, model_dirs, caplog):
    """The offline LLM runs in its caller's process, which only the command line can start on tcmalloc: a bf16
    CPU engine there logs the LD_PRELOAD to use, where tcmalloc is installed (here: named) and not loaded; an fp32
    one, or one with tcmalloc turned off, says nothing."""
    import logging

    from shardserve import LLM
    from shardserve.layers import cpu_gemm
    from shardserve.workers import cpu_malloc
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setenv("SHARDSERVE_CPU_TCMALLOC", "/opt/lib/libtcmalloc_minimal.so.4")
    monkeypatch.setattr(cpu_malloc, "_tcmalloc_loaded", lambda: False)
    hint = cpu_malloc.tcmalloc_hint(torch.bfloat16)
    assert hint.endswith("start this process with LD_PRELOAD=/opt/lib/libtcmalloc_minimal.so.4")
    assert cpu_malloc.tcmalloc_hint(torch.float32) is None
    monkeypatch.setattr(cpu_malloc, "_tcmalloc_loaded", lambda: True)
    assert cpu_malloc.tcmalloc_hint(torch.bfloat16) is None
    monkeypatch.setattr(cpu_malloc, "_tcmalloc_loaded", lambda: False)
    if cpu_gemm.onednn_bf16_available():  # the engine's own log, where this CPU runs bf16
        with caplog.at_level(logging.INFO, logger="shardserve.workers.worker"):
            LLM(model_dirs("llama"), dtype="bfloat16", kv_cache_memory_bytes=1 << 24).shutdown()
        assert hint in caplog.text
    monkeypatch.setenv("SHARDSERVE_CPU_TCMALLOC", "0")
    assert cpu_malloc.tcmalloc_hint(torch.bfloat16) is None
