"""Let the calling thread's OpenMP workers go to sleep now, instead of spinning until they time out.

After a parallel region GNU OpenMP's workers spin for the next one (about 300,000 pauses by default,
milliseconds here) before they block. Inside a forward pass that is what keeps them fast; between steps of
a server on a CPU with no core to spare it takes a core from the event loop that has to send the step's
outputs (async_engine's hand-off). `omp_pause_resource_all` (OpenMP 5.0) frees the caller's thread pool; the
next parallel region starts a new one, which costs a thread start (tens of microseconds) a step.

Only GNU OpenMP runtimes this process has loaded are paused (found in its memory map; wheels bundle their
own copies, torch's among them, and pausing one the caller has no pool in does nothing), so a build on
another runtime, or none, is left alone.
"""
from __future__ import annotations

import ctypes
import logging

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
