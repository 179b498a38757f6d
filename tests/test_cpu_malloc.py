"""The CPU worker keeps freed memory in the process: a step's large activations reuse pages instead of
page-faulting fresh ones from the kernel every step."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

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
