"""The async engine's hand-off on CPUs: the stepping thread lets its OpenMP workers sleep between steps and
waits for the event loop to pass each step's outputs on; streams are unchanged by it. Its thread and team stay
SCHED_OTHER while the process's other threads (and a local cluster's processes) yield on SCHED_BATCH."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from shardserve import LLM, SamplingParams, TokensPrompt

# A parallel region, the pool released, another region: prints the process's threads at each point and
# whether the second product is still right.
_POOL = """
import os, time, torch
from shardserve.workers.cpu_openmp import release_thread_pool
torch.set_num_threads(2)
threads = lambda: len(os.listdir("/proc/self/task"))
a = torch.randn(256, 256, dtype=torch.float64)
expected = a @ a
print(threads())
print(release_thread_pool())
time.sleep(0.2)
print(threads())
print(torch.equal(a @ a, expected), threads())
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc")
def test_releasing_the_pool_ends_its_worker_threads_until_the_next_region():
    out = subprocess.run([sys.executable, "-c", _POOL], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    busy, released, idle, after = out.stdout.split("\n")[:4]
    if released != "True":
        pytest.skip("this torch runs no GNU OpenMP with omp_pause_resource_all")
    assert int(idle) == int(busy) - 1  # the one worker of a two-thread team is gone
    right, threads = after.split()
    assert right == "True" and int(threads) == int(busy)  # and the next region has a team again


# A parallel region, then the team parked until another thread signals an eventfd 0.3 s later, then parked
# with nothing to signal it: prints what was counted, how long each wait took, whether the process kept its
# threads, the most CPU time any other thread used while parked, and whether the next product is still right.
_PARK = """
import os, threading, time, torch
from shardserve.layers import cpu_kernels
from shardserve.workers.cpu_openmp import park_workers_until_signalled
torch.set_num_threads(2)
a = torch.randn(256, 256, dtype=torch.float64)
expected = a @ a
threads = lambda: sorted(os.listdir("/proc/self/task"))
def cpu_ms(tid):
    fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")
before = threads()
others = [t for t in before if int(t) != threading.get_native_id()]
used = {t: cpu_ms(t) for t in others}
fd = os.eventfd(0, os.EFD_NONBLOCK)
threading.Timer(0.3, os.eventfd_write, (fd, 1)).start()
start = time.monotonic()
counted = park_workers_until_signalled(fd, 1, 5.0, 2)
print(cpu_kernels.available(), counted, time.monotonic() - start)
print(threads() == before, max(cpu_ms(t) - used[t] for t in others))
start = time.monotonic()
print(park_workers_until_signalled(fd, 1, 0.05, 2), time.monotonic() - start)
print(torch.equal(a @ a, expected), threads() == before)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc")
def test_a_parked_team_sleeps_until_signalled_and_runs_the_next_region():
    # OMP_WAIT_POLICY=active: left to itself, an idle worker would spin all the while
    out = subprocess.run([sys.executable, "-c", _PARK], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "active"})
    assert out.returncode == 0, out.stderr
    first, kept, timed_out, after = out.stdout.split("\n")[:4]
    library, counted, waited = first.split()
    assert counted == "1" and 0.25 < float(waited) < 2.0  # woken by the signal, not the time limit
    counted, waited = timed_out.split()
    assert counted == "0" and 0.04 < float(waited) < 1.0  # nothing to count: back at the time limit
    assert after == "True True"  # the next region computes right, on the same threads
    same_threads, busiest_ms = kept.split()
    if library == "True":  # parked in the kernels library: the team kept, its worker asleep, not spinning
        assert same_threads == "True" and float(busiest_ms) <= 30


PROMPTS = [[5, 9, 14, 2, 7], [3, 3, 8], [11, 4, 6, 1, 9, 12, 2]]


@pytest.fixture
def keep_sched_policies():
    """A hand-off engine moves its process's other threads to SCHED_BATCH (cpu_sched); this one is pytest's."""
    tids = [int(t) for t in os.listdir("/proc/self/task")] if hasattr(os, "sched_getscheduler") else []
    before = {tid: os.sched_getscheduler(tid) for tid in tids}
    yield
    for tid, policy in before.items():
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
        except OSError:
            pass


def test_hand_off_streams_what_the_engine_makes_without_it(model_dirs, keep_sched_policies):
    from shardserve.config import EngineConfig
    from shardserve.engine.async_engine import HAND_OFF_TIMEOUT_S, AsyncLLMEngine

    path = model_dirs("llama")
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(path, dtype="float32").generate(
        [TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, use_tqdm=False)]
    engine = AsyncLLMEngine(EngineConfig(model=path, dtype="float32"), num_threads=2, hand_off=True)

    async def stream(prompt):
        tokens = []
        async for out in engine.generate(TokensPrompt(prompt_token_ids=prompt), params):
            tokens = list(out.outputs[0].token_ids)
        return tokens

    async def run_all():
        return await asyncio.gather(*(stream(p) for p in PROMPTS))
    try:
        assert asyncio.run(run_all()) == [list(t) for t in expected]
        # Each step's wait ended when the loop had passed its outputs on, not at the time limit.
        assert 0 < engine.hand_off_seconds < engine.num_steps * HAND_OFF_TIMEOUT_S
    finally:
        engine.shutdown()


# The engine thread favoured: prints the scheduling policy of each kind of thread (0 SCHED_OTHER, 3 SCHED_BATCH).
_FAVOUR = """
import os, subprocess, sys, threading
from shardserve.workers import cpu_sched
os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))  # whatever the test process left to inherit
started_before = threading.Thread(target=threading.Event().wait, args=(10,), daemon=True)
started_before.start()
policy = {}
def engine():
    cpu_sched.favour_this_thread()
    team = threading.Thread(target=lambda: policy.setdefault("team", os.sched_getscheduler(0)))
    team.start(); team.join()
    policy["engine"] = os.sched_getscheduler(0)
    with cpu_sched.batch_children():  # from a SCHED_OTHER thread
        policy["spawned"] = int(subprocess.check_output([sys.executable, "-c",
                                                         "import os; print(os.sched_getscheduler(0))"]))
    policy["engine_after_spawn"] = os.sched_getscheduler(0)
thread = threading.Thread(target=engine)
thread.start(); thread.join()
policy["main"] = os.sched_getscheduler(0)
policy["started_before"] = os.sched_getscheduler(started_before.native_id)
print(sorted(policy.items()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux: per-thread SCHED_BATCH")
@pytest.mark.parametrize("enabled", ["1", "0"])
def test_the_engine_thread_and_its_team_stay_sched_other_and_the_rest_yields(enabled):
    out = subprocess.run([sys.executable, "-c", _FAVOUR], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, SHARDSERVE_CPU_SCHED_BATCH=enabled))
    assert out.returncode == 0, out.stderr
    other, batch = os.SCHED_OTHER, os.SCHED_BATCH if enabled == "1" else os.SCHED_OTHER
    assert out.stdout.strip() == str(sorted({"engine": other, "team": other, "engine_after_spawn": other,
                                             "spawned": batch, "main": batch, "started_before": batch}.items()))
