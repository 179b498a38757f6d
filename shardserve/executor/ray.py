"""The Ray executor: a replica's T x P workers as Ray actors in one placement group.

Each step is one remote call per worker carrying the scheduler output; the driver rank (tensor rank 0
of the last stage) answers with the sampled tokens, the others with None. Activations never pass
through Ray: tensor ranks all-reduce and stages send/recv over torch.distributed.

A worker that dies or fails poisons the replica (the others may be blocked in a collective waiting
for it): every worker is killed, the placement group released, and this and every later call raises
`WorkerDiedError`. The caller builds a new replica.
"""
from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Callable

import ray
from ray.exceptions import RayError, RayTaskError

from shardserve.cluster.ray_cluster import Placement, connect, reserve
from shardserve.config import EngineConfig
from shardserve.engine.scheduler import SchedulerOutput
from shardserve.executor.base import Executor
from shardserve.models.source import ModelSource
from shardserve.workers.cpu_malloc import tcmalloc_env
from shardserve.workers.model_runner import ModelRunnerOutput
from shardserve.workers.ray_worker import RayWorker

logger = logging.getLogger(__name__)


class WorkerDiedError(RuntimeError):
    """A worker of the replica died or failed; the replica cannot serve any more."""


def _release(workers: list, placement: Placement) -> None:
    for w in workers:
        try:
            ray.kill(w)
        except Exception:  # already gone
            pass
    try:
        placement.release()
    except Exception:  # the cluster itself may be gone at interpreter exit
        pass


class RayExecutor(Executor):
    def __init__(self, config: EngineConfig, source: ModelSource):
        self.config = config
        tp, world = config.tensor_parallel_size, config.world_size
        connect(config.ray_address)
        use_gpu = config.torch_device.type == "cuda"
        self.placement = reserve(world, use_gpu, config.num_cpus_per_worker, config.placement_group_strategy)
        actor = ray.remote(RayWorker)
        threads = 1 if use_gpu else max(1, math.floor(config.num_cpus_per_worker))
        self.workers = [actor.options(num_cpus=0 if use_gpu else config.num_cpus_per_worker,
                                      num_gpus=1 if use_gpu else 0,
                                      runtime_env={"env_vars": {} if use_gpu else tcmalloc_env()},
                                      scheduling_strategy=self.placement.strategy(rank)).remote(threads)
                        for rank in range(world)]
        self._dead: WorkerDiedError | None = None
        self._finalizer = weakref.finalize(self, _release, list(self.workers), self.placement)
        self.driver_rank = world - tp  # tensor rank 0 of the last stage
        self.node_info = self._gather([w.node_info.remote() for w in self.workers], "start")
        init_method = f"tcp://{self.node_info[0]['ip']}:{self.node_info[0]['free_port']}"
        self._gather([w.init_worker.remote(config, source, rank, init_method)
                      for rank, w in enumerate(self.workers)], "load the model")
        logger.info("Ray executor: TP=%d x PP=%d workers on nodes %s", tp, config.pipeline_parallel_size,
                    sorted({i["node_id"][:8] for i in self.node_info}))

    def rank_name(self, rank: int) -> str:
        pp_rank, tp_rank = divmod(rank, self.config.tensor_parallel_size)
        return f"rank {rank} (pipeline stage {pp_rank}, tensor rank {tp_rank})"

    def _gather(self, refs: list, what: str, timeout: float | None = None, caller_errors: bool = False) -> list:
        """Results of one call on every worker. Results are checked as they arrive, so a dead worker is
        reported at once instead of after its peers give up waiting for it in a collective. `caller_errors`:
        an exception the method raised on a live worker is the caller's (raised as it was: Ray's error is an
        instance of its class too), not the end of the replica. Past `timeout` seconds TimeoutError."""
        if self._dead is not None:
            raise self._dead
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        pending = list(refs)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while pending:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready, pending = ray.wait(pending, num_returns=1, timeout=left)
                if not ready:
                    raise TimeoutError(f"{what}: {len(pending)} of {len(refs)} workers had not answered within "
                                       f"{timeout} s (the call still runs there).")
                current = rank_of[ready[0]]
                ray.get(ready[0])
        except RayError as e:
            if caller_errors and isinstance(e, RayTaskError):
                raise
            self._dead = WorkerDiedError(f"Worker {self.rank_name(current)} of the replica failed during "
                                         f"'{what}': {type(e).__name__}: {e}. The replica's workers were "
                                         f"stopped; create a new LLM to continue.")
            self.shutdown()
            raise self._dead from e
        return ray.get(refs)

    def collective_rpc(self, method: str, *args) -> list:
        return self._gather([getattr(w, method).remote(*args) for w in self.workers], method)

    def call_workers(self, method: str | Callable, args: tuple = (), kwargs: dict | None = None,
                     timeout: float | None = None) -> list:
        what = f"collective_rpc({method if isinstance(method, str) else getattr(method, '__name__', 'fn')!r})"
        return self._gather([w.execute_method.remote(method, args, kwargs) for w in self.workers], what,
                            timeout, caller_errors=True)

    def determine_num_blocks(self) -> int:
        # Every stage's cache holds the same block ids for its own layers: the smallest budget decides.
        return min(self.collective_rpc("determine_num_blocks"))

    def init_kv_cache(self, num_blocks: int) -> None:
        self.collective_rpc("init_kv_cache", num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.collective_rpc("execute_model", scheduler_output)[self.driver_rank]

    def check_health(self, timeout_s: float = 20.0) -> None:
        """Ping every worker (an idle replica learns of a dead worker here, not at its next request). A busy
        worker answers after its current step."""
        if self._dead is not None:
            raise self._dead
        refs = [w.node_info.remote() for w in self.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for ref in ready:
            try:
                ray.get(ref)
            except RayError as e:
                rank = refs.index(ref)
                self._dead = WorkerDiedError(f"Worker {self.rank_name(rank)} of the replica is gone: "
                                             f"{type(e).__name__}: {e}")
                self.shutdown()
                raise self._dead from e
        if len(ready) < len(refs):
            raise WorkerDiedError(f"{len(refs) - len(ready)} worker(s) did not answer a health check within "
                                  f"{timeout_s:.0f} s.")

    def shutdown(self) -> None:
        if self._finalizer.alive and self._dead is None:
            try:  # leave the process groups cleanly when the workers are healthy
                ray.get([w.shutdown.remote() for w in self.workers], timeout=10)
            except Exception:
                pass
        self._finalizer()
