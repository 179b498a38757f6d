"""Keeping the engine thread's OpenMP workers off the cores between steps, for a server whose event loop has no
core of its own (async_engine's hand-off).

After a parallel region GNU OpenMP's workers spin for the next one (about 300,000 pauses by default,
milliseconds here) before they block. Inside a forward pass that is what keeps them fast; between steps it
takes a core from the event loop that has to send the step's outputs.

`park_workers_until_signalled` (the kernels library's `park_openmp_workers`) opens one parallel region in
which the caller waits for the loop's signals on an eventfd while the team's other threads sleep on a futex;
the next step then runs on the same, warm team. Where the library cannot be built, `release_thread_pool`
(OpenMP 5.0's `omp_pause_resource_all`) frees the team instead and the caller waits in Python; the next
parallel region then starts a new team, whose first step is the slower for it (a one-sequence prefill took
~12 ms after a release against ~8 ms on a parked team, benchmarks/RESULTS.md).

Only GNU OpenMP runtimes this process has loaded are paused (found in its memory map; wheels bundle their
own copies, torch's among them, and pausing one the caller has no pool in does nothing), so a build on
another runtime, or none, is left alone.
"""
from __future__ import annotations

import ctypes
import logging
import os
import select
import time

from shardserve.layers import cpu_kernels

logger = logging.getLogger(__name__)

_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: keep the runtime's state, release its threads
_pauses: list = []
_looked = False


def _loaded_libgomps() -> list[str]:
    paths: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/libgomp" in path and ".so" in path and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    return paths


def release_thread_pool() -> bool:
    """Free the calling thread's OpenMP worker threads (call it outside any parallel region). False where
    the process runs no GNU OpenMP with `omp_pause_resource_all`."""
    global _looked
    if not _looked:
        _looked = True
        for path in _loaded_libgomps():
            try:
                pause = ctypes.CDLL(path).omp_pause_resource_all
            except (OSError, AttributeError):
                continue
            pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
            _pauses.append(pause)
        logger.debug("OpenMP pool release through %d runtime(s)", len(_pauses))
    return bool(_pauses) and all([pause(_OMP_PAUSE_SOFT) == 0 for pause in _pauses])


def park_workers_until_signalled(fd: int, signals: int, timeout_s: float, num_threads: int) -> int:
    """Wait until `signals` writes to the eventfd `fd` have been counted, or `timeout_s`, with the calling
    thread's `num_threads`-strong OpenMP team asleep meanwhile (call it outside any parallel region, with the
    thread count its parallel regions use, so the team is the one they run on). Returns the signals counted."""
    lib = cpu_kernels.lib()
    if lib is not None:
        counted = lib.park_openmp_workers(fd, signals, int(timeout_s * 1e9), num_threads)
        if counted >= 0:
            return counted
    release_thread_pool()
    counted, deadline = 0, time.monotonic() + timeout_s
    while counted < signals and (left := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            try:
                counted += os.eventfd_read(fd)
            except BlockingIOError:
                pass
    return counted
