"""Keeping the other work on a CPU serving node from preempting the model's compute threads.

When every core runs one of the engine's OpenMP threads, any thread that wakes up (HAProxy relaying a chunk,
the HTTP client, Ray's controller and agents, the replica's own Ray threads) takes a core from one of them,
and the rest of the team waits for it at the next barrier. Linux lets a waking SCHED_OTHER thread preempt
the running one; a SCHED_BATCH thread gets the same share of CPU but never preempts on wake-up: it runs
when a core is free (the async engine's hand-off frees both after every step) or when the running thread's
time slice is up. With 32 streams on 2 cores the engine's two threads were preempted ~10 times a step each,
against ~0.3 offline; with the rest of the node on SCHED_BATCH, ~4 (benchmarks/RESULTS.md).

A local cluster also runs processes that keep its books rather than serve requests (Serve's controller, Ray's
dashboard and agents, ...): they wake ~40-90 times a second each, and each wake-up that lands inside a step
stalls the team too. `idle_processes` puts them on SCHED_IDLE, which runs them when a core has nothing else to
do (between steps there is): 32 streams on 2 cores served 5% more tokens a second (benchmarks/RESULTS.md).

`favour_this_thread` is called by the engine thread of a CPU replica that runs the model on every core:
every other thread of its process becomes SCHED_BATCH, the engine thread stays SCHED_OTHER, and so does the
OpenMP team it starts (threads inherit their creator's policy). `batch_children` wraps the start of a local
Ray cluster, whose processes (and theirs: workers, HAProxy) inherit SCHED_BATCH; the replica's engine thread
then takes SCHED_OTHER back, which needs no privilege. SHARDSERVE_CPU_SCHED_BATCH=0 turns both off.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading

logger = logging.getLogger(__name__)


def enabled() -> bool:
    return os.environ.get("SHARDSERVE_CPU_SCHED_BATCH", "1") != "0" and hasattr(os, "SCHED_BATCH")  # Linux


def _set_policy(tid: int, policy: int) -> bool:
    try:
        os.sched_setscheduler(tid, policy, os.sched_param(0))  # Linux: a thread id names that one thread
        return True
    except OSError:  # gone meanwhile, or a real-time thread this process may not demote
        return False


def favour_this_thread() -> int:
    """The calling thread (and threads it starts from now on) SCHED_OTHER, every other thread of the process
    SCHED_BATCH. Returns how many threads were moved to SCHED_BATCH."""
    if not enabled():
        return 0
    me = threading.get_native_id()
    _set_policy(me, os.SCHED_OTHER)
    moved = 0
    for tid in map(int, os.listdir("/proc/self/task")):
        try:
            if tid != me and os.sched_getscheduler(tid) == os.SCHED_OTHER:
                moved += _set_policy(tid, os.SCHED_BATCH)
        except OSError:  # the thread ended meanwhile
            pass
    logger.debug("Engine thread favoured: %d other threads of this process on SCHED_BATCH", moved)
    return moved


@contextlib.contextmanager
def batch_children():
    """Processes started inside the block (and their descendants) run SCHED_BATCH; the calling thread gets its
    own policy back afterwards."""
    if not enabled():
        yield
        return
    me = threading.get_native_id()
    policy = os.sched_getscheduler(me)
    switched = policy == os.SCHED_OTHER and _set_policy(me, os.SCHED_BATCH)
    try:
        yield
    finally:
        if switched:
            _set_policy(me, policy)


def idle_processes(pids) -> int:
    """Every thread of each process in `pids` SCHED_IDLE (threads they start later inherit it). Returns how many
    threads were moved. A lower policy needs no privilege, but an unprivileged thread cannot leave SCHED_IDLE
    again: only for processes that start none of the serving ones."""
    if not enabled() or not hasattr(os, "SCHED_IDLE"):
        return 0
    moved = 0
    for pid in pids:
        try:
            tids = list(map(int, os.listdir(f"/proc/{pid}/task")))
        except OSError:  # gone meanwhile
            continue
        moved += sum(_set_policy(tid, os.SCHED_IDLE) for tid in tids)
    return moved
