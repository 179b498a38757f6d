"""The actor form of a `Worker`: one Ray actor per (pipeline stage, tensor rank) of a replica.

The actor starts empty so the driver can first ask rank 0 where to meet (its node's address and a free
port); `init_worker` then joins the process groups and loads this rank's shard. Only the scheduler output
comes in and only the driver rank's sampled tokens go out: activations move over torch.distributed.
"""
from __future__ import annotations

import os
import socket

import ray
import torch

from shardserve.config import EngineConfig
from shardserve.distributed.parallel_state import comm_stats, destroy_distributed, tp_uses_shared_memory
from shardserve.engine.scheduler import SchedulerOutput
from shardserve.models.source import ModelSource
from shardserve.workers.model_runner import ModelRunnerOutput
from shardserve.workers.worker import Worker, worker_class


class RayWorker:
    def __init__(self, num_threads: int):
        # Ray pins nothing on CPUs: size torch's pool to this actor's share so ranks do not oversubscribe.
        torch.set_num_threads(max(1, num_threads))
        self.worker: Worker | None = None

    def node_info(self) -> dict:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "free_port": port, "pid": os.getpid()}

    def init_worker(self, config: EngineConfig, source: ModelSource, rank: int, init_method: str) -> None:
        self.worker = worker_class(config.worker_extension_cls)(config, source, rank, init_method)

    def execute_method(self, method, args: tuple, kwargs: dict | None):
        return self.worker.execute_method(method, args, kwargs)

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def profile_run(self, num_tokens: int, max_model_len: int) -> None:
        self.worker.profile_run(num_tokens, max_model_len)

    def init_kv_cache(self, num_blocks: int) -> None:
        self.worker.init_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        return self.worker.execute_model(scheduler_output)

    def num_parameter_elements(self) -> int:
        return self.worker.num_parameter_elements()

    def comm_stats(self) -> dict:
        stats = comm_stats()
        return {"seconds": stats.seconds, "calls": stats.calls, "bytes": stats.bytes,
                "shared_memory": tp_uses_shared_memory()}

    def shutdown(self) -> None:
        destroy_distributed()
